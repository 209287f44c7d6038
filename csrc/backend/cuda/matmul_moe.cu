// matmul_moe.cu — tp_moe_matmul_cuda: a MoE layer's expert matmul, all experts in one grouped launch.
//
// Slot i = t * k + j is token t's j-th expert choice (ids[i]). Nothing here leaves the GPU: the host knows
// n_tok, k and n_expert but not how many slots each expert got, so the per-expert work list is built on the
// device and the grid is launched over an upper bound.
//
// Per call, three kernels on the stream:
//   1. quantize: the input rows (n_tok rows, or n_tok·k when in_per_slot) -> int8 groups of 32 in scratch,
//      once (matmul.cu's quantize kernel; q, d, s as tp::quantize_group), however many experts read a row;
//   2. route (one CTA, below): per expert, a warp counts its slots with __ballot_sync/__popc; thread 0 scans
//      the counts into slot offsets and tile offsets; then each expert's warp writes its slots, in ascending
//      slot order, to order[offset_e ..] (a stable counting sort: the CPU's order) and its tile-table entries
//      (expert, begin, count <= tile size) to tiles[]; the entries after the last used one get expert -1;
//   3. the grouped int8 matmul over a grid (row tiles × max_tiles): CTA column y reads tiles[y] and multiplies
//      that expert's 64-row weight tile with the activation rows of that run of its slots (indexed through
//      order), writing out[slot] + the expert's bias row; expert -1 exits before doing anything. So each
//      expert's weights are read once per (row tile, slot tile), and unused experts cost nothing.
// Grouping strategy — why a tile table and not a grid over (row tile, expert, max tiles per expert): the
// number of tiles is bounded by max_tiles = ceil(n_slots / T) + min(n_expert, n_slots) (Σ_e ceil(n_e / T) <=
// Σ_e (n_e / T + 1) over the used experts), so the launch is at most min(n_expert, n_slots) CTAs per row tile
// wider than the work, instead of n_expert × ceil(n_slots / T) when any expert may take every slot.
// T = 64 (the MMQ tile, matmul_mmq.cuh) in general; when n_tok <= 8 (decode, short ubatches) no expert has
// more than n_tok <= 8 slots, and T = 8 selects the matrix-vector kernel (warp per weight row, matmul_mmvq.cu).
// Both grouped kernels share the dense kernels' tile/row bodies, so a slot's output is computed exactly as
// the dense int8 matmul computes that activation row (same integers, same f32 sequence).
// Float experts take a warp-per-(row, slot) kernel (matmul.cu) and need no routing.
//
// Scratch layout (tp_moe_matmul_cuda_scratch_bytes): [int8 q: n_src·k | float2 (d, s): n_src·k/32 |
// int32 order: n_slots | MoeTile: max_tiles], each part starting 256-byte aligned.
#include <cuda_runtime.h>

#include "backend/cuda/matmul.cuh"
#include "quant/unpack.h"

