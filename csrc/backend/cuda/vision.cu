// vision.cu — the vision encoder's ops: segmented non-causal attention and a plain activation.
//
// Attention: one block per (8 consecutive queries, head), one warp per query. The block walks the key range
// spanned by its queries' segments (one window, or two when the 8 queries straddle a window edge) in tiles of
// 32 keys staged in shared memory (rows padded to head_dim + 1 floats against bank conflicts); lane j scores
// key j of the tile, each warp masks the keys outside its own segment, and an online softmax (running max m,
// sum l, output rescaled by e^(m_old - m_new)) accumulates p·v with lane c owning dims c, c + 32, ... All f32;
// it differs from the CPU's two-pass softmax (vision_ops.cpp) by the order of the sums only. Speed is
// secondary: the encoder's time is in its matmuls.
// Unary: the CPU's expressions with explicitly rounded operations; only expf differs (<= 2 ulp).
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/vision.cuh"

namespace {

constexpr int kWarps = 8, kTile = 32, kMaxPerLane = int(tp::kTpAttnSegMaxHeadDim) / 32;

// The segment holding token t: the last s with seg[s] <= t (binary search over n_seg + 1 bounds).
__device__ int64_t seg_of(const int32_t* seg, int64_t n_seg, int64_t t) {
  int64_t lo = 0, hi = n_seg;  // invariant: seg[lo] <= t < seg[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (seg[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}

__global__ void attention_seg_kernel(float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                                     int n_head, int hd, float scale, const int32_t* seg, int64_t n_seg) {
  TP_DYNAMIC_SMEM(smem);
  const int ld_s = hd + 1;
  float* sk = reinterpret_cast<float*>(smem);  // [kTile][hd + 1]
  float* sv = sk + kTile * ld_s;               // [kTile][hd + 1]
  float* sq = sv + kTile * ld_s;               // [kWarps][hd]
  float* sp = sq + kWarps * hd;                // [kWarps][kTile]
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, h = int(blockIdx.y);
  const int64_t ld = int64_t(n_head) * hd;
  const int64_t i0 = int64_t(blockIdx.x) * kWarps, i = i0 + warp;
  const int64_t i_last = (i0 + kWarps < n_tok ? i0 + kWarps : n_tok) - 1;
  const int64_t lo = seg[seg_of(seg, n_seg, i0)], hi = seg[seg_of(seg, n_seg, i_last) + 1];
  const bool active = i < n_tok;
  int64_t a = 0, b = 0;  // this warp's keys [a, b)
  if (active) {
    const int64_t s = seg_of(seg, n_seg, i);
    a = seg[s];
    b = seg[s + 1];
    for (int d = lane; d < hd; d += 32) sq[warp * hd + d] = q[i * ld + int64_t(h) * hd + d];
  }
  float m = -INFINITY, l = 0.0f, acc[kMaxPerLane];
  for (int c = 0; c < kMaxPerLane; ++c) acc[c] = 0.0f;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    __syncthreads();  // the previous tile is consumed
    const int n_t = int(hi - t0 < kTile ? hi - t0 : kTile);
    for (int e = int(threadIdx.x); e < n_t * hd; e += int(blockDim.x)) {
      const int j = e / hd, d = e % hd;
      const int64_t src = (t0 + j) * ld + int64_t(h) * hd + d;
      sk[j * ld_s + d] = k[src];
      sv[j * ld_s + d] = v[src];
    }
    __syncthreads();
    if (!active) continue;
    const int64_t key = t0 + lane;
    float s = -INFINITY;
    if (lane < n_t && key >= a && key < b) {
      float dot = 0.0f;
      for (int d = 0; d < hd; ++d) dot = fmaf(sq[warp * hd + d], sk[lane * ld_s + d], dot);
      s = dot * scale;
    }
    const float m_new = fmaxf(m, tp_warp_max(s));
    if (m_new == -INFINITY) continue;  // no key of this warp's segment in the tile yet
    const float corr = expf(m - m_new);  // 0 on the first tile with keys (m = -inf)
    const float p = s == -INFINITY ? 0.0f : expf(s - m_new);
    l = l * corr + tp_warp_sum(p);
    m = m_new;
    sp[warp * kTile + lane] = p;
    __syncwarp();
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d >= hd) break;
      float o = acc[c] * corr;
      for (int j = 0; j < n_t; ++j) o = fmaf(sp[warp * kTile + j], sv[j * ld_s + d], o);
      acc[c] = o;
    }
    __syncwarp();  // sp is rewritten by the next tile
  }
  if (!active) return;
  const float inv = 1.0f / l;
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < hd) out[i * ld + int64_t(h) * hd + d] = acc[c] * inv;
  }
}

__global__ void unary_kernel(float* out, const float* in, int64_t n, tp::Activation act) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = in[i];
    float z = -x;
    if (act == tp::Activation::GeluTanh) {
      const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, x), x), x);
      z = __fmul_rn(-2.0f, __fmul_rn(0.7978845608028654f, __fadd_rn(x, cube)));
    }
    out[i] = __fdiv_rn(x, __fadd_rn(1.0f, expf(z)));
  }
}

}  // namespace

cudaError_t tp_attention_seg_cuda(float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                                  int64_t n_head, int64_t head_dim, float kq_scale, const int32_t* seg, int64_t n_seg,
                                  cudaStream_t stream) {
  if (n_tok < 0 || n_head <= 0 || head_dim <= 0 || head_dim > tp::kTpAttnSegMaxHeadDim || n_seg < 1 || !seg ||
      n_head > 65535 || (n_tok + kWarps - 1) / kWarps > INT32_MAX)
    return cudaErrorInvalidValue;
  if (n_tok == 0) return cudaSuccess;
  const int hd = int(head_dim);
  const size_t smem = size_t(2 * kTile * (hd + 1) + kWarps * hd + kWarps * kTile) * sizeof(float);
  const dim3 grid(unsigned((n_tok + kWarps - 1) / kWarps), unsigned(n_head));
  TP_LAUNCH(attention_seg_kernel, grid, kWarps * 32, smem, stream, out, q, k, v, n_tok, int(n_head), hd, kq_scale,
            seg, n_seg);
  return cudaGetLastError();
}

cudaError_t tp_unary_cuda(float* out, const float* in, int64_t n, tp::Activation act, cudaStream_t stream) {
  if (n < 0 || (act != tp::Activation::Silu && act != tp::Activation::GeluTanh)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  TP_LAUNCH(unary_kernel, tp_grid_blocks(n, 256), 256, 0, stream, out, in, n, act);
  return cudaGetLastError();
}
