// unpack.h — TP_HD helpers that turn weight blocks and f32 activations into int8 groups of 32, the form
// every integer dot product kernel (CUDA MMQ/MMVQ, a CPU int8 path) consumes.
//
// Weights. unpack_group(block, g, q) decodes 32-element group g of one block (g = 0 for the 32-element
// legacy blocks, 0..7 for the 256-element K-quants) into int8 quants q[0..31] and a WGroup such that
//     x_i = d[i / 16] * q_i + m          (bit-identical to blocks.h's dequant_block, see below)
//   type   q_i                 d[0], d[1]               m            q range
//   Q4_0   nibble - 8          d                        -0           [-8, 7]
//   Q4_1   nibble              d                        m            [0, 15]
//   Q5_0   5-bit - 16          d                        -0           [-16, 15]
//   Q5_1   5-bit               d                        m            [0, 31]
//   Q8_0   qs                  d                        -0           [-128, 127]
//   Q4_K   nibble              d*sc_g                   -(dmin*m_g)  [0, 15]
//   Q5_K   5-bit               d*sc_g                   -(dmin*m_g)  [0, 31]
//   Q6_K   6-bit - 32          d*sc[2g], d*sc[2g+1]     -0           [-32, 31]
//   MXFP4  2 × E2M1 value      2^(e - 128)              -0           [-12, 12]
// Q6_K is the only type with two scales per group (16-element sub-blocks; folding the int8 sub-scale
// into q would overflow int8), so a kernel sums the two 16-element halves separately for it
// (Unpack<B>::kSplit) and once over 32 elements for every other type.
//
// Exactness: each WGroup field is the same f32 product blocks.h forms (d*sc, dmin*m), and d*q + m
// rounds once more only through the add. Types without an offset use m = -0.0f because x + (-0.0f) == x
// for every x, signed zeros included (+0.0f would turn a -0.0f product into +0.0f); Q4_K's "d1*q - m1"
// equals "d1*q + (-m1)" exactly. tests/test_unpack.py checks this bit for bit against the decoders.
//
// Activations. A group of 32 floats becomes q_i = round(x_i / d) (ties away from zero), d = amax / 127,
// plus s = d * Σ q_i, the sum of the *quantized* values (ggml's CPU q8_1 convention). With it the group
// dot is exactly Σ (d_w q_i + m)(d q_a,i): the int8 path is "dequantized W times dequantized x" and its
// error is that of activation quantization alone. (Using the exact Σ x_i instead looks more accurate but
// is not: the error then becomes Σ (w_i - m) e_i instead of Σ w_i e_i, and |w - m| is ~2-3x |w| for the
// min-offset types — measured in tests/test_unpack.py.) q8_scale/q8_quantize/q8_sum are the scalar steps
// so that a GPU warp (one lane per element; amax and Σq by shuffle reductions, both exact in any order)
// quantizes bit for bit like quantize_group. Division, not multiplication by 1/d, so q matches ggml's q8
// rounding; this relies on IEEE division (nvcc's default; --use_fast_math would break bit-equality).
//
// Group dot. With s_lo = Σ_{i<16} q_i qa_i and s_hi = Σ_{i>=16} q_i qa_i (int32, exact):
//     Σ x_i a_i ≈ group_dot = d_a * (d[0] s_lo + d[1] s_hi) + m * s_a      (kSplit)
//                           = (d[0] d_a) (s_lo + s_hi) + m * s_a            (otherwise)
// One expression shared by every backend, so they differ only in the order groups are summed.
#pragma once

#include <cmath>
#include <cstdint>

#include "quant/blocks.h"
#include "quant/types.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace tp {

// One 32-element weight group: x_i = d[i / 16] * q_i + m.
struct WGroup {
  float d[2];  // scale of elements 0..15 and 16..31 (equal unless Unpack<B>::kSplit)
  float m;     // offset of every element; -0.0f for types without one
};

// One 32-element activation group: x_i ≈ d * q_i, s = d * Σ q_i.
struct AGroup {
  float d;
  float s;
};

