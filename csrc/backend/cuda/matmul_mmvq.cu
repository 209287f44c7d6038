// matmul_mmvq.cu — small-batch (n_tok <= 8) int8 matmul: one warp per weight row, dp4a over 32-groups.
//
// Lane l takes the row's groups l, l+32, ...: it decodes the group once with tp::unpack_group (kept in
// registers as 8 packed int32 words), then for each token reads the matching 32 int8 activations (two
// 16-byte loads from scratch; rows are 16-byte aligned because k is a multiple of 32), forms the exact
// integer half-sums with __dp4a and adds tp::group_dot to that token's f32 accumulator. A butterfly
// shuffle then sums the 32 lanes. Every lane of a warp works on the same row, so the early exit for rows
// past the end is warp-uniform and the full-mask shuffles are safe.
//
// The row body (mmvq_row) reads its up-to-8 activation rows through src[] and writes through dst[]: the
// dense kernel passes 0..n_tok-1; the grouped expert kernel (matmul_moe.cu) passes the slots of one tile
// of the expert-sorted slot list (at most kMmvMaxTok slots of one expert), so a warp streams its expert's
// weight row once for all of that expert's slots.
#include <cuda_runtime.h>

#include "backend/cuda/matmul.cuh"
#include "quant/unpack.h"

