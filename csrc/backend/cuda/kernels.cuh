// kernels.cuh — launchers of the CUDA kernels behind CudaOps, one .cu per op family; the quantized matmul
// has its own pair (matmul.cuh/.cu).
//
// Every launcher enqueues on `stream`, never synchronizes, and returns the launch's cudaError_t
// (cudaErrorInvalidValue for sizes it cannot handle). Pointers are device memory unless a comment says
// otherwise. Layouts are the Ops layouts (backend/ops.h): activations row-major f32, [n_tok, dim];
// the KV cache is f16, one [n_pos, kv_dim] K and one V array per layer (kv_dim = n_head_kv * head_dim).
//
// Numerics: where it costs nothing the kernels evaluate the CPU backend's expressions in the same order
// with explicitly rounded operations (__fmul_rn & co., which nvcc never fuses into FMAs), so rms_norm,
// rope, add and add_bias agree with the CPU to the last bit or within 1 ulp; glu differs only by the
// accuracy of expf/tanhf (<= 2 ulp). Attention differs by design: f16 K/V, and f16 Q and P on tensor cores.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/compat.cuh"

#include "model/config.h"  // RopeMode, Activation, YarnParams
#include "quant/types.h"   // GgmlType

// out[r] = in[r] / sqrt(mean(in[r]^2) + eps) * w       in/out: [rows, dim] (may alias), w: [dim] f32
cudaError_t tp_rms_norm_cuda(float* out, const float* in, const float* w, int64_t rows, int64_t dim, float eps,
                             cudaStream_t stream);

// RopeParams::sections by value (a kernel parameter cannot be a bare array).
struct TpRopeSections {
  int32_t n[4];
};

// In-place rotary embedding of every head of x ([n_tok, n_heads, head_dim]) as Ops::rope (backend/ops.h):
// token i's position ids come from pos (device, section-major [4, n_tok]) or are pos0 + i (0 for e) when pos
// is null. Pairs (a, b) are (2k, 2k+1) for Norm, (k, k + n_rot/2) for Neox and Mrope, (k, k + n_rot) for
// Vision (n_rot = head_dim / 2); dims not in a pair pass through. freq_factors: [n_rot/2] divisors of the
// angles (device) or null. yarn: YaRN's blend and cos/sin scale (model/config.h; ext_factor 0 is plain RoPE).
cudaError_t tp_rope_cuda(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0,
                         const int32_t* pos, tp::RopeMode mode, TpRopeSections sections, int64_t n_rot, float base,
                         float freq_scale, const float* freq_factors, tp::YarnParams yarn, cudaStream_t stream);

// out = act(gate) * up                                  all: [n] (out may alias gate or up); SwigluOai clamps
// first (model/config.h)
cudaError_t tp_glu_cuda(float* out, const float* gate, const float* up, int64_t n, tp::Activation act,
                        cudaStream_t stream);
// out = a + b                                           all: [n] (may alias)
cudaError_t tp_add_cuda(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream);
// x[r] += b                                             x: [rows, cols], b: [cols] f32
cudaError_t tp_add_bias_cuda(float* x, const float* b, int64_t rows, int64_t cols, cudaStream_t stream);

// out[i] = dequant(table row tokens[i]) * scale         out: [n, cols]; table: rows of row_bytes bytes of
// `type` (any type csrc/quant/blocks.h decodes). `tokens` is HOST memory: the ids travel inside the kernel
// parameters (chunks of 512), so the call neither waits for the GPU nor needs a pinned buffer.
cudaError_t tp_embed_cuda(float* out, const void* table, tp::GgmlType type, int64_t row_bytes, int64_t cols,
                          const int32_t* tokens, int64_t n, float scale, cudaStream_t stream);
// Whether tp_embed_cuda can decode rows of `type`.
bool tp_embed_cuda_supports(tp::GgmlType type);

// Mixture of experts (moe.cu; the grouped expert matmul is tp_moe_matmul_cuda in matmul.cuh).
// Per token the k largest of its n_expert logits, largest first, ties to the lower expert; weights = softmax
// over those k logits.                                  logits: [n_tok, n_expert]; ids, weights: [n_tok * k]
cudaError_t tp_router_topk_cuda(int32_t* ids, float* weights, const float* logits, int64_t n_tok, int64_t n_expert,
                                int64_t k, cudaStream_t stream);
// out[t] = Σ_j weights[t*k + j] · y[t*k + j], j in order, products rounded (no FMA): the CPU's bits.
//                                                       y: [n_tok * k, dim]; out: [n_tok, dim]
cudaError_t tp_moe_combine_cuda(float* out, const float* y, const float* weights, int64_t n_tok, int64_t k,
                                int64_t dim, cudaStream_t stream);

// k_cache[pos0 + i] = f16(k[i]), v_cache likewise (round to nearest even)   k, v: [n_tok, kv_dim] f32;
// caches: [n_pos, kv_dim] f16.
cudaError_t tp_kv_store_cuda(__half* k_cache, __half* v_cache, const float* k, const float* v, int64_t pos0,
                             int64_t n_tok, int64_t kv_dim, cudaStream_t stream);

// Which attention kernel runs. Auto: tensor cores (mma.sync m16n8k16, f16 in, f32 accumulate) on sm_80+
// for head_dim 64/128/256, else the f32 kernel. Mma fails with cudaErrorNotSupported where it cannot run.
enum class TpAttnKernel : int { Auto = 0, Mma = 1, Simple = 2 };

// Causal attention with an online softmax, never materializing the score matrix. Query i (position pos0 + i)
// of head h sees the keys j of KV head h / (n_head / n_head_kv) with j <= pos0 + i and, when n_swa > 0,
// j > pos0 + i - n_swa. softmax(q·k * kq_scale) · v. sinks ([n_head] f32 or null): head h's denominator
// gains e^(sinks[h] - m), m the row's max over its scores and the sink (gpt-oss; backend/ops.h).
// q: [n_tok, n_head, head_dim] f32; caches: [>= pos0 + n_tok, n_head_kv * head_dim] f16;
// out: [n_tok, n_head * head_dim] f32. head_dim <= 256.
cudaError_t tp_attention_cuda(float* out, const float* q, const __half* k_cache, const __half* v_cache,
                              int64_t pos0, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                              float kq_scale, int64_t n_swa, const float* sinks, TpAttnKernel kernel,
                              cudaStream_t stream);
constexpr int64_t kTpAttnMaxHeadDim = 256;

// ---- device helpers shared by the kernels -------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T tp_warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float tp_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Blocks for a grid-stride loop over n elements with `threads` per block.
inline unsigned tp_grid_blocks(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > 8192 ? 8192 : b));
}
