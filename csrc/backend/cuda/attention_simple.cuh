// attention_simple.cuh — the f32 attention kernel (see attention.cu for when it runs).
//
// A CTA of 4 warps owns 16 query rows of one head (4 per warp) and walks KV tiles of 32 keys, aligned to
// absolute key positions like the tensor-core kernel. K and V tiles sit in shared memory as f16 (as in the
// cache; half the footprint, so head_dim 256 fits sm_75's 64 KiB), Q rows as f32. For a row, lane j scores
// key j of the tile (dot product in f32, in dimension order), the warp reduces the tile max, the online
// softmax runs in f32 with expf, and lane l accumulates output dims l, l+32, ... with the tile's p_j
// broadcast by shuffles; an attention sink joins the denominator at the end (tp_attn_sink). Masking and
// exactness arguments as in attention_mma.cuh. Kept in a header, apart
// from its launcher, so tests/cpp/attention_emulate.cpp can run the body on CPU threads.
#pragma once

#include <cuda_fp16.h>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/kernels.cuh"

namespace tp {
namespace cuda {
namespace {

constexpr int kSimpleWarps = 4;
constexpr int kSimpleRowsPerWarp = 4;
constexpr int kSimpleRows = kSimpleWarps * kSimpleRowsPerWarp;  // query rows per CTA
constexpr int kSimpleKeys = 32;                                 // keys per tile: one per lane

// K tile row stride in halves: an odd number of 32-bit words, so lane j reading K[j][d] hits bank j.
__host__ __device__ inline int simple_k_stride(int d) { return d % 4 == 0 ? d + 2 : d; }

inline size_t simple_smem_bytes(int d) {
  return size_t(kSimpleRows) * d * sizeof(float) + size_t(kSimpleKeys) * (simple_k_stride(d) + d) * sizeof(__half);
}

// DV: output dims per lane (head_dim <= 32 * DV).
template <int DV>
__device__ __forceinline__ void attn_simple_body(const AttnArgs& a) {
  TP_DYNAMIC_SMEM(smem);
  const int D = int(a.head_dim), ks = simple_k_stride(D);
  float* Qs = reinterpret_cast<float*>(smem);                      // [kSimpleRows][D]
  __half* Ks = reinterpret_cast<__half*>(Qs + kSimpleRows * D);   // [kSimpleKeys][ks]
  __half* Vs = Ks + kSimpleKeys * ks;                              // [kSimpleKeys][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t h = blockIdx.y, kvh = h / (a.n_head / a.n_head_kv);
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * kSimpleRows;  // latest (heaviest) rows first
  const int64_t kv_dim = a.n_head_kv * D, q_stride = a.n_head * D, n_keys = a.pos0 + a.n_tok;

  for (int i = tid; i < kSimpleRows * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    Qs[i] = row0 + r < a.n_tok ? a.q[(row0 + r) * q_stride + h * D + c] : 0.f;
  }

  float m[kSimpleRowsPerWarp], l[kSimpleRowsPerWarp], o[kSimpleRowsPerWarp][DV];
#pragma unroll
  for (int rr = 0; rr < kSimpleRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < DV; ++i) o[rr][i] = 0.f;
  }

  const int64_t last_row = (row0 + kSimpleRows < a.n_tok ? row0 + kSimpleRows : a.n_tok) - 1;
  const int64_t key_end = a.pos0 + last_row;
  int64_t key_begin = 0;
  if (a.n_swa > 0 && a.pos0 + row0 - a.n_swa + 1 > 0) key_begin = a.pos0 + row0 - a.n_swa + 1;
  key_begin = key_begin / kSimpleKeys * kSimpleKeys;

  for (int64_t kb = key_begin; kb <= key_end; kb += kSimpleKeys) {
    __syncthreads();
    for (int i = tid; i < kSimpleKeys * D; i += blockDim.x) {
      const int r = i / D, c = i % D;
      const int64_t key = kb + r;
      const bool in = key < n_keys;
      Ks[r * ks + c] = in ? a.k[key * kv_dim + kvh * D + c] : __float2half(0.f);
      Vs[r * D + c] = in ? a.v[key * kv_dim + kvh * D + c] : __float2half(0.f);
    }
    __syncthreads();

#pragma unroll
    for (int rr = 0; rr < kSimpleRowsPerWarp; ++rr) {
      const int r = warp * kSimpleRowsPerWarp + rr;
      if (row0 + r >= a.n_tok) continue;  // warp-uniform
      const int64_t pos = a.pos0 + row0 + r, key = kb + lane;
      const bool visible = key <= pos && (a.n_swa == 0 || key > pos - a.n_swa);
      float sc = -INFINITY;
      if (visible) {
        const float* qr = Qs + r * D;
        const __half* kr = Ks + lane * ks;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qr[d] * __half2float(kr[d]);
        sc = dot * a.kq_scale;
      }
      const float mn = fmaxf(m[rr], tp_warp_max(sc));
      if (mn == -INFINITY) continue;  // nothing visible yet in this row: state unchanged (warp-uniform)
      const float corr = expf(m[rr] - mn);
      const float p = visible ? expf(sc - mn) : 0.f;
      m[rr] = mn;
      l[rr] = l[rr] * corr + p;  // lane-partial sum; reduced once at the end
#pragma unroll
      for (int i = 0; i < DV; ++i) o[rr][i] *= corr;
      for (int j = 0; j < kSimpleKeys; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int i = 0; i < DV; ++i) {
          const int d = lane + 32 * i;
          if (d < D) o[rr][i] += pj * __half2float(Vs[j * D + d]);
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kSimpleRowsPerWarp; ++rr) {
    const int64_t t = row0 + warp * kSimpleRowsPerWarp + rr;
    if (t >= a.n_tok) continue;
    float lt = tp_warp_sum(l[rr]);
    const float vs = tp_attn_sink(a.sinks, h, m[rr], lt, false);
    const float inv = 1.f / lt;
#pragma unroll
    for (int i = 0; i < DV; ++i) {
      const int d = lane + 32 * i;
      if (d < D) a.out[t * q_stride + h * D + d] = (o[rr][i] * vs) * inv;
    }
  }
}

template <int DV>
__global__ void __launch_bounds__(kSimpleWarps * 32) attn_simple_kernel(const AttnArgs a) {
  attn_simple_body<DV>(a);
}

}  // namespace
}  // namespace cuda
}  // namespace tp
