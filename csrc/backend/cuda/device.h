// device.h — what the CUDA runtime can tell about the GPUs (queries only; no kernels live here).
//
// Compiled only when the CUDA backend is built (TP_WITH_CUDA); engine.cpp and api.cpp guard their calls.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tp {
namespace cuda {

struct GpuInfo {
  int index = 0;
  std::string name;
  int cc_major = 0, cc_minor = 0;
  int64_t total_bytes = 0, free_bytes = 0;
  int multiprocessors = 0;
};

// The visible GPUs. Throws tp::Error(TP_ERR_DEVICE) naming the CUDA error when the runtime cannot start
// (no driver, driver too old); returns an empty list when the driver reports no device.
std::vector<GpuInfo> list_devices();

// cudaDeviceCanAccessPeer(a, b).
bool can_access_peer(int a, int b);

// Version of the CUDA runtime the library was built against, e.g. "13.0".
std::string runtime_version();

}  // namespace cuda
}  // namespace tp
