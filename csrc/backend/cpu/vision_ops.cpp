// vision_ops.cpp — CPU kernels of the vision encoder's ops (backend/ops.h "vision encoder"): segmented
// non-causal attention over explicit q/k/v, and a plain activation.
//
// Attention is a GEMM-shaped flash attention. Every segment is cut into key tiles of kKeyTile keys, and each
// (head, tile) is packed once per call, before any scores: keys transposed ([head_dim][kKeyTile], so the
// score micro-kernel loads keys with contiguous vector loads, keys in the lanes, no horizontal sums) and
// values as rows ([kKeyTile][head_dim]), zeros past the segment's end. Work items are (query block of up to
// kQBlock rows of one segment, head); the block's queries are transposed in groups of kRows
// ([head_dim][kRows]: one broadcast per row and dim). Per group and tile: S = scale · Q Kᵀ (kRows × NC
// vectors of keys in registers), an online softmax per row (running max m and sum l; the row's output so far
// is rescaled by e^(m_old - m_new)), then O += P V (kRows × NV vectors of dims in registers; the head_dim %
// W tail in scalar, so any head_dim works). Tiles go in key order and a row's arithmetic never depends on
// the other rows of its group, the block split or the thread count, so results are deterministic.
// The key tile is the window size of Qwen2.5-VL (64 patches), so a window is one tile and one block.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/kernels.h"
#include "common.h"

