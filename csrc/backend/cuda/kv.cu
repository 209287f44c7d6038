// kv.cu — writes a ubatch's keys and values into the f16 KV cache.
//
// The cache is f16 ([n_pos, kv_dim] per layer, K and V apart), as llama.cpp's default: half the memory and
// bandwidth of f32, and the tensor-core attention reads it without conversion. Rounding is to nearest even
// (__float2half_rn), the same as tp::f32_to_f16 and numpy's astype(float16); values beyond ±65504 become ±inf.
#include "backend/cuda/kernels.cuh"

namespace {

__global__ void kv_store_kernel(__half* kc, __half* vc, const float* k, const float* v, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    kc[i] = __float2half_rn(k[i]);
    vc[i] = __float2half_rn(v[i]);
  }
}

}  // namespace

cudaError_t tp_kv_store_cuda(__half* k_cache, __half* v_cache, const float* k, const float* v, int64_t pos0,
                             int64_t n_tok, int64_t kv_dim, cudaStream_t stream) {
  if (pos0 < 0 || n_tok < 0 || kv_dim <= 0) return cudaErrorInvalidValue;
  const int64_t n = n_tok * kv_dim;
  if (n == 0) return cudaSuccess;
  TP_LAUNCH(kv_store_kernel, tp_grid_blocks(n, 256), 256, 0, stream, k_cache + pos0 * kv_dim, v_cache + pos0 * kv_dim,
            k, v, n);
  return cudaGetLastError();
}
