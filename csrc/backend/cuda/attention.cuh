// attention.cuh — what the attention launcher (attention.cu) shares with the tensor-core kernels
// (attention_mma.cuh, instantiated once per head size in attention_mma_d{64,128,256}.cu so the three
// compile in parallel). Layouts: see tp_attention_cuda in kernels.cuh.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/compat.cuh"

namespace tp {
namespace cuda {

// Arguments of one attention call, passed to the kernels by value.
struct AttnArgs {
  float* out;         // [n_tok, n_head * head_dim] f32
  const float* q;     // [n_tok, n_head, head_dim] f32
  const __half* k;    // [>= pos0 + n_tok, n_head_kv * head_dim] f16 (one layer of the cache)
  const __half* v;    // same layout as k
  int64_t pos0, n_tok, n_head, n_head_kv, head_dim;
  int64_t n_swa;      // 0: full causal; else keys j > pos - n_swa
  float kq_scale;
};

// Tensor-core (mma.sync m16n8k16) flash attention for head_dim == D; sm_80+ only. Returns the launch error.
template <int D>
cudaError_t attention_mma(const AttnArgs& a, cudaStream_t stream);
extern template cudaError_t attention_mma<64>(const AttnArgs&, cudaStream_t);
extern template cudaError_t attention_mma<128>(const AttnArgs&, cudaStream_t);
extern template cudaError_t attention_mma<256>(const AttnArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace tp
