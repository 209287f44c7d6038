// matmul.cuh — CUDA matmul of GGUF weights × f32 activations: the launchers the CUDA Ops call.
//
//   out[t * rows + r] = Σ_kk W[r][kk] · x[t * k + kk]
// W: `rows` GGUF rows of k elements of `type` (row stride k / block_elems * block_bytes; rows of Q4_0,
// Q5_0, Q8_0 and Q6_K are only 2-byte aligned, so kernels read blocks bytewise / by 16 bits). x: [n_tok, k]
// f32, out: [n_tok, rows] f32, all device memory. k is a whole number of blocks (32 or 256 elements).
//
// Paths (matmul.cu picks one):
//   F32 / F16 / BF16   n_tok <= 8: warp-per-row matrix-vector; else a 64×64 tiled f32-accumulate kernel.
//   quantized types    activations -> int8 groups of 32 in `scratch` (quant/unpack.h: q, d = amax/127,
//                      s = d·Σq), then n_tok <= 8: MMVQ (warp per row, dp4a, matmul_mmvq.cu) or
//                      n_tok > 8: MMQ (64×64 tiles, int8 mma.sync on sm_80+, dp4a on sm_75; matmul_mmq.cuh).
// MoE (tp_moe_matmul_cuda, matmul_moe.cu): the same int8 kernels, grouped by expert through a device-built
// tile table; float experts a warp per (row, slot).
// Both int8 paths compute per (row, token, 32-group) the integers Σ q_w·q_x exactly and combine them with
// tp::group_dot, so they equal tp_unpack_matmul_int8 (CPU, unpack_check.cpp) up to the order in which
// the f32 group terms are added.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/cuda/compat.cuh"

#include "quant/types.h"

// Bytes of device scratch tp_matmul_cuda needs for these sizes (0 for F32/F16/BF16).
size_t tp_matmul_cuda_scratch_bytes(tp::GgmlType type, int64_t k, int64_t n_tok);

// The matmul above, enqueued on `stream`. scratch: device memory of tp_matmul_cuda_scratch_bytes, 16-byte
// aligned (cudaMalloc gives 256), may be null when that is 0; it is in use until the enqueued kernels finish
// (one scratch per stream). x and out must not overlap. Returns cudaErrorInvalidValue for an
// unsupported type, k not a whole number of blocks or a missing pointer; otherwise the launch status.
cudaError_t tp_matmul_cuda(float* out, const void* w, tp::GgmlType type, int64_t rows, int64_t k, const float* x,
                           int64_t n_tok, void* scratch, cudaStream_t stream);

// Bytes of device scratch tp_moe_matmul_cuda needs for these arguments: the int8 activations of the input rows,
// the expert-sorted slot list and the tile table (0 for F32/F16/BF16 experts).
size_t tp_moe_matmul_cuda_scratch_bytes(tp::GgmlType type, int64_t k, int64_t n_expert, bool in_per_slot,
                                        int64_t n_tok, int64_t k_used);

// The grouped expert matmul of Ops::moe_matmul (backend/ops.h), enqueued on `stream` with no host round trip:
//   out[i * rows + r] = Σ_kk W_e[r][kk] · x[src * k + kk] + bias[e * rows + r],  e = ids[i], i < n_tok * k_used,
// src = i when in_per_slot (x: [n_tok * k_used, k]) else i / k_used (x: [n_tok, k]).
// w: n_expert matrices of `rows` GGUF rows of k elements of `type`, stacked; bias: [n_expert, rows] f32 or
// null; ids: [n_tok * k_used] int32 in [0, n_expert) (a slot with another id is left unwritten); out:
// [n_tok * k_used, rows]. Quantized experts: each expert's weight rows are read once per (64-row tile, tile of
// that expert's slots) — see matmul_moe.cu. scratch as for tp_matmul_cuda, sized by the function above.
// Returns cudaErrorInvalidValue for an unsupported type, k not a whole number of blocks,
// more than kTpMoeMaxExperts experts or a missing pointer; otherwise the launch status.
cudaError_t tp_moe_matmul_cuda(float* out, const void* w, tp::GgmlType type, int64_t n_expert, int64_t rows, int64_t k,
                               const float* bias, const float* x, bool in_per_slot, const int32_t* ids, int64_t n_tok,
                               int64_t k_used, void* scratch, cudaStream_t stream);
