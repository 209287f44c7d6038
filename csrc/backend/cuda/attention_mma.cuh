// attention_mma.cuh — flash-attention prefill on tensor cores (mma.sync m16n8k16, f16 × f16 → f32), sm_80+.
//
// A CTA of 4 warps owns 64 consecutive query rows of one head; warp w owns rows 16w..16w+15 (the M of
// its MMAs). The CTA walks the KV tiles its rows can see, oldest first, tiles aligned to absolute key
// positions (multiples of kKeys): per tile it stages K and V (f16, straight from the cache) in shared
// memory, each warp computes S = Q·Kᵀ for its 16 rows (f32 accumulators), masks (causal, sliding window),
// runs the online softmax in f32 in the log2 domain, rounds P to f16 and accumulates O += P·V (f32). The
// score matrix never exists beyond one 16 × kKeys register tile per warp.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16): lane = 4·g + t (g = groupID 0..7, t = 0..3);
//   A (16×16, row-major) a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..)
//   B (16×8, k × n)      b0:(k = 2t..2t+1, n = g) b1:(k = 2t+8.., n = g)
//   C (16×8, f32)        c0,c1:(g, 2t..2t+1) c2,c3:(g+8, 2t..2t+1)
// so the C tiles of S for keys 16kk..16kk+15 are exactly the A fragment of P for the P·V step (FA2's
// register reuse), Kᵀ fragments are 32-bit loads of K rows, and V fragments pair two K rows' halves.
// An attention sink (gpt-oss) joins each row's denominator after the last tile (tp_attn_sink, log2 domain).
//
// Exactness arguments the tests rely on:
//  - A tile that is fully masked for a row leaves that row's (m, l, O) bit-unchanged (its max is -inf, the
//    correction is exp2(0) = 1 and every p is 0), so a row's result does not depend on which other rows
//    share its CTA or which tiles the CTA visits: only on its own keys, in a fixed order. Kernels are
//    deterministic (no atomics, fixed reduction trees).
//  - A row that has seen no visible key yet keeps m = -inf; its correction is forced to 1 and its p to 0
//    (exp2(-inf - -inf) would be NaN).
//  - Keys at or past pos0 + n_tok are never read from the cache (zero-filled in shared memory) and always
//    masked, so stale cache contents cannot leak in as NaN · 0.
#pragma once

#include <cuda_fp16.h>

#include <cstring>

#include "backend/cuda/attention.cuh"

