// matmul_mmq.cuh — the prefill (n_tok > 8) int8 matmul kernels, templates over the weight block type.
// Included only by matmul_mmq_legacy.cu and matmul_mmq_kquant.cu, which instantiate them for their types
// (split so the instantiations compile in parallel); the kernels are file-static in each.
//
// One tile body (mmq_tile) serves two kernels that differ only in which activation rows a CTA's 64
// token columns are and where their outputs go, given as two small index arrays in shared memory:
//   mmq_kernel       the dense matmul: column n is activation row tok0 + n and output row tok0 + n;
//   mmq_moe_kernel   the grouped expert matmul (matmul_moe.cu): the CTA's tile-table entry names an expert
//                    and a run of up to 64 slots of the expert-sorted slot list; column n is slot
//                    s = order[begin + n], reading activation row s (per-slot input) or s / k (per-token
//                    input) and writing output row s, plus the expert's bias row.
// Each output element is the same sequence of operations in both, so a slot's row of the grouped matmul
// equals the dense MMQ result for that activation row bit for bit.
//
// One CTA computes a 64-row × 64-token output tile with 4 warps (2×2, 32×32 each) and walks k in steps
// of 256 elements = 8 groups of 32 (one K-quant super-block, eight legacy blocks):
//   1. weights: each thread decodes whole 32-groups with tp::unpack_group into int8 and stores them as
//      packed int32 words (element 4j+b in byte b) in ws[row][word], scales in wd/wm;
//   2. activations: the int8 rows from scratch are copied 16 bytes at a time into xs[token][word],
//      (d, s) into xd;
//   3. per group: the integer sums S[row][tok] = Σ_i q_w·q_x over the 32 elements (or the two 16-halves
//      for Q6_K) — with mma.sync m16n8k32 (m16n8k16 for the halves) on sm_80+, __dp4a on sm_75; both
//      give the same exact integers — then acc += tp::group_dot(...) in f32, in k order.
// The smem row stride is 64 + 4 words: fragment loads read words (8 rows g) × (4 words t) and
// (68·g + t) mod 32 = 4g + t hits every bank once.
//
// MMA fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k32 / m16n8k16", integer types), with
// g = lane >> 2 and t = lane & 3, each register holding 4 consecutive k in ascending bytes:
//   m16n8k32 A (16×32, row): a0 = (row g, k 4t..), a1 = (row g+8, k 4t..), a2 = (row g, k 16+4t..),
//                            a3 = (row g+8, k 16+4t..)
//            B (32×8, col):  b0 = (k 4t.., col g), b1 = (k 16+4t.., col g)
//   m16n8k16 A: a0 = (row g, k 4t..), a1 = (row g+8, k 4t..);  B: b0 = (k 4t.., col g)
//   C (16×8 s32, both):      c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
// so the k32 A/B registers are the k16 ones of the low half followed by those of the high half.
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/matmul.cuh"
#include "quant/unpack.h"