namespace tp {
namespace cuda_mm {
namespace {

constexpr int kMmvqWarps = 4;  // rows per CTA

// Row r of the matrix at w against activation rows src[t] (t < n_tok <= 8); lane 0 writes
// out[dst[t] * rows + r] (+ bias_r when has_bias).
template <class B>
__device__ __forceinline__ void mmvq_row(float* __restrict__ out, const uint8_t* __restrict__ w, int64_t row_bytes,
                                         int64_t rows, int64_t k, const int8_t* __restrict__ xq,
                                         const float2* __restrict__ xds, int64_t r, int n_tok,
                                         const int (&src)[kMmvMaxTok], const int (&dst)[kMmvMaxTok], bool has_bias,
                                         float bias_r) {
  using U = Unpack<B>;
  const int lane = threadIdx.x & 31;
  const int64_t n_groups = k / 32;
  const B* row = reinterpret_cast<const B*>(w + r * row_bytes);

  float acc[kMmvMaxTok];
#pragma unroll
  for (int t = 0; t < kMmvMaxTok; ++t) acc[t] = 0.0f;

  for (int64_t gi = lane; gi < n_groups; gi += 32) {
    int8_t q[32];
    const WGroup wg = unpack_row_group(row, gi, q);
    int wq[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      wq[j] = int(uint32_t(uint8_t(q[4 * j])) | (uint32_t(uint8_t(q[4 * j + 1])) << 8) |
                  (uint32_t(uint8_t(q[4 * j + 2])) << 16) | (uint32_t(uint8_t(q[4 * j + 3])) << 24));
#pragma unroll
    for (int t = 0; t < kMmvMaxTok; ++t) {
      if (t < n_tok) {
        const int4* px = reinterpret_cast<const int4*>(xq + int64_t(src[t]) * k + gi * 32);
        const int4 x0 = px[0], x1 = px[1];
        int lo = __dp4a(wq[0], x0.x, 0);
        lo = __dp4a(wq[1], x0.y, lo);
        lo = __dp4a(wq[2], x0.z, lo);
        lo = __dp4a(wq[3], x0.w, lo);
        int hi = __dp4a(wq[4], x1.x, 0);
        hi = __dp4a(wq[5], x1.y, hi);
        hi = __dp4a(wq[6], x1.z, hi);
        hi = __dp4a(wq[7], x1.w, hi);
        const float2 ds = xds[int64_t(src[t]) * n_groups + gi];
        acc[t] += group_dot<U::kSplit, U::kOffset>(wg, AGroup{ds.x, ds.y}, lo, hi);
      }
    }
  }

  warp_sum_store(acc, n_tok, lane, out, rows, r, dst, has_bias, bias_r);
}

template <class B>
__global__ void __launch_bounds__(kMmvqWarps * 32)
    mmvq_kernel(float* __restrict__ out, const uint8_t* __restrict__ w, int64_t row_bytes, int64_t rows, int64_t k,
                const int8_t* __restrict__ xq, const float2* __restrict__ xds, int n_tok) {
  const int64_t r = int64_t(blockIdx.x) * kMmvqWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // warp-uniform
  int idx[kMmvMaxTok];
#pragma unroll
  for (int t = 0; t < kMmvMaxTok; ++t) idx[t] = t;
  mmvq_row<B>(out, w, row_bytes, rows, k, xq, xds, r, n_tok, idx, idx, false, 0.0f);
}

// CTA (x, y): rows 4x.. of expert tiles[y].expert for that entry's (<= 8) slots; unused entries exit.
template <class B>
__global__ void __launch_bounds__(kMmvqWarps * 32)
    mmvq_moe_kernel(float* __restrict__ out, const uint8_t* __restrict__ w, int64_t row_bytes, int64_t rows, int64_t k,
                    const int8_t* __restrict__ xq, const float2* __restrict__ xds, MoeRoute route,
                    const float* __restrict__ bias) {
  const MoeTile tile = route.tiles[blockIdx.y];
  const int64_t r = int64_t(blockIdx.x) * kMmvqWarps + (threadIdx.x >> 5);
  if (tile.expert < 0 || r >= rows) return;  // warp-uniform; no barrier follows
  int src[kMmvMaxTok], dst[kMmvMaxTok];
#pragma unroll
  for (int t = 0; t < kMmvMaxTok; ++t) {
    const int s = t < tile.count ? route.order[tile.begin + t] : 0;
    src[t] = route.per_slot ? s : s / route.k;
    dst[t] = s;
  }
  const int64_t e = tile.expert;
  mmvq_row<B>(out, w + e * rows * row_bytes, row_bytes, rows, k, xq, xds, r, tile.count, src, dst, bias != nullptr,
              bias ? bias[e * rows + r] : 0.0f);
}

}  // namespace

template <class B>
cudaError_t mmvq_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                        int64_t n_tok, cudaStream_t stream) {
  if (n_tok > kMmvMaxTok) return cudaErrorInvalidValue;
  const int64_t grid = (rows + kMmvqWarps - 1) / kMmvqWarps;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TP_LAUNCH(mmvq_kernel<B>, unsigned(grid), kMmvqWarps * 32, 0, stream, out, static_cast<const uint8_t*>(w), row_bytes,
            rows, k, x.q, x.ds, int(n_tok));
  return cudaGetLastError();
}

template <class B>
cudaError_t mmvq_moe_launch(float* out, const void* w, int64_t row_bytes, int64_t rows, int64_t k, QuantAct x,
                            MoeRoute route, int64_t max_tiles, const float* bias, cudaStream_t stream) {
  if (route.tile_size != kMmvMaxTok) return cudaErrorInvalidValue;  // the tile table was cut for another kernel
  const int64_t gx = (rows + kMmvqWarps - 1) / kMmvqWarps;
  if (gx > 0x7fffffff || max_tiles > 65535) return cudaErrorInvalidConfiguration;
  TP_LAUNCH(mmvq_moe_kernel<B>, dim3(unsigned(gx), unsigned(max_tiles)), kMmvqWarps * 32, 0, stream, out,
            static_cast<const uint8_t*>(w), row_bytes, rows, k, x.q, x.ds, route, bias);
  return cudaGetLastError();
}

#define TP_MMVQ_INSTANTIATE(B)                                                                                  \
  template cudaError_t mmvq_launch<B>(float*, const void*, int64_t, int64_t, int64_t, QuantAct, int64_t,         \
                                      cudaStream_t);                                                             \
  template cudaError_t mmvq_moe_launch<B>(float*, const void*, int64_t, int64_t, int64_t, QuantAct, MoeRoute,    \
                                          int64_t, const float*, cudaStream_t);
TP_MMVQ_INSTANTIATE(block_q4_0)
TP_MMVQ_INSTANTIATE(block_q4_1)
TP_MMVQ_INSTANTIATE(block_q5_0)
TP_MMVQ_INSTANTIATE(block_q5_1)
TP_MMVQ_INSTANTIATE(block_q8_0)
TP_MMVQ_INSTANTIATE(block_q4_K)
TP_MMVQ_INSTANTIATE(block_q5_K)
TP_MMVQ_INSTANTIATE(block_q6_K)
TP_MMVQ_INSTANTIATE(block_mxfp4)
#undef TP_MMVQ_INSTANTIATE

}  // namespace cuda_mm
}  // namespace tp
