// matmul_test.cu — tp_cuda_matmul_test: host buffers in, host buffers out, one tp_matmul_cuda in between.
//
// A test entry point (tests/test_cuda_matmul.py declares it with its own cffi FFI; it is not in the public
// header): allocates device copies of w ([rows] GGUF rows of k elements of `type`), x ([n_tok, k] f32),
// y ([n_tok, rows] f32) and the scratch, runs the matmul on a private stream, copies y back and frees
// everything on every path. CUDA failures become TP_ERR_DEVICE naming the call and the CUDA error.
#include <cuda_runtime.h>

#include <string>

#include "backend/cuda/matmul.cuh"
#include "common.h"
#include "include/turboprefill.h"

namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    tp::fail(TP_ERR_DEVICE, "tp_cuda_matmul_test: %s failed: %s (%s)", what, cudaGetErrorName(e),
             cudaGetErrorString(e));
  }
}

// Device allocations and the stream, released whatever happens.
struct Resources {
  void* w = nullptr;
  void* x = nullptr;
  void* y = nullptr;
  void* scratch = nullptr;
  cudaStream_t stream = nullptr;
  ~Resources() {
    if (stream) cudaStreamSynchronize(stream);
    cudaFree(w);
    cudaFree(x);
    cudaFree(y);
    cudaFree(scratch);
    if (stream) cudaStreamDestroy(stream);
  }
};

}  // namespace

extern "C" TP_API tp_status tp_cuda_matmul_test(int32_t device, int32_t type, const void* w, int64_t rows,
                                                int64_t k, const float* x, int64_t n_tok, float* y) {
  try {
    tp::set_last_error("");
    const tp::TypeTraits tt = tp::type_traits(type);
    if (!tt.supported) tp::fail(TP_ERR_UNSUPPORTED, "tp_cuda_matmul_test: unsupported type id %d", int(type));
    if (!w || !x || !y || rows < 1 || n_tok < 1 || k < 1 || k % tt.block_elems != 0)
      tp::fail(TP_ERR_INVALID_ARGUMENT,
               "tp_cuda_matmul_test: bad arguments (rows %lld, k %lld, n_tok %lld; k must be a multiple of the "
               "%s block size %lld)", (long long)rows, (long long)k, (long long)n_tok, tt.name,
               (long long)tt.block_elems);
    const size_t w_bytes = size_t(rows) * size_t(tp::row_bytes(tt, k));
    const size_t x_bytes = size_t(n_tok) * size_t(k) * sizeof(float);
    const size_t y_bytes = size_t(n_tok) * size_t(rows) * sizeof(float);
    const size_t s_bytes = tp_matmul_cuda_scratch_bytes(tp::GgmlType(type), k, n_tok);

    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    Resources res;
    check_cuda(cudaStreamCreateWithFlags(&res.stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaMalloc(&res.w, w_bytes), "cudaMalloc(w)");
    check_cuda(cudaMalloc(&res.x, x_bytes), "cudaMalloc(x)");
    check_cuda(cudaMalloc(&res.y, y_bytes), "cudaMalloc(y)");
    if (s_bytes) check_cuda(cudaMalloc(&res.scratch, s_bytes), "cudaMalloc(scratch)");
    check_cuda(cudaMemcpyAsync(res.w, w, w_bytes, cudaMemcpyHostToDevice, res.stream), "cudaMemcpy(w)");
    check_cuda(cudaMemcpyAsync(res.x, x, x_bytes, cudaMemcpyHostToDevice, res.stream), "cudaMemcpy(x)");
    // NaN-fill the output so a path that forgets an element is caught by the comparison.
    check_cuda(cudaMemsetAsync(res.y, 0xff, y_bytes, res.stream), "cudaMemset(y)");
    check_cuda(tp_matmul_cuda(static_cast<float*>(res.y), res.w, tp::GgmlType(type), rows, k,
                              static_cast<const float*>(res.x), n_tok, res.scratch, res.stream),
               "tp_matmul_cuda");
    check_cuda(cudaMemcpyAsync(y, res.y, y_bytes, cudaMemcpyDeviceToHost, res.stream), "cudaMemcpy(y)");
    check_cuda(cudaStreamSynchronize(res.stream), "cudaStreamSynchronize");
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}
