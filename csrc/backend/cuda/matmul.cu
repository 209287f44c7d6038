// matmul.cu — tp_matmul_cuda: path selection, activation quantization and the float-weight kernels.
//
// Owns the scratch layout of the quantized activations (one allocation, caller-provided):
//   [0, align256(n_tok·k))              int8 q   [n_tok, k]      (row t starts at t·k: 16-byte aligned)
//   [align256(n_tok·k), + n_tok·k/32·8) float2 (d, s = d·Σq) [n_tok, k/32]
// Quantization: one warp per 32-group, one element per lane; amax and Σq by butterfly shuffles (exact in
// any order), then tp::q8_scale / q8_quantize / q8_sum, so q, d and s equal the CPU tp::quantize_group bit
// for bit. The int8 matmuls themselves live in matmul_mmq*.cu / matmul_mmvq.cu.
//
// F32/F16/BF16 weights are multiplied in f32 (elements converted exactly on load): a warp-per-row
// matrix-vector kernel for n_tok <= 8, else a 64×64-tile kernel (BK = 32, 4×4 outputs per thread). Rows,
// tokens and k need not be tile multiples: loads past an edge read zeros, stores are guarded. Float experts
// of a MoE layer (tp_moe_matmul_cuda) take a warp-per-(row, slot) kernel here too.
#include <cuda_runtime.h>

#include "backend/cuda/matmul.cuh"
#include "quant/unpack.h"

