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
  const float* sinks;  // [n_head] f32 sink logits (gpt-oss) or null; folded in at the end, see tp_attn_sink
};

// Folds head h's sink logit into a finished row, as the CPU (cpu/attention.cpp) and ggml do: with the row's
// running max m and sum l (in the domain `unit` converts to: 1 for natural exponents, log2(e) for the
// tensor-core kernel's exp2), a sink above m rescales l and the output by e^(m - sink) and adds 1, else
// l gains e^(sink - m). Returns the factor for the output (1 without a sink); l is updated.
__device__ __forceinline__ float tp_attn_sink(const float* sinks, int64_t h, float m, float& l, bool log2_domain) {
  if (!sinks) return 1.f;
  const float s = log2_domain ? sinks[h] * 1.4426950408889634f : sinks[h];
  if (s > m) {
    const float vs = log2_domain ? exp2f(m - s) : expf(m - s);
    l = l * vs + 1.f;
    return vs;
  }
  l += log2_domain ? exp2f(s - m) : expf(s - m);
  return 1.f;
}

// Tensor-core (mma.sync m16n8k16) flash attention for head_dim == D; sm_80+ only. Returns the launch error.
template <int D>
cudaError_t attention_mma(const AttnArgs& a, cudaStream_t stream);
extern template cudaError_t attention_mma<64>(const AttnArgs&, cudaStream_t);
extern template cudaError_t attention_mma<128>(const AttnArgs&, cudaStream_t);
extern template cudaError_t attention_mma<256>(const AttnArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace tp
