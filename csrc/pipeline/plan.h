// plan.h — the cost model's planning side: ubatch boundaries of equal cost (DESIGN §8 "Cost model").
//
// A layer's time for a ubatch of tokens [b, e) at absolute positions pos0+b .. is modelled as
//   tok · (e - b) + pair · Σ_{q} keys(q),   keys(q) = q + 1 (full causal) or min(q + 1, n_swa) (sliding window)
// tok: seconds per token (matmuls, norms, rope: linear in tokens); pair: seconds per (query, key) pair
// (attention). Late ubatches see a longer prefix, so at equal size they cost more and the pipeline's
// bubbles grow; cutting the prompt at equal cost instead keeps every stage step about the same length.
// Only the ratio pair/tok matters to the cut; Python's costmodel.py measures both, and the engine falls
// back to FLOP counts (ubatch_cost_defaults) when none are given.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace tp {

struct UbatchCost {
  double tok = 0;   // seconds (or any unit) per token per layer
  double pair = 0;  // same unit per (query, key) pair per layer
  double step = 0;  // same unit per ubatch per layer (hand-offs, one pass over the weights); 0 = none
};

// FLOP-proportional coefficients: tok = 2 × weights a token multiplies (attention projections plus the
// FFN, or the routed experts), pair = 4 × n_head × head_dim (QK and PV) × kAttnFlopCost (f32 attention
// vs two-stage int8 matmuls: about 1, measured in plan.cpp), step = kStepTokens × tok: a ubatch's fixed
// costs are worth about that many tokens of matmul.
UbatchCost ubatch_cost_defaults(const ModelConfig& c);

// Attention pairs of tokens at positions [p, p + t) in one layer with window w (0 = full causal).
double attention_pairs(int64_t p, int64_t t, int64_t w);

// Cost of tokens [b, e) (absolute positions) summed over layers [layer_begin, layer_end).
double ubatch_cost(const ModelConfig& c, const UbatchCost& k, int64_t b, int64_t e, int64_t layer_begin,
                   int64_t layer_end);

// Boundaries 0 = b_0 < b_1 < ... < b_M = n of ubatches of about equal cost for n tokens after pos0 tokens
// already in the sequence, each at most umax and at least umin where the tokens allow it. The count M
// trades the pipeline's fill and drain ((P - 1) steps of C / M, C = one stage's cost) against the fixed
// cost of each step (M × step): T(M) ≈ C + (P - 1)·C/M + M·step is least at M* = sqrt((P - 1)·C / step),
// clamped to [ceil(n / umax), n / umin]. With one stage, or step = 0, M is the fewest that can all cost the
// same within umax (the first ubatch, the cheapest per token, is then about umax). When M is smaller than
// that, the early (cheap) ubatches stop at umax and the rest cost the same. 1 <= umin <= umax.
std::vector<int64_t> plan_ubatches(const ModelConfig& c, const UbatchCost& k, int64_t n, int64_t pos0,
                                   int64_t umin, int64_t umax, int64_t n_stages = 1);

// Fixed ubatches of u tokens: 0, u, 2u, ..., n.
std::vector<int64_t> fixed_ubatches(int64_t n, int64_t u);

}  // namespace tp