// Per-block-type facts a kernel needs at compile time.
template <class B>
struct Unpack;

#define TP_UNPACK_TRAITS(B, T, ELEMS, SPLIT, OFFSET, QMIN, QMAX) \
  template <>                                                    \
  struct Unpack<B> {                                             \
    static constexpr GgmlType kType = GgmlType::T;               \
    static constexpr int kBlockElems = ELEMS;                    \
    static constexpr int kGroups = ELEMS / 32;                   \
    static constexpr bool kSplit = SPLIT;   /* two 16-element scales per group */ \
    static constexpr bool kOffset = OFFSET; /* m != -0: needs the m * s_a term */    \
    static constexpr int kQMin = QMIN, kQMax = QMAX;             \
  };
TP_UNPACK_TRAITS(block_q4_0, Q4_0, 32, false, false, -8, 7)
TP_UNPACK_TRAITS(block_q4_1, Q4_1, 32, false, true, 0, 15)
TP_UNPACK_TRAITS(block_q5_0, Q5_0, 32, false, false, -16, 15)
TP_UNPACK_TRAITS(block_q5_1, Q5_1, 32, false, true, 0, 31)
TP_UNPACK_TRAITS(block_q8_0, Q8_0, 32, false, false, -128, 127)
TP_UNPACK_TRAITS(block_q4_K, Q4_K, 256, false, true, 0, 15)
TP_UNPACK_TRAITS(block_q5_K, Q5_K, 256, false, true, 0, 31)
TP_UNPACK_TRAITS(block_q6_K, Q6_K, 256, true, false, -32, 31)
TP_UNPACK_TRAITS(block_mxfp4, MXFP4, 32, false, false, -12, 12)
#undef TP_UNPACK_TRAITS

// Exact f16 -> f32; the hardware conversion on the GPU (same value as the software one in types.h).
TP_HD float unpack_f16(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  return f16_to_f32(h);
#endif
}

// ---- weights: one 32-element group -> int8 q[32] + WGroup -----------------------------------------------
//
// group_scale(block, g) is the WGroup alone (the CPU's SIMD decoders take the quants their own way and the
// scales from here, so both paths form the same f32 products); unpack_group adds the quants.

// The legacy blocks: one f16 scale d (and an f16 offset m for Q4_1/Q5_1).
template <class B>
TP_HD WGroup legacy_scale(const B* b) {
  const float d = unpack_f16(b->d);
  return {{d, d}, -0.0f};
}
template <class B>
TP_HD WGroup legacy_scale_min(const B* b) {
  const float d = unpack_f16(b->d);
  return {{d, d}, unpack_f16(b->m)};
}
TP_HD WGroup group_scale(const block_q4_0* b, int /*g*/) { return legacy_scale(b); }
TP_HD WGroup group_scale(const block_q4_1* b, int /*g*/) { return legacy_scale_min(b); }
TP_HD WGroup group_scale(const block_q5_0* b, int /*g*/) { return legacy_scale(b); }
TP_HD WGroup group_scale(const block_q5_1* b, int /*g*/) { return legacy_scale_min(b); }
TP_HD WGroup group_scale(const block_q8_0* b, int /*g*/) { return legacy_scale(b); }
// Q4_K and Q5_K: 6-bit sub-block scale and min g (GGUF_SPEC §2.3).
template <class B>
TP_HD WGroup k4_scale(const B* b, int g) {
  uint8_t sc, m;
  get_scale_min_k4(g, b->scales, &sc, &m);
  const float d = unpack_f16(b->d) * float(sc);
  const float mn = unpack_f16(b->dmin) * float(m);
  return {{d, d}, -mn};
}
TP_HD WGroup group_scale(const block_q4_K* b, int g) { return k4_scale(b, g); }
TP_HD WGroup group_scale(const block_q5_K* b, int g) { return k4_scale(b, g); }
// Q6_K: sub-block scales sc[2g] for elements 0..15, sc[2g + 1] for 16..31.
TP_HD WGroup group_scale(const block_q6_K* b, int g) {
  const float d = unpack_f16(b->d);
  return {{d * float(b->scales[2 * g]), d * float(b->scales[2 * g + 1])}, -0.0f};
}
TP_HD WGroup group_scale(const block_mxfp4* b, int /*g*/) {
  const float d = e8m0_to_f32_half(b->e);
  return {{d, d}, -0.0f};
}