namespace tp {
namespace cuda_mm {
namespace {

constexpr int kQuantWarps = 8;  // 32-groups per CTA of the quantization kernel

__global__ void __launch_bounds__(kQuantWarps * 32)
    quantize_act_kernel(int8_t* __restrict__ q, float2* __restrict__ ds, const float* __restrict__ x,
                        int64_t n_groups) {
  const int64_t gi = int64_t(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  if (gi >= n_groups) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const float v = x[gi * 32 + lane];
  float amax = fabsf(v);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float d = q8_scale(amax);
  const int8_t qv = q8_quantize(v, d);
  int sum_q = qv;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum_q += __shfl_xor_sync(0xffffffffu, sum_q, off);
  q[gi * 32 + lane] = qv;
  if (lane == 0) ds[gi] = make_float2(d, q8_sum(d, sum_q));
}

// Exact element loads of the float weight types.
struct LoadF32 {
  static __device__ __forceinline__ float at(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
struct LoadF16 {
  static __device__ __forceinline__ float at(const void* p, int64_t i) {
    return unpack_f16(static_cast<const uint16_t*>(p)[i]);
  }
};
struct LoadBF16 {
  static __device__ __forceinline__ float at(const void* p, int64_t i) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
};

constexpr int kMmvfWarps = 4;

// n_tok <= 8: warp per row, lanes stride over k (coalesced for both operands).
template <class L>
__global__ void __launch_bounds__(kMmvfWarps * 32)
    mmv_float_kernel(float* __restrict__ out, const void* __restrict__ w, int64_t rows, int64_t k,
                     const float* __restrict__ x, int n_tok) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kMmvfWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // warp-uniform
  float acc[kMmvMaxTok];
#pragma unroll
  for (int t = 0; t < kMmvMaxTok; ++t) acc[t] = 0.0f;
  for (int64_t kk = lane; kk < k; kk += 32) {
    const float wv = L::at(w, r * k + kk);
#pragma unroll
    for (int t = 0; t < kMmvMaxTok; ++t)
      if (t < n_tok) acc[t] += wv * x[t * k + kk];
  }
  warp_sum_store(acc, n_tok, lane, out, rows, r);
}

constexpr int kMmfTile = 64, kMmfK = 32, kMmfThreads = 256;

// Thread (tx, ty) = (tid % 16, tid / 16) owns rows tx + 16i and tokens ty + 16j (i, j < 4): the 16 lanes of
// a half-warp read 16 different rows of wt (stride 33 floats: distinct banks), the two half-warps read the
// same addresses (broadcast), and xt reads are broadcasts too.
template <class L>
__global__ void __launch_bounds__(kMmfThreads)
    mm_float_kernel(float* __restrict__ out, const void* __restrict__ w, int64_t rows, int64_t k,
                    const float* __restrict__ x, int64_t n_tok) {
  __shared__ float wt[kMmfTile][kMmfK + 1];
  __shared__ float xt[kMmfTile][kMmfK + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = int64_t(blockIdx.x) * kMmfTile, tok0 = int64_t(blockIdx.y) * kMmfTile;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kMmfK) {
    for (int e = tid; e < kMmfTile * kMmfK; e += kMmfThreads) {
      const int i = e / kMmfK, c = e % kMmfK;
      const bool kin = k0 + c < k;
      wt[i][c] = kin && row0 + i < rows ? L::at(w, (row0 + i) * k + k0 + c) : 0.0f;
      xt[i][c] = kin && tok0 + i < n_tok ? x[(tok0 + i) * k + k0 + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kMmfK; ++c) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = wt[tx + 16 * i][c];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = xt[ty + 16 * j][c];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = row0 + tx + 16 * i, n = tok0 + ty + 16 * j;
      if (r < rows && n < n_tok) out[n * rows + r] = acc[i][j];
    }
}

template <class L>
cudaError_t launch_float(float* out, const void* w, int64_t rows, int64_t k, const float* x, int64_t n_tok,
                         cudaStream_t stream) {
  if (n_tok <= kMmvMaxTok) {
    const int64_t grid = (rows + kMmvfWarps - 1) / kMmvfWarps;
    if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
    TP_LAUNCH(mmv_float_kernel<L>, unsigned(grid), kMmvfWarps * 32, 0, stream, out, w, rows, k, x, int(n_tok));
  } else {
    const int64_t gx = (rows + kMmfTile - 1) / kMmfTile, gy = (n_tok + kMmfTile - 1) / kMmfTile;
    if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidConfiguration;
    TP_LAUNCH(mm_float_kernel<L>, dim3(unsigned(gx), unsigned(gy)), kMmfThreads, 0, stream, out, w, rows, k, x, n_tok);
  }
  return cudaGetLastError();
}

// Grouped expert matmul, float weights: warp per (row, slot). Each slot re-reads its expert's row (the f32
// experts of small test models only; real MoE checkpoints quantize their experts).
template <class L>
__global__ void __launch_bounds__(kMmvfWarps * 32)
    moe_float_kernel(float* __restrict__ out, const void* __restrict__ w, int64_t n_expert, int64_t rows, int64_t k,
                     const float* __restrict__ bias, const float* __restrict__ x, bool in_per_slot,
                     const int32_t* __restrict__ ids, int64_t n_slots, int64_t k_used) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kMmvfWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // warp-uniform
  for (int64_t i = blockIdx.y; i < n_slots; i += gridDim.y) {
    const int64_t e = ids[i];
    if (e < 0 || e >= n_expert) continue;  // outside the contract: leave the slot unwritten
    const float* xr = x + (in_per_slot ? i : i / k_used) * k;
    const int64_t wr = (e * rows + r) * k;
    float acc = 0.0f;
    for (int64_t kk = lane; kk < k; kk += 32) acc += L::at(w, wr + kk) * xr[kk];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[i * rows + r] = bias ? __fadd_rn(acc, bias[e * rows + r]) : acc;
  }
}

template <class L>
cudaError_t launch_moe_float(float* out, const void* w, int64_t n_expert, int64_t rows, int64_t k, const float* bias,
                             const float* x, bool in_per_slot, const int32_t* ids, int64_t n_slots, int64_t k_used,
                             cudaStream_t stream) {
  const int64_t gx = (rows + kMmvfWarps - 1) / kMmvfWarps, gy = n_slots < 65535 ? n_slots : 65535;
  if (gx > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TP_LAUNCH(moe_float_kernel<L>, dim3(unsigned(gx), unsigned(gy)), kMmvfWarps * 32, 0, stream, out, w, n_expert, rows,
            k, bias, x, in_per_slot, ids, n_slots, k_used);
  return cudaGetLastError();
}

}  // namespace

cudaError_t moe_float_launch(float* out, const void* w, GgmlType type, int64_t n_expert, int64_t rows, int64_t k,
                             const float* bias, const float* x, bool in_per_slot, const int32_t* ids, int64_t n_slots,
                             int64_t k_used, cudaStream_t stream) {
  switch (type) {
    case GgmlType::F32:
      return launch_moe_float<LoadF32>(out, w, n_expert, rows, k, bias, x, in_per_slot, ids, n_slots, k_used, stream);
    case GgmlType::F16:
      return launch_moe_float<LoadF16>(out, w, n_expert, rows, k, bias, x, in_per_slot, ids, n_slots, k_used, stream);
    case GgmlType::BF16:
      return launch_moe_float<LoadBF16>(out, w, n_expert, rows, k, bias, x, in_per_slot, ids, n_slots, k_used, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t quantize_launch(int8_t* q, float2* ds, const float* x, int64_t n_rows, int64_t k, cudaStream_t stream) {
  if (k % 32 != 0) return cudaErrorInvalidValue;
  const int64_t n_groups = n_rows * (k / 32);
  if (n_groups == 0) return cudaSuccess;
  const int64_t grid = (n_groups + kQuantWarps - 1) / kQuantWarps;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TP_LAUNCH(quantize_act_kernel, unsigned(grid), kQuantWarps * 32, 0, stream, q, ds, x, n_groups);
  return cudaGetLastError();
}

}  // namespace cuda_mm
}  // namespace tp

size_t tp_matmul_cuda_scratch_bytes(tp::GgmlType type, int64_t k, int64_t n_tok) {
  if (tp::cuda_mm::is_float_type(type) || k <= 0 || n_tok <= 0) return 0;
  return tp::cuda_mm::align256(size_t(n_tok) * size_t(k)) + size_t(n_tok) * size_t(k / 32) * sizeof(float2);
}

cudaError_t tp_matmul_cuda(float* out, const void* w, tp::GgmlType type, int64_t rows, int64_t k, const float* x,
                           int64_t n_tok, void* scratch, cudaStream_t stream) {
  using namespace tp::cuda_mm;
  if (rows < 0 || n_tok < 0 || k < 0) return cudaErrorInvalidValue;
  if (rows == 0 || n_tok == 0) return cudaSuccess;
  if (!out || !x || (k > 0 && !w)) return cudaErrorInvalidValue;
  switch (type) {
    case tp::GgmlType::F32: return launch_float<LoadF32>(out, w, rows, k, x, n_tok, stream);
    case tp::GgmlType::F16: return launch_float<LoadF16>(out, w, rows, k, x, n_tok, stream);
    case tp::GgmlType::BF16: return launch_float<LoadBF16>(out, w, rows, k, x, n_tok, stream);
    default: break;
  }
  return tp::visit_unpack_type(type, cudaErrorInvalidValue, [&](auto tag) -> cudaError_t {
    using B = typename decltype(tag)::type;
    constexpr int64_t kBlock = tp::Unpack<B>::kBlockElems;
    if (k == 0 || k % kBlock != 0 || !scratch) return cudaErrorInvalidValue;
    const int64_t row_bytes = k / kBlock * int64_t(sizeof(B));
    int8_t* q = static_cast<int8_t*>(scratch);
    float2* ds = reinterpret_cast<float2*>(static_cast<char*>(scratch) + align256(size_t(n_tok) * size_t(k)));
    const cudaError_t e = quantize_launch(q, ds, x, n_tok, k, stream);
    if (e != cudaSuccess) return e;
    const QuantAct xa{q, ds};
    if (n_tok <= kMmvMaxTok) return mmvq_launch<B>(out, w, row_bytes, rows, k, xa, n_tok, stream);
    return mmq_launch<B>(out, w, row_bytes, rows, k, xa, n_tok, stream);
  });
}
