// device.cu — GPU discovery through the CUDA runtime (see device.h).
#include <cuda_runtime.h>

#include "backend/cuda/device.h"
#include "common.h"

namespace tp {
namespace cuda {

namespace {

[[noreturn]] void fail_cuda(cudaError_t e, const char* what) {
  fail(TP_ERR_DEVICE, "%s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

}  // namespace

std::vector<GpuInfo> list_devices() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice) {
    cudaGetLastError();
    return {};
  }
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    fail_cuda(e, "cudaGetDeviceCount");
  }
  std::vector<GpuInfo> out;
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop;
    e = cudaGetDeviceProperties(&prop, i);
    if (e != cudaSuccess) fail_cuda(e, "cudaGetDeviceProperties");
    GpuInfo g;
    g.index = i;
    g.name = prop.name;
    g.cc_major = prop.major;
    g.cc_minor = prop.minor;
    g.total_bytes = int64_t(prop.totalGlobalMem);
    g.multiprocessors = prop.multiProcessorCount;
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
      g.free_bytes = int64_t(free_b);
    cudaGetLastError();
    out.push_back(g);
  }
  return out;
}

bool can_access_peer(int a, int b) {
  int ok = 0;
  if (cudaDeviceCanAccessPeer(&ok, a, b) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return ok != 0;
}

std::string runtime_version() {
  return fmt("%d.%d", CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10);
}

}  // namespace cuda
}  // namespace tp
