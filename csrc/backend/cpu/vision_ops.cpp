// vision_ops.cpp — CPU kernels of the vision encoder's ops (backend/ops.h "vision encoder"): segmented
// non-causal attention over explicit q/k/v, and a plain activation.
//
// Attention: work items are (block of up to kQBlock queries of one segment, head); a segment is at most a few
// thousand patches (a full-attention layer sees the whole image), so each item materializes its rows' scores
// against the segment's keys ([4, seg_len] floats per thread) and takes an exact two-pass softmax: max, then
// p_j = e^(s_j - max) (vexp, kernels.h) and their sum, then out = Σ_j p_j v_j / Σ_j p_j in key order. Four
// query rows share each key/value load. Dims go a vector at a time, the head_dim % W tail in scalar, so any
// head_dim works (Qwen2.5-VL's is 80). A row's result depends only on its own segment, never on the block
// split or the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/kernels.h"
#include "common.h"

namespace tp {

namespace {

constexpr int64_t kQBlock = 16;
constexpr int kRows = 4;  // query rows sharing each key/value load

// nr (<= kRows) query rows q[r] against n_key keys (K + j*ld, V + j*ld, hd dims each); out[r] gets the rows'
// attention outputs. sc: nr * n_key floats of scratch.
template <int W>
TP_VINLINE void seg_rows_impl(int nr, const float* const* q, const float* K, const float* V, int64_t ld, int64_t hd,
                              int64_t n_key, float scale, float* sc, float* const* out) {
  typedef typename VecT<W>::f vf;
  const int64_t hv = hd / W * W;
  for (int64_t j = 0; j < n_key; ++j) {
    const float* kr = K + j * ld;
    vf acc[kRows] = {};
    for (int64_t d = 0; d < hv; d += W) {
      const vf kv = vld<W>(kr + d);
      for (int r = 0; r < nr; ++r) acc[r] += vld<W>(q[r] + d) * kv;
    }
    for (int r = 0; r < nr; ++r) {
      float s = 0.0f;
      for (int l = 0; l < W; ++l) s += acc[r][l];
      for (int64_t d = hv; d < hd; ++d) s += q[r][d] * kr[d];
      sc[r * n_key + j] = s * scale;
    }
  }
  float inv_l[kRows];
  for (int r = 0; r < nr; ++r) {
    float* p = sc + r * n_key;
    float m = -INFINITY;
    for (int64_t j = 0; j < n_key; ++j) m = std::max(m, p[j]);
    int64_t j = 0;
    vf lv = {};
    for (; j + W <= n_key; j += W) {
      const vf e = vexp<W>(vld<W>(p + j) - m);
      vst<W>(p + j, e);
      lv += e;
    }
    float l = 0.0f;
    for (int t = 0; t < W; ++t) l += lv[t];
    for (; j < n_key; ++j) {
      p[j] = std::exp(p[j] - m);
      l += p[j];
    }
    inv_l[r] = 1.0f / l;
  }
  for (int64_t d = 0; d < hv; d += W) {
    vf acc[kRows] = {};
    for (int64_t j = 0; j < n_key; ++j) {
      const vf vv = vld<W>(V + j * ld + d);
      for (int r = 0; r < nr; ++r) acc[r] += sc[r * n_key + j] * vv;
    }
    for (int r = 0; r < nr; ++r) vst<W>(out[r] + d, acc[r] * inv_l[r]);
  }
  for (int64_t d = hv; d < hd; ++d)
    for (int r = 0; r < nr; ++r) {
      float a = 0.0f;
      for (int64_t j = 0; j < n_key; ++j) a += sc[r * n_key + j] * V[j * ld + d];
      out[r][d] = a * inv_l[r];
    }
}
TP_VEC_VARIANTS(seg_rows,
                (int nr, const float* const* q, const float* K, const float* V, int64_t ld, int64_t hd, int64_t n_key,
                 float scale, float* sc, float* const* out),
                (nr, q, K, V, ld, hd, n_key, scale, sc, out))

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
  // Work items: (segment s, first query q0) blocks, then per head.
  std::vector<int64_t> blk_seg, blk_q0;
  int64_t max_len = 0;
  for (int64_t s = 0; s < n_seg; ++s) {
    if (seg[s + 1] < seg[s])
      fail(TP_ERR_INTERNAL, "attention_seg: segment %lld ends (%d) before it starts (%d)", (long long)s, seg[s + 1],
           seg[s]);
    max_len = std::max<int64_t>(max_len, seg[s + 1] - seg[s]);
    for (int64_t q0 = seg[s]; q0 < seg[s + 1]; q0 += kQBlock) {
      blk_seg.push_back(s);
      blk_q0.push_back(q0);
    }
  }
  const int64_t nh = p.n_head, hd = p.head_dim, ld = nh * hd, n_blk = int64_t(blk_seg.size());
  pool.parallel_for(n_blk * nh, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> sc;
    if (int64_t(sc.size()) < kRows * max_len) sc.resize(size_t(kRows * max_len));
    for (int64_t w = b; w < e; ++w) {
      const int64_t blk = w / nh, h = w % nh, s = blk_seg[size_t(blk)];
      const int64_t k0 = seg[s], n_key = seg[s + 1] - k0;
      const int64_t q_end = std::min<int64_t>(blk_q0[size_t(blk)] + kQBlock, seg[s + 1]);
      for (int64_t i = blk_q0[size_t(blk)]; i < q_end; i += kRows) {
        const int nr = int(std::min<int64_t>(kRows, q_end - i));
        const float* qr[kRows];
        float* orow[kRows];
        for (int r = 0; r < nr; ++r) {
          qr[r] = q + (i + r) * ld + h * hd;
          orow[r] = out + (i + r) * ld + h * hd;
        }
        seg_rows(nr, qr, k + k0 * ld + h * hd, v + k0 * ld + h * hd, ld, hd, n_key, p.kq_scale, sc.data(), orow);
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
