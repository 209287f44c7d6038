// attention.cpp — CPU causal attention, flash style: a block of queries of one KV head group against key
// tiles, with an online softmax. The score matrix is never materialized: per work item the memory is the
// block's running max/sum/output rows plus one transposed key tile.
//
// Work items are (KV head, block of kQBlock query tokens); the block's rows are every (token, head) pair of
// the KV head's query group, so each key tile is loaded and transposed once for all of them. Key tiles are
// aligned to absolute positions (multiples of kKeyTile), and a row visits exactly the tiles and keys of its
// own window [j0, pos] in increasing order, with the same SIMD code whatever else is in the block — so a
// row's result does not depend on the block size, the thread count, or how the prompt was split into
// ubatches and prefill calls.
//
// Per row and tile: s_j = scale * Σ_d q_d K_jd (16 keys per vector lane group, d in order), max, rescale of
// the running sum and output by exp(m_old - m_new), p_j = exp(s_j - m_new) (vexp, kernels.h), then
// out += Σ_j p_j V_j in key order, 16 dims per vector. Compiled per ISA with target_clones. An attention
// sink (gpt-oss) is folded in once at the end, as ggml does: with running max m and sum l, a sink s > m
// rescales l and the output by e^(m - s) and adds 1, else it adds e^(s - m) to l.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"

