// attention.cu — tp_attention_cuda: picks the kernel and launches it.
//
// Tensor cores (attention_mma.cuh, mma.sync m16n8k16) on sm_80+ for head_dim 64/128/256; the f32 kernel
// (attention_simple.cuh) on sm_75 and for every other head_dim up to 256. Both read the f16 KV cache and
// return results that depend only on each query row's own visible keys (bit-reproducible run to run).
#include "backend/cuda/attention.cuh"
#include "backend/cuda/attention_simple.cuh"
#include "backend/cuda/kernels.cuh"

namespace tp {
namespace cuda {
namespace {

template <int DV>
cudaError_t launch_simple(const AttnArgs& a, cudaStream_t stream) {
  const size_t smem = simple_smem_bytes(int(a.head_dim));  // <= 49 KiB at head_dim 256
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(attn_simple_kernel<DV>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned((a.n_tok + kSimpleRows - 1) / kSimpleRows), unsigned(a.n_head));
  TP_LAUNCH(attn_simple_kernel<DV>, grid, kSimpleWarps * 32, smem, stream, a);
  return cudaGetLastError();
}

// Compute capability major of the current device (the runtime caches attributes; this is cheap).
int current_cc_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                 cudaSuccess)
    return 0;
  return major;
}

}  // namespace
}  // namespace cuda
}  // namespace tp

cudaError_t tp_attention_cuda(float* out, const float* q, const __half* k_cache, const __half* v_cache,
                              int64_t pos0, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                              float kq_scale, int64_t n_swa, const float* sinks, TpAttnKernel kernel,
                              cudaStream_t stream) {
  using namespace tp::cuda;
  if (pos0 < 0 || n_tok < 0 || n_head < 1 || n_head_kv < 1 || n_head % n_head_kv || n_swa < 0 || head_dim < 1 ||
      head_dim > kTpAttnMaxHeadDim || n_head > 65535 || !out || !q || !k_cache || !v_cache)
    return cudaErrorInvalidValue;
  if (n_tok == 0) return cudaSuccess;
  if ((n_tok + kSimpleRows - 1) / kSimpleRows > INT32_MAX) return cudaErrorInvalidValue;
  const AttnArgs a{out, q, k_cache, v_cache, pos0, n_tok, n_head, n_head_kv, head_dim, n_swa, kq_scale, sinks};

  const bool mma_size = head_dim == 64 || head_dim == 128 || head_dim == 256;
  const bool mma_ok = mma_size && kernel != TpAttnKernel::Simple && current_cc_major() >= 8;
  if (kernel == TpAttnKernel::Mma && !mma_ok) return cudaErrorNotSupported;
  if (mma_ok) {
    switch (head_dim) {
      case 64: return attention_mma<64>(a, stream);
      case 128: return attention_mma<128>(a, stream);
      default: return attention_mma<256>(a, stream);
    }
  }
  if (head_dim <= 32) return launch_simple<1>(a, stream);
  if (head_dim <= 64) return launch_simple<2>(a, stream);
  if (head_dim <= 128) return launch_simple<4>(a, stream);
  return launch_simple<8>(a, stream);
}