TP_HD WGroup unpack_group(const block_q4_0* b, int g, int8_t* q) {
  for (int j = 0; j < 16; ++j) {
    const int v = b->qs[j];
    q[j] = int8_t((v & 0xF) - 8);
    q[j + 16] = int8_t((v >> 4) - 8);
  }
  return group_scale(b, g);
}

TP_HD WGroup unpack_group(const block_q4_1* b, int g, int8_t* q) {
  for (int j = 0; j < 16; ++j) {
    const int v = b->qs[j];
    q[j] = int8_t(v & 0xF);
    q[j + 16] = int8_t(v >> 4);
  }
  return group_scale(b, g);
}

TP_HD WGroup unpack_group(const block_q5_0* b, int g, int8_t* q) {
  const uint32_t qh = load_u32_le(b->qh);  // bytewise: the block is only 2-byte aligned
  for (int j = 0; j < 16; ++j) {
    const int v = b->qs[j];
    q[j] = int8_t(((v & 0xF) | int(((qh >> j) & 1) << 4)) - 16);
    q[j + 16] = int8_t(((v >> 4) | int(((qh >> (j + 16)) & 1) << 4)) - 16);
  }
  return group_scale(b, g);
}

TP_HD WGroup unpack_group(const block_q5_1* b, int g, int8_t* q) {
  const uint32_t qh = load_u32_le(b->qh);
  for (int j = 0; j < 16; ++j) {
    const int v = b->qs[j];
    q[j] = int8_t((v & 0xF) | int(((qh >> j) & 1) << 4));
    q[j + 16] = int8_t((v >> 4) | int(((qh >> (j + 16)) & 1) << 4));
  }
  return group_scale(b, g);
}

TP_HD WGroup unpack_group(const block_q8_0* b, int g, int8_t* q) {
  for (int j = 0; j < 32; ++j) q[j] = b->qs[j];
  return group_scale(b, g);
}

// Q4_K group g: chunk g/2 of qs, low nibbles for even g, high nibbles for odd g (GGUF_SPEC §2.3).
TP_HD WGroup unpack_group(const block_q4_K* b, int g, int8_t* q) {
  const uint8_t* qs = b->qs + 32 * (g >> 1);
  const int shift = 4 * (g & 1);
  for (int l = 0; l < 32; ++l) q[l] = int8_t((qs[l] >> shift) & 0xF);
  return group_scale(b, g);
}

// Q5_K: as Q4_K plus bit g of qh[l] as the 5th bit (GGUF_SPEC §2.4).
TP_HD WGroup unpack_group(const block_q5_K* b, int g, int8_t* q) {
  const uint8_t* qs = b->qs + 32 * (g >> 1);
  const int shift = 4 * (g & 1);
  for (int l = 0; l < 32; ++l) q[l] = int8_t(((qs[l] >> shift) & 0xF) | (((b->qh[l] >> g) & 1) << 4));
  return group_scale(b, g);
}