namespace tp {

namespace {

constexpr int64_t kKeyTile = 64;
constexpr int64_t kQBlock = 32;
constexpr int64_t kVecDim = 16;  // head dims that are a multiple of this take the vector path (any ISA)

struct RowState {
  float m, l;
};

// NR rows with the same key window against one key tile (keys tb .. tb + kKeyTile - 1, transposed in
// kt[d][jj]); valid keys [ja, jb] ⊆ the tile. The rows share every K/V load; each row's arithmetic is exactly
// the single-row sequence. acc[r]: hd floats.
template <int W, int NR, int NV>
TP_VINLINE void rows_tile(const float* const* q, const float* kt, const float* V,
                                                     int64_t kv_stride, int64_t hd, int64_t tb, int64_t ja,
                                                     int64_t jb, float scale, RowState* st, float* const* acc) {
  typedef typename VecT<W>::f vf;
  constexpr int kL = W, kKV = int(kKeyTile) / W;
  // Scores in chunks of CH vectors of keys, so that NR rows × CH accumulators stay in registers (all 64 keys
  // at once on AVX-512; 16 keys on AVX2, whose 16 registers would otherwise hold one row's tile only). Each
  // score is the same sum in the same order whatever the chunking.
  constexpr int CH = NR == 1 || W >= 16 ? kKV : 2;
  static_assert(kKV % CH == 0, "whole chunks");
  float sc_all[NR][kKeyTile];
  for (int v0 = 0; v0 < kKV; v0 += CH) {
    vf s[NR][CH];
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < CH; ++v) s[r][v] = vf{};
    for (int64_t d = 0; d < hd; ++d) {
      vf kv[CH];
      for (int v = 0; v < CH; ++v) kv[v] = vld<W>(kt + d * kKeyTile + (v0 + v) * kL);
      for (int r = 0; r < NR; ++r) {
        const float qd = q[r][d];
        for (int v = 0; v < CH; ++v) s[r][v] += qd * kv[v];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < CH; ++v) vst<W>(sc_all[r] + (v0 + v) * kL, s[r][v] * scale);
  }
  const int j_lo = int(ja - tb), j_hi = int(jb - tb);
  float p[NR][kKeyTile];
  float corr[NR];
  for (int r = 0; r < NR; ++r) {
    const float* sc = sc_all[r];
    float mb = -INFINITY;
    for (int j = j_lo; j <= j_hi; ++j) mb = sc[j] > mb ? sc[j] : mb;
    const float m_new = mb > st[r].m ? mb : st[r].m;
    corr[r] = std::exp(st[r].m - m_new);  // exp(-inf) = 0 on the row's first tile
    for (int v = 0; v < kKV; ++v) {
      vst<W>(p[r] + v * kL, vexp<W>(vld<W>(sc + v * kL) - m_new));
    }
    float l = st[r].l * corr[r];
    for (int j = j_lo; j <= j_hi; ++j) l += p[r][j];
    st[r].l = l;
    st[r].m = m_new;
  }
  for (int64_t d0 = 0; d0 < hd; d0 += NV * kL) {
    constexpr int nv = NV;
    vf a[NR][NV];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < nv; ++c) {
        a[r][c] = vld<W>(acc[r] + d0 + c * kL) * corr[r];
      }
    for (int j = j_lo; j <= j_hi; ++j) {
      const float* vr = V + (tb + j) * kv_stride + d0;
      vf vv[NV];
      for (int c = 0; c < nv; ++c) vv[c] = vld<W>(vr + c * kL);
      for (int r = 0; r < NR; ++r) {
        const float pj = p[r][j];
        for (int c = 0; c < nv; ++c) a[r][c] += pj * vv[c];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < nv; ++c) vst<W>(acc[r] + d0 + c * kL, a[r][c]);
  }
}

// Up to 4 rows at a time (the query heads of one token that share a KV head, and tokens). Output dims go in
// chunks of 4 vectors when the head dim allows and the rows' accumulators fit the registers (AVX-512, or one
// row), else of 16 dims (the vector path's granularity on every ISA). The chunking never changes a result.
template <int W>
TP_VINLINE void rows_tile_n_impl(int nr, const float* const* q, const float* kt, const float* V, int64_t kv_stride,
                                 int64_t hd, int64_t tb, int64_t ja, int64_t jb, float scale, RowState* st,
                                 float* const* acc) {
  constexpr int N1 = 16 / W;  // vectors per 16 dims
  const bool by4 = hd % (4 * 16) == 0 && (W >= 16 || nr == 1);
  switch (nr * 2 + (by4 ? 1 : 0)) {
    case 9: rows_tile<W, 4, 4 * N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 8: rows_tile<W, 4, N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 7: rows_tile<W, 3, 4 * N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 6: rows_tile<W, 3, N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 5: rows_tile<W, 2, 4 * N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 4: rows_tile<W, 2, N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 3: rows_tile<W, 1, 4 * N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    default: rows_tile<W, 1, N1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
  }
}
TP_VEC_VARIANTS(rows_tile_n,
                (int nr, const float* const* q, const float* kt, const float* V, int64_t kv_stride, int64_t hd,
                 int64_t tb, int64_t ja, int64_t jb, float scale, RowState* st, float* const* acc),
                (nr, q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc))

// Scalar fallback for head dims that are not a multiple of 16 (same structure, one key at a time).
void row_tile_scalar(const float* q, const float* kt, const float* V, int64_t kv_stride, int64_t hd, int64_t tb,
                     int64_t ja, int64_t jb, float scale, RowState& st, float* acc) {
  float sc[kKeyTile];
  float mb = -INFINITY;
  for (int64_t j = ja; j <= jb; ++j) {
    float dot = 0.0f;
    for (int64_t d = 0; d < hd; ++d) dot += q[d] * kt[d * kKeyTile + (j - tb)];
    sc[j - tb] = dot * scale;
    mb = sc[j - tb] > mb ? sc[j - tb] : mb;
  }
  const float m_new = mb > st.m ? mb : st.m;
  const float corr = std::exp(st.m - m_new);
  st.l *= corr;
  for (int64_t d = 0; d < hd; ++d) acc[d] *= corr;
  for (int64_t j = ja; j <= jb; ++j) {
    const float pj = std::exp(sc[j - tb] - m_new);
    st.l += pj;
    const float* vr = V + j * kv_stride;
    for (int64_t d = 0; d < hd; ++d) acc[d] += pj * vr[d];
  }
  st.m = m_new;
}

// Rows per rows_tile_n call: 4, which shares each key and value load among 4 rows. On AVX-512 a row's 64
// scores are 4 zmm (4 rows fit in 32); narrower vectors take the scores in chunks of 16 keys (rows_tile's
// CH) and the outputs in chunks of 16 dims. A row's arithmetic is the same however many share the call, so
// results do not depend on this (TP_ATTN_ROWS=1..4 overrides it, for measurements).
int rows_per_call() {
  if (const char* e = std::getenv("TP_ATTN_ROWS")) return std::max(1, std::min(4, std::atoi(e)));
  return 4;
}

}  // namespace

void cpu_attention(ThreadPool& pool, float* out, const float* q, const float* K, const float* V, int64_t pos0,
                   int64_t n_tok, const AttnParams& p) {
  const int64_t hd = p.head_dim, group = p.n_head / p.n_head_kv, kv_stride = p.n_head_kv * hd;
  const int64_t q_stride = p.n_head * hd;
  const int64_t n_qb = (n_tok + kQBlock - 1) / kQBlock;
  const bool vec = hd % kVecDim == 0;
  const float* sinks = p.sinks.present() ? p.sinks.f32() : nullptr;
  static const int max_rows = rows_per_call();
  auto first_key = [&](int64_t pos) { return p.n_swa > 0 && pos - p.n_swa + 1 > 0 ? pos - p.n_swa + 1 : 0; };
  // Later query blocks see more keys: hand them out first.
  pool.parallel_for(n_qb * p.n_head_kv, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> kt, acc;
    thread_local std::vector<RowState> st;
    const int64_t rows_max = kQBlock * group;
    if (int64_t(kt.size()) < hd * kKeyTile) kt.resize(size_t(hd * kKeyTile));
    if (int64_t(acc.size()) < rows_max * hd) acc.resize(size_t(rows_max * hd));
    if (int64_t(st.size()) < rows_max) st.resize(size_t(rows_max));
    for (int64_t it = b; it < e; ++it) {
      const int64_t qb = n_qb - 1 - it / p.n_head_kv, kvh = it % p.n_head_kv;
      const int64_t i0 = qb * kQBlock, i1 = i0 + kQBlock < n_tok ? i0 + kQBlock : n_tok;
      const int64_t nrows = (i1 - i0) * group;
      for (int64_t r = 0; r < nrows; ++r) st[size_t(r)] = {-INFINITY, 0.0f};
      std::fill(acc.begin(), acc.begin() + nrows * hd, 0.0f);
      const int64_t jmin = first_key(pos0 + i0), jmax = pos0 + i1 - 1;
      const float* Kh = K + kvh * hd;
      const float* Vh = V + kvh * hd;
      for (int64_t tb = jmin / kKeyTile * kKeyTile; tb <= jmax; tb += kKeyTile) {
        const int64_t te = tb + kKeyTile - 1 < jmax ? tb + kKeyTile - 1 : jmax;
        // Transpose the tile's keys: kt[d][jj]; keys past te are zero (never read as valid).
        for (int64_t jj = 0; jj < kKeyTile; ++jj) {
          if (tb + jj > te || tb + jj < jmin) {
            for (int64_t d = 0; d < hd; ++d) kt[size_t(d * kKeyTile + jj)] = 0.0f;
            continue;
          }
          const float* kr = Kh + (tb + jj) * kv_stride;
          for (int64_t d = 0; d < hd; ++d) kt[size_t(d * kKeyTile + jj)] = kr[d];
        }
        // Rows whose window within this tile is the same (all of them on interior tiles) go through
        // rows_tile_n four at a time, across the heads of a token and across tokens.
        const float* qs[4];
        float* as[4];
        RowState* ss[4];
        RowState sbuf[4];
        int n_pend = 0;
        int64_t pend_ja = -1, pend_jb = -1;
        auto flush = [&]() {
          if (n_pend == 0) return;
          for (int k = 0; k < n_pend; ++k) sbuf[k] = *ss[k];
          rows_tile_n(n_pend, qs, kt.data(), Vh, kv_stride, hd, tb, pend_ja, pend_jb, p.kq_scale, sbuf, as);
          for (int k = 0; k < n_pend; ++k) *ss[k] = sbuf[k];
          n_pend = 0;
        };
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t pos = pos0 + i, j0 = first_key(pos);
          const int64_t ja = j0 > tb ? j0 : tb, jb = pos < te ? pos : te;
          if (ja > jb) continue;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = kvh * group + g, r = (i - i0) * group + g;
            const float* qr = q + i * q_stride + h * hd;
            if (!vec) {
              row_tile_scalar(qr, kt.data(), Vh, kv_stride, hd, tb, ja, jb, p.kq_scale, st[size_t(r)],
                              acc.data() + r * hd);
              continue;
            }
            if (n_pend == max_rows || (n_pend > 0 && (ja != pend_ja || jb != pend_jb))) flush();
            pend_ja = ja;
            pend_jb = jb;
            qs[n_pend] = qr;
            as[n_pend] = acc.data() + r * hd;
            ss[n_pend] = &st[size_t(r)];
            ++n_pend;
          }
        }
        flush();
      }
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kvh * group + g, r = (i - i0) * group + g;
          // A sink joins the denominator as one more score (ggml's order: rescale to the new max first).
          float l = st[size_t(r)].l, vs = 1.0f;
          if (sinks) {
            const float sk = sinks[h], m = st[size_t(r)].m;
            if (sk > m) {
              vs = std::exp(m - sk);
              l = l * vs + 1.0f;
            } else {
              l += std::exp(sk - m);
            }
          }
          const float inv = 1.0f / l;
          float* o = out + i * q_stride + h * hd;
          const float* a = acc.data() + r * hd;
          for (int64_t d = 0; d < hd; ++d) o[d] = (a[d] * vs) * inv;
        }
      }
    }
  });
}

}  // namespace tp
