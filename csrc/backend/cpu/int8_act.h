// int8_act.h — what the two int8 matmul paths of the CPU backend share: the two-stage quantized activations
// matmul.cpp makes (its file comment has the format), the ISA choice, and the small-n row path (gemv.cpp).
#pragma once

#include <cstdint>

#include "backend/cpu/threadpool.h"
#include "backend/ops.h"

namespace tp {

enum Int8Isa : int { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512Vnni = 2 };

// The int8 kernels' ISA on this machine, capped by cpu_set_isa_override.
int int8_active_isa();

// Quantized bytes per 32-element group and token: q1[32] then q2[32].
constexpr int kActBytes = 64;

// One activation group in two int8 stages: x ≈ d1 q1 + (d1 / 128) q2 = d (128 q1 + q2) with d = d1 / 128
// (exact); s = d * Σ(128 q1 + q2) (exact integer < 2^24 before the one rounding); lo/hi: Σ(128 q1 + q2) over
// elements 0..15 and 16..31. d1, s1, lo1, hi1: the same for stage 1 alone.
struct AMeta {
  float d, s;
  int32_t lo, hi;
  float d1, s1;
  int32_t lo1, hi1;
};

// The small-n path: out[t * N + r] for n_tok tokens (at most kGemvMaxTokens, in blocks of 4) of the quantized rows xq (stride
// ldx bytes, metadata stride K / 32), dotting each weight row straight from its packed blocks instead of
// decoding row tiles. Per (row, token) it evaluates the tile kernels' exact sequence of f32 operations, so
// its results are bit-identical to theirs. Returns false (computing nothing) where it has no kernel for the
// type or ISA; the caller then takes the tile path.
// Up to about 16 tokens it beats the tile path (a SmolLM2 decode batch on 1 thread: 5 tokens 41 ms here vs
// 60 ms there, 8: 62 vs 77, 12: 90 vs 98, 16: 120 vs 120); the tile path's one decode per tile wins beyond.
constexpr int64_t kGemvMaxTokens = 12;
bool cpu_gemv_int8(ThreadPool& pool, float* out, const Tensor& w, const int8_t* xq, int64_t ldx, const AMeta* am,
                   int64_t n_tok, int isa);
// The same for rows [r0, r1) only, on the calling thread: out[t * ldo + r - r0] (the grouped expert product's
// (expert, row tile) items with few tokens).
bool cpu_gemv_int8_rows(const Tensor& w, int64_t r0, int64_t r1, const int8_t* xq, int64_t ldx, const AMeta* am,
                        int64_t n_tok, float* out, int64_t ldo, int isa);

}  // namespace tp