// Q6_K group g = 4h + r covers elements 128h + 32r + l (GGUF_SPEC §2.5): low 4 bits from ql[64h + l]
// (r even) or ql[64h + 32 + l] (r odd), low nibble for r < 2; high 2 bits from qh[32h + l] >> 2r.
TP_HD WGroup unpack_group(const block_q6_K* b, int g, int8_t* q) {
  const int h = g >> 2, r = g & 3;
  const uint8_t* ql = b->ql + 64 * h + 32 * (r & 1);
  const uint8_t* qh = b->qh + 32 * h;
  const int lshift = 4 * (r >> 1), hshift = 2 * r;
  for (int l = 0; l < 32; ++l)
    q[l] = int8_t((((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4)) - 32);
  return group_scale(b, g);
}

// MXFP4: the doubled E2M1 values are small integers, so q is exact and d the halved power-of-two scale.
TP_HD WGroup unpack_group(const block_mxfp4* b, int g, int8_t* q) {
  for (int j = 0; j < 16; ++j) {
    q[j] = mxfp4_value(b->qs[j] & 0xF);
    q[j + 16] = mxfp4_value(b->qs[j] >> 4);
  }
  return group_scale(b, g);
}

// Group `gi` of a row counted from the row start (gi * 32 elements in), for any block type.
template <class B>
TP_HD WGroup unpack_row_group(const B* row, int64_t gi, int8_t* q) {
  constexpr int G = Unpack<B>::kGroups;
  return unpack_group(row + gi / G, int(gi % G), q);
}

// ---- activations: 32 floats -> int8 q[32] + AGroup ------------------------------------------------------

TP_HD float q8_scale(float amax) { return amax / 127.0f; }

// round(x / d), ties away from zero (roundf); 0 for an all-zero group. |x| <= amax keeps |q| <= 127:
// x / d exceeds 127 by at most an ulp, far from the 127.5 that would round to 128.
TP_HD int8_t q8_quantize(float x, float d) { return d == 0.0f ? int8_t(0) : int8_t(roundf(x / d)); }

// d * Σq; Σq is an exact integer (|Σq| <= 32 * 127), so this rounds once.
TP_HD float q8_sum(float d, int32_t sum_q) { return d * float(sum_q); }

TP_HD AGroup quantize_group(const float* x, int8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(x[i]));
  const float d = q8_scale(amax);
  int32_t sum_q = 0;
  for (int i = 0; i < 32; ++i) {
    q[i] = q8_quantize(x[i], d);
    sum_q += q[i];
  }
  return {d, q8_sum(d, sum_q)};
}

// ---- the dot of one weight group with one activation group ----------------------------------------------

TP_HD int32_t dot_i8(const int8_t* a, const int8_t* b, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += int32_t(a[i]) * int32_t(b[i]);
  return s;
}

// Σ x_i a_i for one group from the integer half-sums (see the file comment). |s_lo|, |s_hi| <= 16*128*127,
// and their sum fits int32 and is exact in f32 (< 2^24).
template <bool kSplit, bool kOffset>
TP_HD float group_dot(const WGroup& w, const AGroup& a, int32_t s_lo, int32_t s_hi) {
  float r;
  if constexpr (kSplit)
    r = a.d * (w.d[0] * float(s_lo) + w.d[1] * float(s_hi));
  else
    r = (w.d[0] * a.d) * float(s_lo + s_hi);
  if constexpr (kOffset) r += w.m * a.s;
  return r;
}

// Calls f(BlockTag<B>{}) with the block struct of `type` and returns its result; `otherwise` for a type
// that has no int8 unpacking (F32/F16/BF16, Q2_K, Q3_K, ...). Host-side dispatch for launchers and tests.
template <class B>
struct BlockTag {
  using type = B;
};
template <class R, class F>
R visit_unpack_type(GgmlType type, R otherwise, F&& f) {
  switch (type) {
    case GgmlType::Q4_0: return f(BlockTag<block_q4_0>{});
    case GgmlType::Q4_1: return f(BlockTag<block_q4_1>{});
    case GgmlType::Q5_0: return f(BlockTag<block_q5_0>{});
    case GgmlType::Q5_1: return f(BlockTag<block_q5_1>{});
    case GgmlType::Q8_0: return f(BlockTag<block_q8_0>{});
    case GgmlType::Q4_K: return f(BlockTag<block_q4_K>{});
    case GgmlType::Q5_K: return f(BlockTag<block_q5_K>{});
    case GgmlType::Q6_K: return f(BlockTag<block_q6_K>{});
    case GgmlType::MXFP4: return f(BlockTag<block_mxfp4>{});
    default: return otherwise;
  }
}

}  // namespace tp
