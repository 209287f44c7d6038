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

// ---- internal: implemented in matmul_mmq_*.cu / matmul_mmvq.cu, called by matmul.cu ------------------------
namespace tp {
namespace cuda_mm {

constexpr int kMmvMaxTok = 8;  // n_tok <= this goes to the matrix-vector kernels

#if defined(__CUDACC__) || defined(TP_CUDA_EMULATE)
// Matrix-vector epilogue: each lane holds a lane-strided partial dot product per token; sum them over the
// warp and let lane 0 write out[t * rows + r] for the n_tok tokens.
__device__ __forceinline__ void warp_sum_store(const float (&acc)[kMmvMaxTok], int n_tok, int lane, float* out,
                                               int64_t rows, int64_t r) {
#pragma unroll
  for (int t = 0; t < kMmvMaxTok; ++t) {
    if (t < n_tok) {
      float s = acc[t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) out[t * rows + r] = s;
    }
  }
}
#endif

// Quantized activations as laid out in scratch by matmul.cu.
struct QuantAct {
  const int8_t* q;  // [n_tok, k] int8, 16-byte aligned rows (k is a multiple of 32)
  const float2* ds;  // [n_tok, k/32] (d, s = d·Σq) per 32-group
};

// Per-block-type launchers; B is one of the block structs with a tp::Unpack<B> specialization.
template <class B>
cudaError_t mmq_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                       int64_t n_tok, cudaStream_t stream);
template <class B>
cudaError_t mmvq_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                        int64_t n_tok, cudaStream_t stream);

}  // namespace cuda_mm
}  // namespace tp