namespace tp {
namespace cuda {
namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaRows = 16 * kMmaWarps;  // query rows per CTA

template <int D>
struct MmaTile {
  static constexpr int kKeys = D == 256 ? 32 : 64;  // keys per KV tile (halved at D = 256 for registers)
  static constexpr int kStride = D + 8;             // smem row stride in halves: +16 B puts rows on new banks
  static constexpr size_t kSmemBytes = size_t(kMmaRows + 2 * kKeys) * kStride * sizeof(__half);
};

__device__ __forceinline__ uint32_t lds_u32(const __half* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack_halves(__half lo, __half hi) {
  return uint32_t(__half_as_ushort(lo)) | (uint32_t(__half_as_ushort(hi)) << 16);
}

__device__ __forceinline__ uint32_t half2_bits(__half2 h) {
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

// c += A·B for one m16n8k16 tile (f16 inputs, f32 accumulators).
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if TP_ARCH >= 800 && defined(TP_CUDA_EMULATE)
  tp_emu::mma_f16_m16n8k16(c, {a0, a1, a2, a3}, {b0, b1});
#elif TP_ARCH >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

template <int D>
__device__ __forceinline__ void attn_mma_body(const AttnArgs& a, float scale_log2) {
  constexpr int Bc = MmaTile<D>::kKeys, S = MmaTile<D>::kStride;
  constexpr int NT = Bc / 8;  // n-tiles of S (8 keys each)
  constexpr int KD = D / 16;  // k-steps of Q·Kᵀ
  constexpr int ND = D / 8;   // n-tiles of O (8 dims each)

  TP_DYNAMIC_SMEM(smem);
  __half* Qs = reinterpret_cast<__half*>(smem);  // [kMmaRows][S]
  __half* Ks = Qs + kMmaRows * S;                  // [Bc][S]
  __half* Vs = Ks + Bc * S;                        // [Bc][S]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int64_t h = blockIdx.y, kvh = h / (a.n_head / a.n_head_kv);
  const int64_t row0 = int64_t(gridDim.x - 1 - blockIdx.x) * kMmaRows;  // latest (heaviest) rows first
  const int64_t kv_dim = a.n_head_kv * D, q_stride = a.n_head * D, n_keys = a.pos0 + a.n_tok;

  // Q tile, f32 -> f16 (rows past n_tok are zeros and never stored).
  for (int i = tid; i < kMmaRows * (D / 4); i += blockDim.x) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < a.n_tok) x = *reinterpret_cast<const float4*>(a.q + (row0 + r) * q_stride + h * D + c);
    __half2* dst = reinterpret_cast<__half2*>(Qs + r * S + c);
    dst[0] = __floats2half2_rn(x.x, x.y);
    dst[1] = __floats2half2_rn(x.z, x.w);
  }

  const int64_t wrow = row0 + warp * 16;  // this warp's first row
  const bool warp_active = wrow < a.n_tok;
  const int64_t p_lo = a.pos0 + wrow + g, p_hi = p_lo + 8;  // positions of this lane's two rows
  const int64_t last_row = (row0 + kMmaRows < a.n_tok ? row0 + kMmaRows : a.n_tok) - 1;
  const int64_t key_end = a.pos0 + last_row;  // inclusive
  int64_t key_begin = 0;
  if (a.n_swa > 0 && a.pos0 + row0 - a.n_swa + 1 > 0) key_begin = a.pos0 + row0 - a.n_swa + 1;
  key_begin = key_begin / Bc * Bc;

  float o[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  for (int64_t kb = key_begin; kb <= key_end; kb += Bc) {
    __syncthreads();  // every warp is done with the previous tile (and, first time, Q is written)
    for (int i = tid; i < Bc * (D / 8); i += blockDim.x) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      const int64_t key = kb + r;
      uint4 kx = make_uint4(0u, 0u, 0u, 0u), vx = kx;
      if (key < n_keys) {
        kx = *reinterpret_cast<const uint4*>(a.k + key * kv_dim + kvh * D + c);
        vx = *reinterpret_cast<const uint4*>(a.v + key * kv_dim + kvh * D + c);
      }
      *reinterpret_cast<uint4*>(Ks + r * S + c) = kx;
      *reinterpret_cast<uint4*>(Vs + r * S + c) = vx;
    }
    __syncthreads();

    // Skip a tile no row of this warp can see (after every row, or before every row's window): exact, see top.
    const int64_t wp_first = a.pos0 + wrow;
    if (!warp_active || kb > wp_first + 15 || (a.n_swa > 0 && kb + Bc - 1 <= wp_first - a.n_swa)) continue;

    // S = Q·Kᵀ
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kd = 0; kd < KD; ++kd) {
      const __half* qa = Qs + (warp * 16 + g) * S + kd * 16 + 2 * tq;
      const uint32_t a0 = lds_u32(qa), a1 = lds_u32(qa + 8 * S), a2 = lds_u32(qa + 8), a3 = lds_u32(qa + 8 * S + 8);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const __half* kp = Ks + (nt * 8 + g) * S + kd * 16 + 2 * tq;
        mma_16816(s[nt], a0, a1, a2, a3, lds_u32(kp), lds_u32(kp + 8));
      }
    }

