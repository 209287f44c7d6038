// plan.cpp — equal-cost ubatch boundaries (see plan.h).
#include "pipeline/plan.h"

#include <algorithm>
#include <cmath>

#include "common.h"

namespace tp {

namespace {
// Attention FLOPs cost this many matmul FLOPs on the CPU backend. f32 FMA runs at about half the int8
// dot-product rate, but every matmul does its int8 work twice (the residual stage, bench/README.md "CPU
// speed"), which cancels it: measured per-pair / per-token ratios put it at 0.6 (Gemma 3 270M, 512 vs
// 2048 tokens) to 0.9 (the 6-layer bench model, fit_trace at 2K); 2.0 had the 2K auto split move a layer
// off the full-attention stage and lose 7% (bench/README.md "Balanced stages"). A default only: measured
// coefficients replace it when Python's cost model has them.
constexpr double kAttnFlopCost = 1.0;
// A ubatch's fixed cost (thread hand-offs, a pass over each layer's weights, small-tile inefficiency) in
// tokens of matmul: measured fits on the CPU backend put it at tens of tokens.
constexpr double kStepTokens = 32.0;
}  // namespace

UbatchCost ubatch_cost_defaults(const ModelConfig& c) {
  const double qo = double(c.n_embd) * double(c.n_head * c.head_dim) * 2.0;
  const double kv = double(c.n_embd) * double(c.kv_dim()) * 2.0;
  const double ffn = c.moe() ? 3.0 * double(c.n_embd) * double(c.n_ff_exp) * double(c.n_expert_used) +
                                   double(c.n_embd) * double(c.n_expert)
                             : 3.0 * double(c.n_embd) * double(c.n_ff);
  UbatchCost k;
  k.tok = 2.0 * (qo + kv + ffn);
  k.pair = 4.0 * double(c.n_head * c.head_dim) * kAttnFlopCost;
  k.step = kStepTokens * k.tok;
  return k;
}

double attention_pairs(int64_t p, int64_t t, int64_t w) {
  // Σ_{q=p}^{p+t-1} min(q + 1, w): the full part is an arithmetic series, the capped part w per token.
  auto full = [](int64_t a, int64_t b) {  // Σ_{q=a}^{b-1} (q + 1)
    return b > a ? (double(b) * double(b + 1) - double(a) * double(a + 1)) / 2.0 : 0.0;
  };
  if (w <= 0) return full(p, p + t);
  const int64_t split = std::clamp<int64_t>(w - 1, p, p + t);  // q + 1 <= w  <=>  q < w
  return full(p, split) + double(p + t - split) * double(w);
}

double ubatch_cost(const ModelConfig& c, const UbatchCost& k, int64_t b, int64_t e, int64_t layer_begin,
                   int64_t layer_end) {
  double cost = 0;
  for (int64_t il = layer_begin; il < layer_end; ++il) {
    const bool swa = c.n_swa > 0 && il < int64_t(c.layer_swa.size()) && c.layer_swa[size_t(il)];
    cost += k.tok * double(e - b) + k.pair * attention_pairs(b, e - b, swa ? c.n_swa : 0);
  }
  return cost;
}

std::vector<int64_t> fixed_ubatches(int64_t n, int64_t u) {
  std::vector<int64_t> b;
  for (int64_t x = 0; x < n; x += u) b.push_back(x);
  b.push_back(n);
  return b;
}

std::vector<int64_t> plan_ubatches(const ModelConfig& c, const UbatchCost& k, int64_t n, int64_t pos0,
                                   int64_t umin, int64_t umax, int64_t n_stages) {
  if (umin < 1 || umax < umin)
    fail(TP_ERR_INVALID_ARGUMENT, "ubatch_min (%lld) must be >= 1 and <= ubatch_max (%lld)", (long long)umin,
         (long long)umax);
  if (n <= umax) return {0, n};
  // cum[i]: cost of tokens [0, i) over all layers. Per token the cost is O(1) (two layer kinds), so an
  // O(n) table suffices and each boundary is a binary search in it.
  int64_t n_full = 0, n_swa = 0;
  for (int64_t il = 0; il < c.n_layer; ++il)
    (c.n_swa > 0 && il < int64_t(c.layer_swa.size()) && c.layer_swa[size_t(il)] ? n_swa : n_full) += 1;
  std::vector<double> cum(size_t(n) + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t q = pos0 + i;
    const double keys = double(n_full) * double(q + 1) + double(n_swa) * double(std::min(q + 1, c.n_swa));
    cum[size_t(i) + 1] = cum[size_t(i)] + k.tok * double(c.n_layer) + k.pair * keys;
  }
  // How many ubatches: at least what umax allows, at most what umin allows; in between, with several
  // stages and a per-ubatch cost, the M that balances fill/drain against per-step cost (plan.h).
  const double total = cum[size_t(n)];
  const int64_t m_lo = (n + umax - 1) / umax, m_hi = std::max<int64_t>(m_lo, n / umin);
  int64_t M = n_stages > 1 && k.step > 0
                  ? int64_t(std::llround(std::sqrt(double(n_stages - 1) * total / (k.step * double(c.n_layer)))))
                  : int64_t(std::ceil(total / cum[size_t(umax)] - 1e-9));  // all equal, the first about umax
  M = std::clamp(M, m_lo, m_hi);

  // The cut for a target cost T: from the start, each ubatch takes tokens until it costs T or holds umax
  // (early tokens are cheap: those ubatches stop at umax; later ones all cost about T). The count falls as
  // T grows, so a bisection finds the smallest T that needs at most M ubatches.
  auto cut = [&](double T, std::vector<int64_t>* out) {
    int64_t b = 0, m = 0;
    if (out) out->assign(1, 0);
    while (b < n) {
      const int64_t cap = std::min(n, b + umax);
      const double target = cum[size_t(b)] + T;
      int64_t e = int64_t(std::lower_bound(cum.begin() + b + 1, cum.begin() + cap + 1, target) - cum.begin());
      if (e > cap) {
        e = cap;  // even umax tokens cost less than T
      } else if (e > b + 1 && cum[size_t(e)] - target > target - cum[size_t(e) - 1]) {
        --e;  // the nearer of the two boundaries around T
      }
      b = e;
      ++m;
      if (out) out->push_back(b);
    }
    return m;
  };
  double lo = 0, hi = total;
  for (int i = 0; i < 100 && hi - lo > 1e-12 * total; ++i) {
    const double mid = 0.5 * (lo + hi);
    (cut(mid, nullptr) <= M ? hi : lo) = mid;
  }
  std::vector<int64_t> b;
  cut(hi, &b);
  M = int64_t(b.size()) - 1;
  // At least umin tokens per ubatch from the end (the greedy's last ubatch takes the remainder); the
  // bounds on M keep this possible, and sizes stay within [1, umax].
  for (int64_t m = M - 1; m >= 1; --m) b[size_t(m)] = std::min(b[size_t(m)], b[size_t(m) + 1] - umin);
  for (int64_t m = 1; m < M; ++m)
    b[size_t(m)] = std::clamp(b[size_t(m)], b[size_t(m) - 1] + 1, b[size_t(m) - 1] + umax);
  for (int64_t m = 1; m <= M; ++m)
    if (b[size_t(m)] <= b[size_t(m) - 1] || b[size_t(m)] - b[size_t(m) - 1] > umax)
      return fixed_ubatches(n, umax);  // a rounding corner the clamps could not repair: plain umax cuts
  return b;
}

}  // namespace tp
