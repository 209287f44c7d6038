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
// out += Σ_j p_j V_j in key order, 16 dims per vector. Compiled per ISA with target_clones.
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"

namespace tp {

namespace {

constexpr int64_t kKeyTile = 64;
constexpr int64_t kQBlock = 32;
constexpr int kL = 16;  // lanes per v16f
constexpr int kKV = kKeyTile / kL;

struct RowState {
  float m, l;
};

// NR rows with the same key window against one key tile (keys tb .. tb + kKeyTile - 1, transposed in
// kt[d][jj]); valid keys [ja, jb] ⊆ the tile. The rows share every K/V load; each row's arithmetic is exactly
// the single-row sequence. acc[r]: hd floats.
template <int NR>
__attribute__((always_inline)) inline void rows_tile(const float* const* q, const float* kt, const float* V,
                                                     int64_t kv_stride, int64_t hd, int64_t tb, int64_t ja,
                                                     int64_t jb, float scale, RowState* st, float* const* acc) {
  v16f s[NR][kKV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < kKV; ++v) s[r][v] = v16f{};
  for (int64_t d = 0; d < hd; ++d) {
    v16f kv[kKV];
    for (int v = 0; v < kKV; ++v) memcpy(&kv[v], kt + d * kKeyTile + v * kL, sizeof(v16f));
    for (int r = 0; r < NR; ++r) {
      const float qd = q[r][d];
      for (int v = 0; v < kKV; ++v) s[r][v] += qd * kv[v];
    }
  }
  const int j_lo = int(ja - tb), j_hi = int(jb - tb);
  float p[NR][kKeyTile];
  float corr[NR];
  for (int r = 0; r < NR; ++r) {
    float sc[kKeyTile];
    for (int v = 0; v < kKV; ++v) {
      const v16f sv = s[r][v] * scale;
      memcpy(sc + v * kL, &sv, sizeof(v16f));
    }
    float mb = -INFINITY;
    for (int j = j_lo; j <= j_hi; ++j) mb = sc[j] > mb ? sc[j] : mb;
    const float m_new = mb > st[r].m ? mb : st[r].m;
    corr[r] = std::exp(st[r].m - m_new);  // exp(-inf) = 0 on the row's first tile
    for (int v = 0; v < kKV; ++v) {
      v16f x;
      memcpy(&x, sc + v * kL, sizeof(v16f));
      const v16f e = vexp(x - m_new);
      memcpy(p[r] + v * kL, &e, sizeof(v16f));
    }
    float l = st[r].l * corr[r];
    for (int j = j_lo; j <= j_hi; ++j) l += p[r][j];
    st[r].l = l;
    st[r].m = m_new;
  }
  for (int64_t d0 = 0; d0 < hd; d0 += 4 * kL) {
    const int nv = int((hd - d0) / kL < 4 ? (hd - d0) / kL : 4);
    v16f a[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < nv; ++c) {
        memcpy(&a[r][c], acc[r] + d0 + c * kL, sizeof(v16f));
        a[r][c] *= corr[r];
      }
    for (int j = j_lo; j <= j_hi; ++j) {
      const float* vr = V + (tb + j) * kv_stride + d0;
      v16f vv[4];
      for (int c = 0; c < nv; ++c) memcpy(&vv[c], vr + c * kL, sizeof(v16f));
      for (int r = 0; r < NR; ++r) {
        const float pj = p[r][j];
        for (int c = 0; c < nv; ++c) a[r][c] += pj * vv[c];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < nv; ++c) memcpy(acc[r] + d0 + c * kL, &a[r][c], sizeof(v16f));
  }
}

// Up to 4 rows at a time (the query heads of one token that share a KV head).
TP_CPU_CLONES void rows_tile_n(int nr, const float* const* q, const float* kt, const float* V, int64_t kv_stride,
                               int64_t hd, int64_t tb, int64_t ja, int64_t jb, float scale, RowState* st,
                               float* const* acc) {
  switch (nr) {
    case 4: rows_tile<4>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 3: rows_tile<3>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    case 2: rows_tile<2>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
    default: rows_tile<1>(q, kt, V, kv_stride, hd, tb, ja, jb, scale, st, acc); break;
  }
}

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

}  // namespace

void cpu_attention(ThreadPool& pool, float* out, const float* q, const float* K, const float* V, int64_t pos0,
                   int64_t n_tok, const AttnParams& p) {
  const int64_t hd = p.head_dim, group = p.n_head / p.n_head_kv, kv_stride = p.n_head_kv * hd;
  const int64_t q_stride = p.n_head * hd;
  const int64_t n_qb = (n_tok + kQBlock - 1) / kQBlock;
  const bool vec = hd % kL == 0;
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
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t pos = pos0 + i, j0 = first_key(pos);
          const int64_t ja = j0 > tb ? j0 : tb, jb = pos < te ? pos : te;
          if (ja > jb) continue;
          if (vec) {
            for (int64_t g0 = 0; g0 < group; g0 += 4) {
              const int nr = int(group - g0 < 4 ? group - g0 : 4);
              const float* qs[4];
              float* as[4];
              const int64_t r0 = (i - i0) * group + g0;
              for (int k = 0; k < nr; ++k) {
                qs[k] = q + i * q_stride + (kvh * group + g0 + k) * hd;
                as[k] = acc.data() + (r0 + k) * hd;
              }
              rows_tile_n(nr, qs, kt.data(), Vh, kv_stride, hd, tb, ja, jb, p.kq_scale, st.data() + r0, as);
            }
            continue;
          }
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = kvh * group + g, r = (i - i0) * group + g;
            row_tile_scalar(q + i * q_stride + h * hd, kt.data(), Vh, kv_stride, hd, tb, ja, jb, p.kq_scale,
                            st[size_t(r)], acc.data() + r * hd);
          }
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kvh * group + g, r = (i - i0) * group + g;
          const float inv = 1.0f / st[size_t(r)].l;
          float* o = out + i * q_stride + h * hd;
          const float* a = acc.data() + r * hd;
          for (int64_t d = 0; d < hd; ++d) o[d] = a[d] * inv;
        }
      }
    }
  });
}

}  // namespace tp