namespace tp {
namespace cuda_mm {
namespace {

constexpr int kMmqRows = 64;                 // weight rows per CTA
constexpr int kMmqToks = kMoeMmqTile;        // tokens per CTA
constexpr int kMmqGroups = 8;                // 32-groups per k step (256 elements)
constexpr int kMmqWords = kMmqGroups * 8;    // int32 words of int8 quants per row per k step
constexpr int kMmqStride = kMmqWords + 4;    // padded row stride in words (bank-conflict free, 16B aligned)
constexpr int kMmqThreads = 128;

static_assert((kMmqStride * 4) % 16 == 0, "xs rows must stay 16-byte aligned for int4 stores");

__device__ __forceinline__ int pack4(const int8_t* q) {
  return int(uint32_t(uint8_t(q[0])) | (uint32_t(uint8_t(q[1])) << 8) | (uint32_t(uint8_t(q[2])) << 16) |
             (uint32_t(uint8_t(q[3])) << 24));
}

#if TP_ARCH >= 800
__device__ __forceinline__ void mma_k32(int (&c)[4], const int (&a)[4], int b0, int b1) {
#if defined(TP_CUDA_EMULATE)
  tp_emu::mma_s8_m16n8k32(c, a, b0, b1);
#else
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ void mma_k16(int (&c)[4], int a0, int a1, int b0) {
#if defined(TP_CUDA_EMULATE)
  tp_emu::mma_s8_m16n8k16(c, a0, a1, b0);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(b0));
#endif
}
#endif

// One 64-row × 64-column output tile. w: the matrix's first row (rows of row_bytes); columns n < n_valid read
// activation row src[n] and write out[dst[n] * rows + r] (+ bias[r] when bias is not null); src and dst are
// shared memory, written before the call and followed by a __syncthreads.
template <class B>
__device__ __forceinline__ void mmq_tile(float* __restrict__ out, const uint8_t* __restrict__ w, int64_t row_bytes,
                                         int64_t rows, int64_t k, const int8_t* __restrict__ xq,
                                         const float2* __restrict__ xds, int64_t row0, int n_valid, const int* src,
                                         const int* dst, const float* __restrict__ bias) {
  using U = Unpack<B>;
  __shared__ __align__(16) int ws[kMmqRows * kMmqStride];
  __shared__ __align__(16) int xs[kMmqToks * kMmqStride];
  __shared__ float2 wd[kMmqRows * kMmqGroups];  // (d[0], d[1]) per (row, group)
  __shared__ float wm[kMmqRows * kMmqGroups];   // m per (row, group)
  __shared__ float2 xd[kMmqToks * kMmqGroups];  // (d, s = d·Σq) per (token, group)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wr = (warp & 1) * 32, wt = (warp >> 1) * 32;  // this warp's 32×32 sub-tile
  const int64_t n_groups = k / 32;

  float acc[2][4][4];  // [m16 sub-tile][n8 sub-tile][C fragment element]
#pragma unroll
  for (int ms = 0; ms < 2; ++ms)
#pragma unroll
    for (int ns = 0; ns < 4; ++ns)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[ms][ns][i] = 0.0f;

  for (int64_t g0 = 0; g0 < n_groups; g0 += kMmqGroups) {
    const int ng = n_groups - g0 < kMmqGroups ? int(n_groups - g0) : kMmqGroups;  // groups in this step

    // 1. weights. Rows past the end decode as zeros so the MMA tiles stay full.
    for (int i = tid; i < kMmqRows * kMmqGroups; i += kMmqThreads) {
      const int r = i / kMmqGroups, gi = i % kMmqGroups;
      if (gi >= ng) continue;
      int8_t q[32];
      WGroup wgp = {{0.0f, 0.0f}, 0.0f};
      if (row0 + r < rows) {
        const B* row = reinterpret_cast<const B*>(w + (row0 + r) * row_bytes);
        wgp = unpack_row_group(row, g0 + gi, q);
      } else {
#pragma unroll
        for (int j = 0; j < 32; ++j) q[j] = 0;
      }
      int* dst = ws + r * kMmqStride + gi * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = pack4(q + 4 * j);
      wd[i] = make_float2(wgp.d[0], wgp.d[1]);
      wm[i] = wgp.m;
    }
    // 2. activations, 16 bytes per load (two per group).
    for (int i = tid; i < kMmqToks * kMmqGroups * 2; i += kMmqThreads) {
      const int n = i / (kMmqGroups * 2), c = i % (kMmqGroups * 2);
      if (c >= 2 * ng) continue;
      int4 v = make_int4(0, 0, 0, 0);
      if (n < n_valid) v = *reinterpret_cast<const int4*>(xq + int64_t(src[n]) * k + g0 * 32 + c * 16);
      *reinterpret_cast<int4*>(xs + n * kMmqStride + c * 4) = v;
    }
    for (int i = tid; i < kMmqToks * kMmqGroups; i += kMmqThreads) {
      const int n = i / kMmqGroups, gi = i % kMmqGroups;
      if (gi >= ng) continue;
      xd[i] = n < n_valid ? xds[int64_t(src[n]) * n_groups + g0 + gi] : make_float2(0.0f, 0.0f);
    }
    __syncthreads();

    // 3. integer dot products and their f32 combination, group by group.
    for (int gi = 0; gi < ng; ++gi) {
      WGroup wf[2][2];  // [ms][row g / g+8]
      AGroup af[4][2];  // [ns][token 2t / 2t+1]
#pragma unroll
      for (int ms = 0; ms < 2; ++ms)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wr + ms * 16 + g + 8 * h;
          const float2 d = wd[r * kMmqGroups + gi];
          wf[ms][h] = {{d.x, d.y}, wm[r * kMmqGroups + gi]};
        }
#pragma unroll
      for (int ns = 0; ns < 4; ++ns)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float2 d = xd[(wt + ns * 8 + 2 * t + h) * kMmqGroups + gi];
          af[ns][h] = {d.x, d.y};
        }

#if TP_ARCH >= 800
      int a[2][4];
#pragma unroll
      for (int ms = 0; ms < 2; ++ms) {
        const int* p = ws + (wr + ms * 16 + g) * kMmqStride + gi * 8 + t;
        a[ms][0] = p[0];
        a[ms][1] = p[8 * kMmqStride];
        a[ms][2] = p[4];
        a[ms][3] = p[8 * kMmqStride + 4];
      }
#pragma unroll
      for (int ns = 0; ns < 4; ++ns) {
        const int* p = xs + (wt + ns * 8 + g) * kMmqStride + gi * 8 + t;
        const int b0 = p[0], b1 = p[4];
#pragma unroll
        for (int ms = 0; ms < 2; ++ms) {
          int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
          if constexpr (U::kSplit) {
            mma_k16(lo, a[ms][0], a[ms][1], b0);
            mma_k16(hi, a[ms][2], a[ms][3], b1);
          } else {
            mma_k32(lo, a[ms], b0, b1);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i)
            acc[ms][ns][i] += group_dot<U::kSplit, U::kOffset>(wf[ms][i >> 1], af[ns][i & 1], lo[i], hi[i]);
        }
      }
#else
      // sm_75: the same integers with __dp4a, element by element of the C fragment layout above.
#pragma unroll
      for (int ns = 0; ns < 4; ++ns)
#pragma unroll
        for (int ms = 0; ms < 2; ++ms)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int* pw = ws + (wr + ms * 16 + g + 8 * (i >> 1)) * kMmqStride + gi * 8;
            const int* px = xs + (wt + ns * 8 + 2 * t + (i & 1)) * kMmqStride + gi * 8;
            int lo = 0, hi = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              lo = __dp4a(pw[j], px[j], lo);
              hi = __dp4a(pw[j + 4], px[j + 4], hi);
            }
            acc[ms][ns][i] += group_dot<U::kSplit, U::kOffset>(wf[ms][i >> 1], af[ns][i & 1], lo, hi);
          }
#endif
    }
    __syncthreads();
  }