constexpr int64_t kTpMoeMaxExperts = 2048;  // the routing kernel keeps 3 ints per expert in shared memory

// ---- internal: implemented in matmul_mmq_*.cu / matmul_mmvq.cu, called by matmul.cu ------------------------
namespace tp {
namespace cuda_mm {

constexpr int kMmvMaxTok = 8;  // n_tok <= this goes to the matrix-vector kernels

#if defined(__CUDACC__) || defined(TP_CUDA_EMULATE)
// Matrix-vector epilogue: each lane holds a lane-strided partial dot product per token; sum them over the
// warp and let lane 0 write out[dst[t] * rows + r] (+ bias_r when has_bias) for the n_tok tokens.
__device__ __forceinline__ void warp_sum_store(const float (&acc)[kMmvMaxTok], int n_tok, int lane, float* out,
                                               int64_t rows, int64_t r, const int (&dst)[kMmvMaxTok], bool has_bias,
                                               float bias_r) {
#pragma unroll
  for (int t = 0; t < kMmvMaxTok; ++t) {
    if (t < n_tok) {
      float s = acc[t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) out[int64_t(dst[t]) * rows + r] = has_bias ? __fadd_rn(s, bias_r) : s;
    }
  }
}
// The dense case: output row t for token t, no bias.
__device__ __forceinline__ void warp_sum_store(const float (&acc)[kMmvMaxTok], int n_tok, int lane, float* out,
                                               int64_t rows, int64_t r) {
  int idx[kMmvMaxTok];
#pragma unroll
  for (int t = 0; t < kMmvMaxTok; ++t) idx[t] = t;
  warp_sum_store(acc, n_tok, lane, out, rows, r, idx, false, 0.0f);
}
#endif

// Quantized activations as laid out in scratch by matmul.cu.
struct QuantAct {
  const int8_t* q;  // [n_tok, k] int8, 16-byte aligned rows (k is a multiple of 32)
  const float2* ds;  // [n_tok, k/32] (d, s = d·Σq) per 32-group
};

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }
inline bool is_float_type(GgmlType t) { return t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16; }

// x = int8 groups of `n_rows` rows of k f32 (k a multiple of 32), written to x.q / x.ds (matmul.cu).
cudaError_t quantize_launch(int8_t* q, float2* ds, const float* x, int64_t n_rows, int64_t k, cudaStream_t stream);

// One entry of the grouped matmul's tile table (matmul_moe.cu): `count` (<= tile size) slots of `expert`,
// order[begin .. begin + count). expert -1: an unused entry of the launched upper bound.
struct MoeTile {
  int32_t expert, begin, count;
};

// The device-side routing a grouped kernel reads.
struct MoeRoute {
  const int32_t* order;  // [n_slots] slot numbers sorted by expert (stable: ascending within an expert)
  const MoeTile* tiles;  // [max_tiles]
  int32_t k;             // slots per token: a per-token input row is slot / k
  bool per_slot;         // input row = slot (else slot / k)
  int32_t tile_size;     // slots per full tile: kMoeMmqTile or kMmvMaxTok
};
constexpr int kMoeMmqTile = 64;  // = the MMQ kernel's token tile (checked by mmq_moe_launch)

// Per-block-type launchers; B is one of the block structs with a tp::Unpack<B> specialization.
template <class B>
cudaError_t mmq_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                       int64_t n_tok, cudaStream_t stream);
template <class B>
cudaError_t mmvq_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                        int64_t n_tok, cudaStream_t stream);
// Grouped: w is the stacked experts (matrix e at w + e * rows * row_bytes), bias [n_expert, rows] or null;
// CTA column y handles route.tiles[y] (max_tiles of them).
// The grouped matmul for float experts (matmul.cu): a warp per (row, slot), ids read on the device.
cudaError_t moe_float_launch(float* out, const void* w, GgmlType type, int64_t n_expert, int64_t rows, int64_t k,
                             const float* bias, const float* x, bool in_per_slot, const int32_t* ids, int64_t n_slots,
                             int64_t k_used, cudaStream_t stream);
template <class B>
cudaError_t mmq_moe_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                           MoeRoute route, int64_t max_tiles, const float* bias, cudaStream_t stream);
template <class B>
cudaError_t mmvq_moe_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                            MoeRoute route, int64_t max_tiles, const float* bias, cudaStream_t stream);

}  // namespace cuda_mm
}  // namespace tp
