// attention.cpp — CPU causal attention with an online softmax (flash-attention style, one query row at a
// time). Memory is O(head_dim) per work item whatever the context length: keys are visited in tiles of
// kKeyTile, each tile's scores are computed, the running max/sum are rescaled, and V is accumulated.
// Work items are (query token, head) pairs; each is computed in a fixed order, so results do not depend
// on the thread count or on how the prompt was cut into ubatches.
#include <cmath>
#include <vector>

#include "backend/cpu/kernels.h"

namespace tp {

namespace {

constexpr int64_t kKeyTile = 64;

TP_CPU_CLONES void attend_row(float* out, const float* q, const float* K, const float* V, int64_t kv_stride,
                              int64_t hd, int64_t j0, int64_t j1, float scale, float* acc) {
  float m = -INFINITY, l = 0.0f;
  float s[kKeyTile];
  for (int64_t d = 0; d < hd; ++d) acc[d] = 0.0f;
  for (int64_t jb = j0; jb <= j1; jb += kKeyTile) {
    const int64_t je = jb + kKeyTile - 1 < j1 ? jb + kKeyTile - 1 : j1;
    const int64_t nk = je - jb + 1;
    float mb = -INFINITY;
    for (int64_t j = 0; j < nk; ++j) {
      const float* kr = K + (jb + j) * kv_stride;
      float dot = 0.0f;
      for (int64_t d = 0; d < hd; ++d) dot += q[d] * kr[d];
      s[j] = dot * scale;
      mb = s[j] > mb ? s[j] : mb;
    }
    const float m_new = mb > m ? mb : m;
    const float corr = std::exp(m - m_new);  // exp(-inf) = 0 on the first tile
    l *= corr;
    for (int64_t d = 0; d < hd; ++d) acc[d] *= corr;
    for (int64_t j = 0; j < nk; ++j) {
      const float pj = std::exp(s[j] - m_new);
      l += pj;
      const float* vr = V + (jb + j) * kv_stride;
      for (int64_t d = 0; d < hd; ++d) acc[d] += pj * vr[d];
    }
    m = m_new;
  }
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < hd; ++d) out[d] = acc[d] * inv;
}

}  // namespace

void cpu_attention(ThreadPool& pool, float* out, const float* q, const float* K, const float* V, int64_t pos0,
                   int64_t n_tok, const AttnParams& p) {
  const int64_t hd = p.head_dim, group = p.n_head / p.n_head_kv, kv_stride = p.n_head_kv * hd;
  const int64_t q_stride = p.n_head * hd;
  pool.parallel_for(n_tok * p.n_head, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> acc;
    if (int64_t(acc.size()) < hd) acc.resize(size_t(hd));
    for (int64_t it = b; it < e; ++it) {
      const int64_t i = it / p.n_head, h = it % p.n_head, kvh = h / group;
      const int64_t pos = pos0 + i;
      const int64_t j0 = p.n_swa > 0 && pos - p.n_swa + 1 > 0 ? pos - p.n_swa + 1 : 0;
      attend_row(out + i * q_stride + h * hd, q + i * q_stride + h * hd, K + kvh * hd, V + kvh * hd, kv_stride,
                 hd, j0, pos, p.kq_scale, acc.data());
    }
  });
}

}  // namespace tp
