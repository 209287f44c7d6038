// vision_ops.cpp — CPU kernels of the vision encoder's ops (backend/ops.h "vision encoder"): segmented
// non-causal attention over explicit q/k/v, and a plain activation.
//
// Attention: work items are (block of up to kQBlock queries of one segment, head). An item transposes the
// segment's keys of its head once ([head_dim, seg_len] per thread: the score loop then has keys in the vector
// lanes, no horizontal sums), materializes its rows' scores ([4, seg_len] per thread; a segment is at most the
// whole image, 65536 patches) and takes an exact two-pass softmax: max, then p_j = e^(s_j - max) (vexp,
// kernels.h) and their sum, then out = Σ_j p_j v_j / Σ_j p_j in key order, a vector of dims at a time (the
// head_dim % W tail in scalar, so any head_dim works; Qwen2.5-VL's is 80). Four query rows share each key and
// value load. A row's result depends only on its own segment, never on the block split or the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/kernels.h"
#include "common.h"

namespace tp {

namespace {

constexpr int64_t kQBlock = 64;
constexpr int kRows = 4;         // query rows sharing each key/value load
constexpr int64_t kKeyPad = 64;  // transposed key rows are padded to this (4 vectors of the widest ISA)

// out[r][d0 .. d0 + NV·W) = Σ_j p[r][j] V[j] / l_r over those dims: each pass over the keys keeps NV vectors per
// row in registers.
template <int W, int NV>
TP_VINLINE void pv_chunk(int nr, const float* sc, int64_t ldt, const float* V, int64_t ld, int64_t n_key,
                         const float* inv_l, float* const* out, int64_t d0) {
  typedef typename VecT<W>::f vf;
  vf acc[kRows][NV] = {};
  for (int64_t j = 0; j < n_key; ++j) {
    vf vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = vld<W>(V + j * ld + c * W);
    for (int r = 0; r < nr; ++r) {
      const float pj = sc[r * ldt + j];
      for (int c = 0; c < NV; ++c) acc[r][c] += pj * vv[c];
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < NV; ++c) vst<W>(out[r] + d0 + c * W, acc[r][c] * inv_l[r]);
}

// nr (<= kRows) query rows q[r] against n_key keys, given transposed (kt[d * ldt + j], zero past n_key up to
// ldt, a multiple of kKeyPad) and as rows (V + j*ld); out[r] gets the rows' outputs. sc: nr rows of ldt floats.
// Scores go 4 vectors of keys at a time (lane = key, d in order); p·v goes a vector of dims at a time.
template <int W>
TP_VINLINE void seg_rows_impl(int nr, const float* const* q, const float* kt, int64_t ldt, const float* V, int64_t ld,
                              int64_t hd, int64_t n_key, float scale, float* sc, float* const* out) {
  typedef typename VecT<W>::f vf;
  constexpr int NV = 4;
  for (int64_t j0 = 0; j0 < n_key; j0 += NV * W) {
    vf acc[kRows][NV] = {};
    for (int64_t d = 0; d < hd; ++d) {
      vf kv[NV];
      for (int c = 0; c < NV; ++c) kv[c] = vld<W>(kt + d * ldt + j0 + c * W);
      for (int r = 0; r < nr; ++r) {
        const float qd = q[r][d];
        for (int c = 0; c < NV; ++c) acc[r][c] += qd * kv[c];
      }
    }
    for (int r = 0; r < nr; ++r)
      for (int c = 0; c < NV; ++c) vst<W>(sc + r * ldt + j0 + c * W, acc[r][c] * scale);
  }
  const int64_t hv = hd / W * W;
  float inv_l[kRows];
  for (int r = 0; r < nr; ++r) {
    float* p = sc + r * ldt;
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
  int64_t d = 0;
  for (; d + 4 * W <= hv; d += 4 * W) pv_chunk<W, 4>(nr, sc, ldt, V + d, ld, n_key, inv_l, out, d);
  for (; d < hv; d += W) pv_chunk<W, 1>(nr, sc, ldt, V + d, ld, n_key, inv_l, out, d);
  for (int64_t d = hv; d < hd; ++d)
    for (int r = 0; r < nr; ++r) {
      float a = 0.0f;
      for (int64_t j = 0; j < n_key; ++j) a += sc[r * ldt + j] * V[j * ld + d];
      out[r][d] = a * inv_l[r];
    }
}
TP_VEC_VARIANTS(seg_rows,
                (int nr, const float* const* q, const float* kt, int64_t ldt, const float* V, int64_t ld, int64_t hd,
                 int64_t n_key, float scale, float* sc, float* const* out),
                (nr, q, kt, ldt, V, ld, hd, n_key, scale, sc, out))

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
  const int64_t max_pad = (max_len + kKeyPad - 1) / kKeyPad * kKeyPad;
  pool.parallel_for(n_blk * nh, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> sc, kt;
    if (int64_t(sc.size()) < kRows * max_pad) sc.resize(size_t(kRows * max_pad));
    if (int64_t(kt.size()) < hd * max_pad) kt.resize(size_t(hd * max_pad));
    for (int64_t w = b; w < e; ++w) {
      const int64_t blk = w / nh, h = w % nh, s = blk_seg[size_t(blk)];
      const int64_t k0 = seg[s], n_key = seg[s + 1] - k0, ldt = (n_key + kKeyPad - 1) / kKeyPad * kKeyPad;
      const int64_t q_end = std::min<int64_t>(blk_q0[size_t(blk)] + kQBlock, seg[s + 1]);
      // The segment's keys of head h, transposed once for the block's rows (zeros in the padding).
      for (int64_t d = 0; d < hd; ++d) {
        float* row = kt.data() + d * ldt;
        for (int64_t j = 0; j < n_key; ++j) row[j] = k[(k0 + j) * ld + h * hd + d];
        std::fill(row + n_key, row + ldt, 0.0f);
      }
      for (int64_t i = blk_q0[size_t(blk)]; i < q_end; i += kRows) {
        const int nr = int(std::min<int64_t>(kRows, q_end - i));
        const float* qr[kRows];
        float* orow[kRows];
        for (int r = 0; r < nr; ++r) {
          qr[r] = q + (i + r) * ld + h * hd;
          orow[r] = out + (i + r) * ld + h * hd;
        }
        seg_rows(nr, qr, kt.data(), ldt, v + k0 * ld + h * hd, ld, hd, n_key, p.kq_scale, sc.data(), orow);
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