#pragma unroll
  for (int ms = 0; ms < 2; ++ms)
#pragma unroll
    for (int ns = 0; ns < 4; ++ns)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t r = row0 + wr + ms * 16 + g + 8 * (i >> 1);
        const int n = wt + ns * 8 + 2 * t + (i & 1);
        if (r < rows && n < n_valid)
          out[int64_t(dst[n]) * rows + r] = bias ? __fadd_rn(acc[ms][ns][i], bias[r]) : acc[ms][ns][i];
      }
}

// The dense matmul: CTA (x, y) computes rows 64x.. of tokens 64y...
template <class B>
__global__ void __launch_bounds__(kMmqThreads)
    mmq_kernel(float* __restrict__ out, const uint8_t* __restrict__ w, int64_t row_bytes, int64_t rows, int64_t k,
               const int8_t* __restrict__ xq, const float2* __restrict__ xds, int64_t n_tok) {
  __shared__ int rows_of[kMmqToks];
  const int64_t tok0 = int64_t(blockIdx.y) * kMmqToks;
  const int n_valid = n_tok - tok0 < kMmqToks ? int(n_tok - tok0) : kMmqToks;
  for (int i = threadIdx.x; i < kMmqToks; i += kMmqThreads) rows_of[i] = int(tok0) + i;
  __syncthreads();
  mmq_tile<B>(out, w, row_bytes, rows, k, xq, xds, int64_t(blockIdx.x) * kMmqRows, n_valid, rows_of, rows_of,
              nullptr);
}

// The grouped expert matmul: CTA (x, y) computes rows 64x.. of expert tiles[y].expert for that entry's slots;
// entries past the last used one (expert -1) exit at once (the host launches an upper bound, matmul_moe.cu).
template <class B>
__global__ void __launch_bounds__(kMmqThreads)
    mmq_moe_kernel(float* __restrict__ out, const uint8_t* __restrict__ w, int64_t row_bytes, int64_t rows, int64_t k,
                   const int8_t* __restrict__ xq, const float2* __restrict__ xds, MoeRoute route,
                   const float* __restrict__ bias) {
  __shared__ int src[kMmqToks], dst[kMmqToks];
  const MoeTile tile = route.tiles[blockIdx.y];
  if (tile.expert < 0) return;  // CTA-uniform, before any barrier
  for (int i = threadIdx.x; i < tile.count; i += kMmqThreads) {
    const int s = route.order[tile.begin + i];
    src[i] = route.per_slot ? s : s / route.k;
    dst[i] = s;
  }
  __syncthreads();
  mmq_tile<B>(out, w + int64_t(tile.expert) * rows * row_bytes, row_bytes, rows, k, xq, xds,
              int64_t(blockIdx.x) * kMmqRows, tile.count, src, dst,
              bias ? bias + int64_t(tile.expert) * rows : nullptr);
}


}  // namespace

template <class B>
cudaError_t mmq_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                       int64_t n_tok, cudaStream_t stream) {
  const int64_t gx = (rows + kMmqRows - 1) / kMmqRows, gy = (n_tok + kMmqToks - 1) / kMmqToks;
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidConfiguration;
  TP_LAUNCH(mmq_kernel<B>, dim3(unsigned(gx), unsigned(gy)), kMmqThreads, 0, stream, out,
            static_cast<const uint8_t*>(w), row_bytes, rows, k, x.q, x.ds, n_tok);
  return cudaGetLastError();
}

template <class B>
cudaError_t mmq_moe_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                           MoeRoute route, int64_t max_tiles, const float* bias, cudaStream_t stream) {
  const int64_t gx = (rows + kMmqRows - 1) / kMmqRows;
  if (gx > 0x7fffffff || max_tiles > 65535) return cudaErrorInvalidConfiguration;
  if (route.tile_size != kMmqToks) return cudaErrorInvalidValue;  // the tile table was cut for another kernel
  TP_LAUNCH(mmq_moe_kernel<B>, dim3(unsigned(gx), unsigned(max_tiles)), kMmqThreads, 0, stream, out,
            static_cast<const uint8_t*>(w), row_bytes, rows, k, x.q, x.ds, route, bias);
  return cudaGetLastError();
}

}  // namespace cuda_mm
}  // namespace tp