namespace tp {

namespace {

constexpr int64_t kKeyTile = 64;  // keys per packed tile (a multiple of the widest score chunk, 4 × 16)
constexpr int64_t kQBlock = 96;   // query rows per work item: they share each packed tile from L1/L2
constexpr int kRows = 6;          // query rows per micro-kernel call (register blocking)

// Score chunk width (vectors of keys) and output chunk width (vectors of dims): kRows × 2 accumulators fit
// the 16 registers of AVX2/SSE, kRows × 4 the 32 of AVX-512.
template <int W>
constexpr int kVecs = W == 16 ? 4 : 2;

// sc[r][j0 .. j0 + NC·W) = scale · Σ_d qt[d][r] kt[d][j], for the group's kRows rows.
template <int W, int NC>
TP_VINLINE void score_chunk(const float* qt, const float* kt, int64_t hd, float scale, float* sc, int64_t j0) {
  typedef typename VecT<W>::f vf;
  vf acc[kRows][NC] = {};
  for (int64_t d = 0; d < hd; ++d) {
    vf kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = vld<W>(kt + d * kKeyTile + j0 + c * W);
    for (int r = 0; r < kRows; ++r) {
      const float qd = qt[d * kRows + r];
      for (int c = 0; c < NC; ++c) acc[r][c] += qd * kv[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NC; ++c) vst<W>(sc + r * kKeyTile + j0 + c * W, acc[r][c] * scale);
}

// acc[r][0 .. NV·W) = corr[r] · acc[r] + Σ_{j < n_key} p[r][j] vt[j], in key order (acc, vt offset to the chunk).
template <int W, int NV>
TP_VINLINE void pv_chunk(const float* p, const float* vt, int64_t hd, int64_t n_key, const float* corr, float* acc) {
  typedef typename VecT<W>::f vf;
  vf a[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) a[r][c] = vld<W>(acc + r * hd + c * W) * corr[r];
  for (int64_t j = 0; j < n_key; ++j) {
    vf vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = vld<W>(vt + j * hd + c * W);
    for (int r = 0; r < kRows; ++r) {
      const float pj = p[r * kKeyTile + j];
      for (int c = 0; c < NV; ++c) a[r][c] += pj * vv[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) vst<W>(acc + r * hd + c * W, a[r][c]);
}

// One group of kRows queries (qt: [hd][kRows]) against one packed tile (kt: [hd][kKeyTile], vt:
// [kKeyTile][hd]) of n_key (1 .. kKeyTile) valid keys. m, l: the rows' running max and sum; acc: [kRows][hd]
// unnormalized outputs; sc: [kRows][kKeyTile] scratch.
template <int W>
TP_VINLINE void group_tile_impl(const float* qt, const float* kt, const float* vt, int64_t hd, int64_t n_key,
                                float scale, float* m, float* l, float* acc, float* sc) {
  typedef typename VecT<W>::f vf;
  constexpr int NC = kVecs<W>, NV = kVecs<W>;
  const int64_t len = (n_key + NC * W - 1) / (NC * W) * (NC * W);  // scores computed: whole chunks
  for (int64_t j0 = 0; j0 < len; j0 += NC * W) score_chunk<W, NC>(qt, kt, hd, scale, sc, j0);
  float corr[kRows];
  for (int r = 0; r < kRows; ++r) {
    float* s = sc + r * kKeyTile;
    std::fill(s + n_key, s + len, -INFINITY);  // keys past the segment's end: p = 0
    vf mv = vld<W>(s);
    for (int64_t j = W; j < len; j += W) {
      const vf x = vld<W>(s + j);
      mv = x > mv ? x : mv;
    }
    float mb = mv[0];
    for (int t = 1; t < W; ++t) mb = std::max(mb, mv[t]);
    const float m_new = std::max(m[r], mb);
    corr[r] = std::exp(m[r] - m_new);  // 0 on the row's first tile (m = -inf)
    vf lv = {};
    for (int64_t j = 0; j < len; j += W) {
      const vf e = vexp<W>(vld<W>(s + j) - m_new);
      vst<W>(s + j, e);
      lv += e;
    }
    float sum = 0.0f;
    for (int t = 0; t < W; ++t) sum += lv[t];
    l[r] = l[r] * corr[r] + sum;
    m[r] = m_new;
  }
  const int64_t hv = hd / W * W;
  int64_t d = 0;
  for (; d + NV * W <= hv; d += NV * W) pv_chunk<W, NV>(sc, vt + d, hd, n_key, corr, acc + d);
  for (; d < hv; d += W) pv_chunk<W, 1>(sc, vt + d, hd, n_key, corr, acc + d);
  for (; d < hd; ++d)
    for (int r = 0; r < kRows; ++r) {
      float a = acc[r * hd + d] * corr[r];
      for (int64_t j = 0; j < n_key; ++j) a += sc[r * kKeyTile + j] * vt[j * hd + d];
      acc[r * hd + d] = a;
    }
}
TP_VEC_VARIANTS(group_tile,
                (const float* qt, const float* kt, const float* vt, int64_t hd, int64_t n_key, float scale, float* m,
                 float* l, float* acc, float* sc),
                (qt, kt, vt, hd, n_key, scale, m, l, acc, sc))

// out = act(in) over [0, n): SiLU x / (1 + e^-x); GELU-tanh x / (1 + e^-2u), u = sqrt(2/pi) (x + 0.044715 x^3)
// (0.5 x (1 + tanh u) without tanh's cancellation; cpu_ops.cpp's glu uses the same expressions).
template <int W>
TP_VINLINE void unary_range_impl(float* out, const float* in, int64_t n, Activation act) {
  typedef typename VecT<W>::f vf;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf x = vld<W>(in + i);
    const vf z = act == Activation::Silu ? -x : -2.0f * (0.7978845608028654f * (x + 0.044715f * x * x * x));
    vst<W>(out + i, x / (1.0f + vexp<W>(z)));
  }
  for (; i < n; ++i) {
    const float x = in[i];
    const float z = act == Activation::Silu ? -x : -2.0f * (0.7978845608028654f * (x + 0.044715f * x * x * x));
    out[i] = x / (1.0f + std::exp(z));
  }
}
TP_VEC_VARIANTS(unary_range, (float* out, const float* in, int64_t n, Activation act), (out, in, n, act))

}  // namespace

void cpu_attention_seg(ThreadPool& pool, float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                       const AttnParams& p, const int32_t* seg, int64_t n_seg) {
  if (n_seg < 1 || seg[0] != 0 || seg[n_seg] != n_tok)
    fail(TP_ERR_INTERNAL, "attention_seg: %lld segments must cover the %lld tokens from 0", (long long)n_seg,
         (long long)n_tok);
  // Key tiles (first tile of each segment, segment of each tile) and work items ((segment, first query) blocks).
  std::vector<int64_t> seg_tile(size_t(n_seg + 1), 0), tile_seg, blk_seg, blk_q0;
  for (int64_t s = 0; s < n_seg; ++s) {
    if (seg[s + 1] < seg[s])
      fail(TP_ERR_INTERNAL, "attention_seg: segment %lld ends (%d) before it starts (%d)", (long long)s, seg[s + 1],
           seg[s]);
    const int64_t nt = (seg[s + 1] - seg[s] + kKeyTile - 1) / kKeyTile;
    seg_tile[size_t(s + 1)] = seg_tile[size_t(s)] + nt;
    tile_seg.insert(tile_seg.end(), size_t(nt), s);
    for (int64_t q0 = seg[s]; q0 < seg[s + 1]; q0 += kQBlock) {
      blk_seg.push_back(s);
      blk_q0.push_back(q0);
    }
  }
  const int64_t nh = p.n_head, hd = p.head_dim, ld = nh * hd, n_blk = int64_t(blk_seg.size());
  const int64_t n_tiles = seg_tile[size_t(n_seg)], tile_sz = kKeyTile * hd;
  // Packed tiles of head h, tile g at (h * n_tiles + g) * tile_sz: as large as k and v together. Kept by the
  // calling (stage) thread across calls: every layer of an image needs the same size, and allocating it anew
  // (~110 MB for a Full HD image in the real tower) would page-fault it in again on every layer.
  thread_local std::vector<float> kp, vp;
  if (int64_t(kp.size()) < nh * n_tiles * tile_sz) {
    kp.resize(size_t(nh * n_tiles * tile_sz));
    vp.resize(size_t(nh * n_tiles * tile_sz));
  }
  // (By pointer: inside the workers' lambdas the names kp, vp would mean the workers' own thread_locals.)
  float *kpack = kp.data(), *vpack = vp.data();
  pool.parallel_for(n_tiles * nh, 1, [&](int64_t b, int64_t e, int) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t g = w / nh, h = w % nh, s = tile_seg[size_t(g)];
      const int64_t k0 = seg[s] + (g - seg_tile[size_t(s)]) * kKeyTile;
      const int64_t nk = std::min<int64_t>(kKeyTile, seg[s + 1] - k0);
      float* kt = kpack + (h * n_tiles + g) * tile_sz;
      float* vt = vpack + (h * n_tiles + g) * tile_sz;
      for (int64_t j = 0; j < nk; ++j) {
        const float* kr = k + (k0 + j) * ld + h * hd;
        for (int64_t d = 0; d < hd; ++d) kt[d * kKeyTile + j] = kr[d];
        std::copy(v + (k0 + j) * ld + h * hd, v + (k0 + j) * ld + (h + 1) * hd, vt + j * hd);
      }
      for (int64_t d = 0; d < hd; ++d) std::fill(kt + d * kKeyTile + nk, kt + (d + 1) * kKeyTile, 0.0f);
      std::fill(vt + nk * hd, vt + tile_sz, 0.0f);
    }
  });
  constexpr int64_t kGroups = (kQBlock + kRows - 1) / kRows;
  pool.parallel_for(n_blk * nh, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> qt, acc, ml, sc;
    if (int64_t(qt.size()) < kGroups * kRows * hd) {
      qt.resize(size_t(kGroups * kRows * hd));
      acc.resize(size_t(kGroups * kRows * hd));
    }
    ml.resize(size_t(2 * kGroups * kRows));
    sc.resize(size_t(kRows * kKeyTile));
    for (int64_t w = b; w < e; ++w) {
      const int64_t blk = w / nh, h = w % nh, s = blk_seg[size_t(blk)], q0 = blk_q0[size_t(blk)];
      const int64_t n_rows = std::min<int64_t>(kQBlock, seg[s + 1] - q0), n_grp = (n_rows + kRows - 1) / kRows;
      // Queries transposed per group; rows past the block are zeros (computed, never written out).
      for (int64_t i = 0; i < n_grp * kRows; ++i) {
        float* dst = qt.data() + i / kRows * kRows * hd + i % kRows;
        for (int64_t d = 0; d < hd; ++d) dst[d * kRows] = i < n_rows ? q[(q0 + i) * ld + h * hd + d] : 0.0f;
      }
      float *m = ml.data(), *l = m + n_grp * kRows;
      std::fill(m, m + n_grp * kRows, -INFINITY);
      std::fill(l, l + n_grp * kRows, 0.0f);
      std::fill(acc.begin(), acc.begin() + n_grp * kRows * hd, 0.0f);
      for (int64_t g = seg_tile[size_t(s)]; g < seg_tile[size_t(s + 1)]; ++g) {
        const int64_t n_key = std::min<int64_t>(kKeyTile, seg[s + 1] - seg[s] - (g - seg_tile[size_t(s)]) * kKeyTile);
        const float* kt = kpack + (h * n_tiles + g) * tile_sz;
        const float* vt = vpack + (h * n_tiles + g) * tile_sz;
        for (int64_t gr = 0; gr < n_grp; ++gr)
          group_tile(qt.data() + gr * kRows * hd, kt, vt, hd, n_key, p.kq_scale, m + gr * kRows, l + gr * kRows,
                     acc.data() + gr * kRows * hd, sc.data());
      }
      for (int64_t i = 0; i < n_rows; ++i) {
        const float inv = 1.0f / l[i], *a = acc.data() + i * hd;
        float* o = out + (q0 + i) * ld + h * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = a[d] * inv;
      }
    }
  });
}

void cpu_unary(ThreadPool& pool, float* out, const float* in, int64_t n, Activation act) {
  if (act != Activation::Silu && act != Activation::GeluTanh)
    fail(TP_ERR_INTERNAL, "unary: only Silu and GeluTanh are plain activations");
  pool.parallel_for((n + 4095) / 4096, 1, [&](int64_t b, int64_t e, int) {
    const int64_t lo = b * 4096, hi = std::min(e * 4096, n);
    unary_range(out + lo, in + lo, hi - lo, act);
  });
}

}  // namespace tp