namespace tp {
namespace cuda_mm {
namespace {

constexpr int kRouteThreads = 512;

__global__ void __launch_bounds__(kRouteThreads)
    moe_route_kernel(int32_t* __restrict__ order, MoeTile* __restrict__ tiles, const int32_t* __restrict__ ids,
                     int n_slots, int n_expert, int tile_size, int max_tiles) {
  TP_DYNAMIC_SMEM(smem);
  int* count = reinterpret_cast<int*>(smem);  // [n_expert] slots per expert
  int* start = count + n_expert;              // [n_expert + 1] first slot of each expert in order[]
  int* tile0 = start + n_expert + 1;          // [n_expert + 1] first tile of each expert in tiles[]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const unsigned below = (1u << lane) - 1u;  // lanes before this one

  for (int e = warp; e < n_expert; e += n_warps) {
    int c = 0;
    for (int b = 0; b < n_slots; b += 32) {
      const int i = b + lane;
      c += __popc(__ballot_sync(0xffffffffu, i < n_slots && ids[i] == e));
    }
    if (lane == 0) count[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // serial exclusive scans: n_expert is at most a few hundred in practice
    int s = 0, tl = 0;
    for (int e = 0; e < n_expert; ++e) {
      start[e] = s;
      tile0[e] = tl;
      s += count[e];
      tl += (count[e] + tile_size - 1) / tile_size;
    }
    start[n_expert] = s;
    tile0[n_expert] = tl;
  }
  __syncthreads();
  for (int j = tile0[n_expert] + int(threadIdx.x); j < max_tiles; j += blockDim.x) tiles[j] = MoeTile{-1, 0, 0};
  for (int e = warp; e < n_expert; e += n_warps) {
    for (int j = lane; j < tile0[e + 1] - tile0[e]; j += 32) {
      const int b = j * tile_size, left = count[e] - b;
      tiles[tile0[e] + j] = MoeTile{e, start[e] + b, left < tile_size ? left : tile_size};
    }
    int pos = start[e];
    for (int b = 0; b < n_slots; b += 32) {
      const int i = b + lane;
      const bool hit = i < n_slots && ids[i] == e;
      const unsigned m = __ballot_sync(0xffffffffu, hit);
      if (hit) order[pos + __popc(m & below)] = i;
      pos += __popc(m);
    }
  }
}

struct MoeLayout {
  int64_t n_src, n_slots, tile, max_tiles;
  size_t q_off, ds_off, order_off, tiles_off, bytes;
};

MoeLayout moe_layout(int64_t k, int64_t n_expert, bool in_per_slot, int64_t n_tok, int64_t k_used) {
  MoeLayout l{};
  l.n_slots = n_tok * k_used;
  l.n_src = in_per_slot ? l.n_slots : n_tok;
  l.tile = n_tok <= kMmvMaxTok ? kMmvMaxTok : kMoeMmqTile;
  l.max_tiles = (l.n_slots + l.tile - 1) / l.tile + (n_expert < l.n_slots ? n_expert : l.n_slots);
  l.q_off = 0;
  l.ds_off = align256(size_t(l.n_src) * size_t(k));
  l.order_off = l.ds_off + align256(size_t(l.n_src) * size_t(k / 32) * sizeof(float2));
  l.tiles_off = l.order_off + align256(size_t(l.n_slots) * sizeof(int32_t));
  l.bytes = l.tiles_off + size_t(l.max_tiles) * sizeof(MoeTile);
  return l;
}

}  // namespace
}  // namespace cuda_mm
}  // namespace tp

size_t tp_moe_matmul_cuda_scratch_bytes(tp::GgmlType type, int64_t k, int64_t n_expert, bool in_per_slot,
                                        int64_t n_tok, int64_t k_used) {
  if (tp::cuda_mm::is_float_type(type) || k <= 0 || n_tok <= 0 || k_used <= 0 || n_expert <= 0) return 0;
  return tp::cuda_mm::moe_layout(k, n_expert, in_per_slot, n_tok, k_used).bytes;
}

cudaError_t tp_moe_matmul_cuda(float* out, const void* w, tp::GgmlType type, int64_t n_expert, int64_t rows, int64_t k,
                               const float* bias, const float* x, bool in_per_slot, const int32_t* ids, int64_t n_tok,
                               int64_t k_used, void* scratch, cudaStream_t stream) {
  using namespace tp::cuda_mm;
  if (rows < 0 || n_tok < 0 || k < 0 || k_used < 1 || n_expert < 1 || n_expert > kTpMoeMaxExperts)
    return cudaErrorInvalidValue;
  if (rows == 0 || n_tok == 0) return cudaSuccess;
  if (!out || !x || !ids || (k > 0 && !w) || n_tok * k_used > INT32_MAX) return cudaErrorInvalidValue;
  if (is_float_type(type))
    return moe_float_launch(out, w, type, n_expert, rows, k, bias, x, in_per_slot, ids, n_tok * k_used, k_used,
                            stream);
  return tp::visit_unpack_type(type, cudaErrorInvalidValue, [&](auto tag) -> cudaError_t {
    using B = typename decltype(tag)::type;
    constexpr int64_t kBlock = tp::Unpack<B>::kBlockElems;
    if (k == 0 || k % kBlock != 0 || !scratch) return cudaErrorInvalidValue;
    const int64_t row_bytes = k / kBlock * int64_t(sizeof(B));
    const MoeLayout l = moe_layout(k, n_expert, in_per_slot, n_tok, k_used);
    char* base = static_cast<char*>(scratch);
    int8_t* q = reinterpret_cast<int8_t*>(base + l.q_off);
    float2* ds = reinterpret_cast<float2*>(base + l.ds_off);
    int32_t* order = reinterpret_cast<int32_t*>(base + l.order_off);
    MoeTile* tiles = reinterpret_cast<MoeTile*>(base + l.tiles_off);

    cudaError_t e = quantize_launch(q, ds, x, l.n_src, k, stream);
    if (e != cudaSuccess) return e;
    const size_t smem = size_t(3 * n_expert + 2) * sizeof(int);  // <= 24 KiB at kTpMoeMaxExperts
    TP_LAUNCH(moe_route_kernel, 1, kRouteThreads, smem, stream, order, tiles, ids, int(l.n_slots), int(n_expert),
              int(l.tile), int(l.max_tiles));
    if ((e = cudaGetLastError()) != cudaSuccess) return e;

    const QuantAct xa{q, ds};
    const MoeRoute route{order, tiles, int32_t(k_used), in_per_slot, int32_t(l.tile)};
    if (l.tile == kMmvMaxTok)
      return mmvq_moe_launch<B>(out, w, row_bytes, rows, k, xa, route, l.max_tiles, bias, stream);
    return mmq_moe_launch<B>(out, w, row_bytes, rows, k, xa, route, l.max_tiles, bias, stream);
  });
}
