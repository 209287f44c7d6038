// moe.cpp — CPU mixture-of-experts ops: top-k routing, the expert matmul grouped by expert, and the
// weighted combination of the experts' outputs (Ops contract in backend/ops.h).
//
// Grouping: the slots of a ubatch (token t's j-th choice, i = t*k + j) are bucketed by expert with a stable
// counting sort; each expert used by the ubatch then runs ONE int8 matmul (cpu_matmul) over the gathered rows
// of its slots (cpu_matmul_grouped: all experts' row tiles in one parallel work list, each input row
// quantized once), so its weights are decoded and streamed once per ubatch however many tokens chose it. The
// rows come back scattered to their slots, plus the expert's bias. cpu_matmul's result for a row does not
// depend on which other rows share the call, so a slot's output equals the single-row product exactly and the
// grouping never changes results (tests/test_moe.py).
// moe_combine rounds each product before adding it (the contract every backend follows): no FMA contraction.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"

namespace tp {

int64_t cpu_router_topk(ThreadPool& pool, int32_t* ids, float* weights, const float* logits, int64_t n_tok,
                        int64_t n_expert, int64_t k) {
  pool.parallel_for(n_tok, 16, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) {
      const float* l = logits + t * n_expert;
      int32_t* id = ids + t * k;
      // Selection of the k largest, largest first; on equal logits the lower expert wins.
      for (int64_t j = 0; j < k; ++j) {
        int32_t best = -1;
        for (int64_t x = 0; x < n_expert; ++x) {
          bool taken = false;
          for (int64_t u = 0; u < j; ++u) taken = taken || id[u] == x;
          if (!taken && (best < 0 || l[x] > l[best])) best = int32_t(x);
        }
        id[j] = best;
      }
      // Softmax over the chosen logits only; the first is the largest.
      float* w = weights + t * k;
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        w[j] = std::exp(l[id[j]] - l[id[0]]);
        sum += w[j];
      }
      for (int64_t j = 0; j < k; ++j) w[j] = w[j] / sum;
    }
  });
  std::vector<char> seen(size_t(n_expert), 0);
  int64_t distinct = 0;
  for (int64_t i = 0; i < n_tok * k; ++i)
    if (!seen[size_t(ids[i])]) {
      seen[size_t(ids[i])] = 1;
      ++distinct;
    }
  return distinct;
}

void cpu_moe_matmul(ThreadPool& pool, MoeBuffers& buf, float* out, const Tensor& w, const Tensor& b, const float* in,
                    bool in_per_slot, const int32_t* ids, int64_t n_tok, int64_t k) {
  const int64_t n_slots = n_tok * k, n_exp = w.mats, rows = w.mat_rows(), cols = w.cols;
  // Stable counting sort of the slots by expert; src = the input row each sorted slot reads.
  buf.start.assign(size_t(n_exp + 1), 0);
  for (int64_t i = 0; i < n_slots; ++i) ++buf.start[size_t(ids[i]) + 1];
  for (int64_t e = 0; e < n_exp; ++e) buf.start[size_t(e + 1)] += buf.start[size_t(e)];
  buf.order.resize(size_t(n_slots));
  buf.src.resize(size_t(n_slots));
  buf.fill.assign(buf.start.begin(), buf.start.end() - 1);
  for (int64_t i = 0; i < n_slots; ++i) {
    const int64_t s = buf.fill[size_t(ids[i])]++;
    buf.order[size_t(s)] = i;
    buf.src[size_t(s)] = in_per_slot ? i : i / k;
  }
  if (int64_t(buf.y.size()) < n_slots * rows) buf.y.resize(size_t(n_slots * rows));
  if (!cpu_matmul_grouped(pool, buf.y.data(), w, in, in_per_slot ? n_slots : n_tok, buf.src.data(),
                          buf.start.data())) {
    // Float experts: one f32 matmul per expert over its gathered rows.
    for (int64_t e = 0; e < n_exp; ++e) {
      const int64_t s0 = buf.start[size_t(e)], n_e = buf.start[size_t(e + 1)] - s0;
      if (n_e == 0) continue;
      if (int64_t(buf.x.size()) < n_e * cols) buf.x.resize(size_t(n_e * cols));
      for (int64_t r = 0; r < n_e; ++r)
        memcpy(buf.x.data() + r * cols, in + buf.src[size_t(s0 + r)] * cols, size_t(cols) * sizeof(float));
      cpu_matmul_f32(pool, buf.y.data() + s0 * rows, w.mat(e), buf.x.data(), n_e);
    }
  }
  // Scatter back to slot order, adding each expert's bias.
  pool.parallel_for(n_slots, 16, [&](int64_t b0, int64_t b1, int) {
    for (int64_t s = b0; s < b1; ++s) {
      const int64_t slot = buf.order[size_t(s)];
      float* o = out + slot * rows;
      const float* y = buf.y.data() + s * rows;
      const float* bias = b.present() ? b.f32() + ids[slot] * rows : nullptr;
      if (bias)
        for (int64_t c = 0; c < rows; ++c) o[c] = y[c] + bias[c];
      else
        memcpy(o, y, size_t(rows) * sizeof(float));
    }
  });
}

void cpu_moe_combine(ThreadPool& pool, float* out, const float* y, const float* weights, int64_t n_tok, int64_t k,
                     int64_t dim) {
  pool.parallel_for(n_tok, 4, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) {
      float* o = out + t * dim;
      for (int64_t c = 0; c < dim; ++c) {
        float acc = weights[t * k] * y[(t * k) * dim + c];
        for (int64_t j = 1; j < k; ++j) acc += weights[t * k + j] * y[(t * k + j) * dim + c];
        o[c] = acc;
      }
    }
  });
}

}  // namespace tp