    // Scale into the log2 domain, mask, row max over the quad (the 4 lanes sharing a row).
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = kb + nt * 8 + 2 * tq + (e & 1);
        const int64_t pos = e < 2 ? p_lo : p_hi;
        const bool visible = key <= pos && (a.n_swa == 0 || key > pos - a.n_swa);
        s[nt][e] = visible ? s[nt][e] * scale_log2 : -INFINITY;
      }
      mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
    }
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
    const float c_lo = mn_lo == -INFINITY ? 1.f : exp2f(m_lo - mn_lo);
    const float c_hi = mn_hi == -INFINITY ? 1.f : exp2f(m_hi - mn_hi);
    const float b_lo = mn_lo == -INFINITY ? 0.f : mn_lo, b_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
    m_lo = mn_lo;
    m_hi = mn_hi;
    l_lo *= c_lo;
    l_hi *= c_hi;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      o[j][0] *= c_lo;
      o[j][1] *= c_lo;
      o[j][2] *= c_hi;
      o[j][3] *= c_hi;
    }

    // P = exp2(S - m) rounded to f16; l sums the rounded values, so O / l is a convex combination of V rows.
    uint32_t pa[NT][2];  // [n-tile][row lo, row hi]
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const __half2 plo = __floats2half2_rn(exp2f(s[nt][0] - b_lo), exp2f(s[nt][1] - b_lo));
      const __half2 phi = __floats2half2_rn(exp2f(s[nt][2] - b_hi), exp2f(s[nt][3] - b_hi));
      l_lo += __low2float(plo) + __high2float(plo);
      l_hi += __low2float(phi) + __high2float(phi);
      pa[nt][0] = half2_bits(plo);
      pa[nt][1] = half2_bits(phi);
    }

    // O += P·V
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk) {
      const uint32_t a0 = pa[2 * kk][0], a1 = pa[2 * kk][1], a2 = pa[2 * kk + 1][0], a3 = pa[2 * kk + 1][1];
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        const __half* vp = Vs + (kk * 16 + 2 * tq) * S + j * 8 + g;
        mma_16816(o[j], a0, a1, a2, a3, pack_halves(vp[0], vp[S]), pack_halves(vp[8 * S], vp[9 * S]));
      }
    }
  }
  if (!warp_active) return;  // no barrier follows

  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  // m is in the log2 domain here (scores scaled by kq_scale·log2 e); rows past n_tok are never stored.
  const float vs_lo = tp_attn_sink(a.sinks, h, m_lo, l_lo, true), vs_hi = tp_attn_sink(a.sinks, h, m_hi, l_hi, true);
  const float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
  const int64_t r_lo = wrow + g, r_hi = r_lo + 8;
#pragma unroll
  for (int j = 0; j < ND; ++j) {
    const int64_t col = h * D + j * 8 + 2 * tq;
    if (r_lo < a.n_tok)
      *reinterpret_cast<float2*>(a.out + r_lo * q_stride + col) =
          make_float2((o[j][0] * vs_lo) * inv_lo, (o[j][1] * vs_lo) * inv_lo);
    if (r_hi < a.n_tok)
      *reinterpret_cast<float2*>(a.out + r_hi * q_stride + col) =
          make_float2((o[j][2] * vs_hi) * inv_hi, (o[j][3] * vs_hi) * inv_hi);
  }
}

template <int D>
__global__ void __launch_bounds__(kMmaWarps * 32) attn_mma_kernel(const AttnArgs a, float scale_log2) {
#if TP_ARCH >= 800
  attn_mma_body<D>(a, scale_log2);
#endif
}

}  // namespace

template <int D>
cudaError_t attention_mma(const AttnArgs& a, cudaStream_t stream) {
  constexpr size_t smem = MmaTile<D>::kSmemBytes;  // 27 KiB (D 64), 51 KiB (128), 66 KiB (256)
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(attn_mma_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(unsigned((a.n_tok + kMmaRows - 1) / kMmaRows), unsigned(a.n_head));
  TP_LAUNCH(attn_mma_kernel<D>, grid, kMmaWarps * 32, smem, stream, a, a.kq_scale * 1.4426950408889634f);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tp
