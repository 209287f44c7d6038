// gemv.cpp — the CPU int8 matmul for a few tokens (decode steps): each weight row is dotted straight from
// its packed blocks, with no row tile.
//
// Why: the tile path (matmul.cpp) decodes 32 rows into an int8 tile in memory and then multiplies it with
// every token of the ubatch. With one token the tile is used once, and decoding and storing it cost about
// twice the multiply (perf on a SmolLM2 decode step: 66% in decode_tile). Here four rows at a time are
// unpacked group by group into AVX2 registers (one 32-byte vector per row and group, by the per-type
// decoders below), their scales converted once per block for the four rows (F16C), and the groups dotted
// right away with the quants of up to 4 tokens (more in blocks of 4, up to kGemvMaxTokens). The four row
// streams are software-prefetched one 4-row step ahead. A one-token step of SmolLM2 / Gemma 3 270M on one
// thread went from 37.7 / 117 ms through the tile path to about 12 / 28 ms (bench/README.md, "Decode").
//
// Exactness. The integer sums are exact, so only the f32 steps matter, and they are the tile kernels' own.
// Per (row, token), over the groups in order:
//     acc = fma(d_w[h] * d, float(s_h), acc)   for each scale half h (one, the whole group, unless kSplit)
//     acc = fma(m, s_a, acc)                   for the offset types
// with s_h = Σ q_w (128 q1 + q2) over the half's elements, an exact integer however it is formed: here as
// Σ (q_w + bias)(128 q1 + q2) - bias Σ (128 q1 + q2) with the stored unsigned codes (the tile kernels do the
// same), and for Q8_0 from |q_w| and the activations with q_w's sign. The scales are the same f32 products
// unpack.h's group_scale forms. So decode logits equal prefill logits bit for
// bit, whichever path each takes (tests/test_cpu_kernels.py).
#include <cstring>
#include <type_traits>

#include "backend/cpu/int8_act.h"
#include "quant/blocks.h"
#include "quant/unpack.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TP_GEMV_X86 1
#else
#define TP_GEMV_X86 0
#endif

namespace tp {

#if TP_GEMV_X86
namespace {

#define TP_GEMV_TARGET __attribute__((target("avx2,fma,f16c")))
#define TP_GEMV_INLINE TP_GEMV_TARGET __attribute__((always_inline)) inline

TP_GEMV_INLINE __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

TP_GEMV_INLINE __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
TP_GEMV_INLINE __m256i high_nibbles(__m256i v) {
  return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
}

// 16 packed bytes -> their low nibbles as elements 0..15, high nibbles as 16..31 (the legacy 4-bit layout).
TP_GEMV_INLINE __m256i nibbles16(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// Bit j of x -> byte j = 0x10 (the legacy 5-bit types' high bit in place).
TP_GEMV_INLINE __m256i bit4_of(uint32_t x) {
  // Byte j picks byte j / 8 of x (the shuffle stays inside each 128-bit lane, which holds all 4 bytes).
  const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int32_t(x)), pick);
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));  // byte j: 1 << (j % 8)
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(0x10));
}

// Dec<B>::q(block, g): the quants of group g in element order, biased to unsigned (q + bias_of<B>, the
// stored code for every type but MXFP4), except Q8_0, whose signed bytes are used as they are (biased they
// would reach 255 and vpmaddubsw's pair sums 255 * 127 * 2 would saturate).
template <class B>
constexpr int bias_of() {
  return std::is_same_v<B, block_q8_0> ? 0 : Unpack<B>::kQMin < 0 ? -Unpack<B>::kQMin : 0;
}

template <class B>
struct Dec;

template <>
struct Dec<block_q4_0> {
  static TP_GEMV_INLINE __m256i q(const block_q4_0* b, int) { return nibbles16(b->qs); }
};
template <>
struct Dec<block_q4_1> {
  static TP_GEMV_INLINE __m256i q(const block_q4_1* b, int) { return nibbles16(b->qs); }
};
template <>
struct Dec<block_q5_0> {
  static TP_GEMV_INLINE __m256i q(const block_q5_0* b, int) {
    return _mm256_or_si256(nibbles16(b->qs), bit4_of(load_u32_le(b->qh)));
  }
};
template <>
struct Dec<block_q5_1> {
  static TP_GEMV_INLINE __m256i q(const block_q5_1* b, int) {
    return _mm256_or_si256(nibbles16(b->qs), bit4_of(load_u32_le(b->qh)));
  }
};
template <>
struct Dec<block_q8_0> {
  static TP_GEMV_INLINE __m256i q(const block_q8_0* b, int) { return load32(b->qs); }
};
template <>
struct Dec<block_q4_K> {
  static TP_GEMV_INLINE __m256i q(const block_q4_K* b, int g) {
    const __m256i v = load32(b->qs + 32 * (g >> 1));
    return g & 1 ? high_nibbles(v) : low_nibbles(v);
  }
};
template <>
struct Dec<block_q5_K> {
  static TP_GEMV_INLINE __m256i q(const block_q5_K* b, int g) {
    const __m256i v = load32(b->qs + 32 * (g >> 1));
    const __m256i bit = _mm256_set1_epi8(char(1 << g));
    const __m256i hi = _mm256_cmpeq_epi8(_mm256_and_si256(load32(b->qh), bit), bit);
    return _mm256_or_si256(g & 1 ? high_nibbles(v) : low_nibbles(v), _mm256_and_si256(hi, _mm256_set1_epi8(0x10)));
  }
};
template <>
struct Dec<block_q6_K> {
  static TP_GEMV_INLINE __m256i q(const block_q6_K* b, int g) {
    const int h = g >> 2, r = g & 3;
    const __m256i ql = load32(b->ql + 64 * h + 32 * (r & 1));
    const __m256i lo = r >> 1 ? high_nibbles(ql) : low_nibbles(ql);
    // Bits 2r, 2r+1 of each qh byte; bits shifted in from the neighbouring byte are masked off.
    const __m256i qh = _mm256_srl_epi16(load32(b->qh + 32 * h), _mm_cvtsi32_si128(2 * r));
    const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(3)), 4);  // <= 0x30: stays in its byte
    return _mm256_or_si256(lo, hi);
  }
};
template <>
struct Dec<block_mxfp4> {
  static TP_GEMV_INLINE __m256i q(const block_mxfp4* b, int) {
    // mxfp4_value(code) + 12 for codes 0..15, in both 128-bit lanes for the in-lane byte shuffle.
    const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,  //
                                         12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
    return _mm256_shuffle_epi8(lut, nibbles16(b->qs));
  }
};

// Four rows' f16 fields as f32 lanes (F16C converts exactly as unpack_f16 does; a signaling NaN comes out
// quiet, but every use of a scale is arithmetic, which quiets it on the scalar path too).
TP_GEMV_INLINE __m128 f16x4(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
  return _mm_cvtph_ps(_mm_setr_epi16(short(a), short(b), short(c), short(d), 0, 0, 0, 0));
}

// The WGroup fields of the kGroups groups of four rows' blocks, as lanes. Each lane is the same f32 value
// unpack.h's group_scale returns.
template <class B>
struct Scales4 {
  __m128 d0[Unpack<B>::kGroups], d1[Unpack<B>::kGroups], m[Unpack<B>::kGroups];
};

template <class B>
TP_GEMV_INLINE void block_scales4(const B* const* b, Scales4<B>& S) {
  constexpr bool kLegacy = std::is_same_v<B, block_q4_0> || std::is_same_v<B, block_q4_1> ||
                           std::is_same_v<B, block_q5_0> || std::is_same_v<B, block_q5_1> ||
                           std::is_same_v<B, block_q8_0>;
  constexpr bool kK4 = std::is_same_v<B, block_q4_K> || std::is_same_v<B, block_q5_K>;
  if constexpr (kLegacy) {
    S.d0[0] = S.d1[0] = f16x4(b[0]->d, b[1]->d, b[2]->d, b[3]->d);
    if constexpr (Unpack<B>::kOffset)
      S.m[0] = f16x4(b[0]->m, b[1]->m, b[2]->m, b[3]->m);
    else
      S.m[0] = _mm_set1_ps(-0.0f);
  } else if constexpr (kK4) {
    // d * sc and -(dmin * m) per group, as k4_scale forms them.
    const __m128 d = f16x4(b[0]->d, b[1]->d, b[2]->d, b[3]->d);
    const __m128 dmin = f16x4(b[0]->dmin, b[1]->dmin, b[2]->dmin, b[3]->dmin);
    for (int g = 0; g < 8; ++g) {
      alignas(16) float sc[4], mn[4];
      for (int r = 0; r < 4; ++r) {
        uint8_t s, m;
        get_scale_min_k4(g, b[r]->scales, &s, &m);
        sc[r] = float(s);
        mn[r] = float(m);
      }
      S.d0[g] = S.d1[g] = _mm_mul_ps(d, _mm_load_ps(sc));
      S.m[g] = _mm_xor_ps(_mm_mul_ps(dmin, _mm_load_ps(mn)), _mm_set1_ps(-0.0f));
    }
  } else if constexpr (std::is_same_v<B, block_q6_K>) {
    const __m128 d = f16x4(b[0]->d, b[1]->d, b[2]->d, b[3]->d);
    for (int g = 0; g < 8; ++g) {
      S.d0[g] = _mm_mul_ps(d, _mm_setr_ps(float(b[0]->scales[2 * g]), float(b[1]->scales[2 * g]),
                                          float(b[2]->scales[2 * g]), float(b[3]->scales[2 * g])));
      S.d1[g] = _mm_mul_ps(d, _mm_setr_ps(float(b[0]->scales[2 * g + 1]), float(b[1]->scales[2 * g + 1]),
                                          float(b[2]->scales[2 * g + 1]), float(b[3]->scales[2 * g + 1])));
      S.m[g] = _mm_set1_ps(-0.0f);
    }
  } else {
    for (int g = 0; g < Unpack<B>::kGroups; ++g) {
      alignas(16) float s0[4], s1[4], sm[4];
      for (int r = 0; r < 4; ++r) {
        const WGroup wg = group_scale(b[r], g);
        s0[r] = wg.d[0];
        s1[r] = wg.d[1];
        sm[r] = wg.m;
      }
      S.d0[g] = _mm_load_ps(s0);
      S.d1[g] = _mm_load_ps(s1);
      S.m[g] = _mm_load_ps(sm);
    }
  }
}

// Rows r0 .. r0 + nr - 1 (nr <= 4) times NT tokens: out[t * ldo + r - r0].
template <class B, int NT>
TP_GEMV_TARGET void rows4(const Tensor& w, int64_t r0, int nr, int64_t G, const int8_t* xq, int64_t ldx,
                          const AMeta* am, float* out, int64_t ldo) {
  constexpr int kG = Unpack<B>::kGroups, kBias = bias_of<B>();
  constexpr bool kSplit = Unpack<B>::kSplit, kOffset = Unpack<B>::kOffset;
  constexpr bool kSigned = std::is_same_v<B, block_q8_0>;
  const B* row[4];
  for (int r = 0; r < 4; ++r) row[r] = reinterpret_cast<const B*>(w.row(r0 + (r < nr ? r : 0)));  // pad: row 0
  const int64_t ahead = 4 * w.row_bytes;
  const __m256i ones = _mm256_set1_epi16(1), c128 = _mm256_set1_epi16(128);
  __m128 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm_setzero_ps();
  for (int64_t blk = 0; blk < G / kG; ++blk) {
    const B* b[4] = {row[0] + blk, row[1] + blk, row[2] + blk, row[3] + blk};
    // The same block of the next four rows: the hardware prefetchers alone left the loads of the four
    // interleaved row streams waiting on memory (perf; this distance measured best against fixed ones).
    for (int r = 0; r < 4; ++r)
      for (int64_t off = 0; off < int64_t(sizeof(B)); off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(b[r]) + ahead + off, _MM_HINT_T0);
    Scales4<B> S;
    block_scales4<B>(b, S);
    for (int sub = 0; sub < kG; ++sub) {
      const int64_t g = blk * kG + sub;
      __m256i q[4];
      for (int r = 0; r < 4; ++r) q[r] = Dec<B>::q(b[r], sub);
      const __m128 vd0 = S.d0[sub], vd1 = S.d1[sub], vm = S.m[sub];
      __m256i qa[4];  // the unsigned operand of vpmaddubsw
      if constexpr (kSigned)
        for (int r = 0; r < 4; ++r) qa[r] = _mm256_abs_epi8(q[r]);  // -128 -> 0x80, read as the unsigned 128
      else
        for (int r = 0; r < 4; ++r) qa[r] = q[r];
      for (int t = 0; t < NT; ++t) {
        const int8_t* a = xq + t * ldx + kActBytes * g;
        const __m256i a1 = load32(a), a2 = load32(a + 32);
        __m256i v[4];
        for (int r = 0; r < 4; ++r) {
          // |pair sums| <= 2 * 128 * 127 < 2^15 (Q8_0; the biased types <= 2 * 63 * 127): never saturates.
          const __m256i s1 = kSigned ? _mm256_sign_epi8(a1, q[r]) : a1;
          const __m256i s2 = kSigned ? _mm256_sign_epi8(a2, q[r]) : a2;
          // Lane i: elements 4i .. 4i + 3.
          v[r] = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(qa[r], s1), c128),
                                  _mm256_madd_epi16(_mm256_maddubs_epi16(qa[r], s2), ones));
        }
        // [row 0..3: elements 0..15 | row 0..3: elements 16..31]
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        __m128i lo = _mm256_castsi256_si128(h), hi = _mm256_extracti128_si256(h, 1);
        const AMeta& ma = am[t * G + g];
        const __m128 da = _mm_set1_ps(ma.d);
        if (kSplit) {
          if (kBias) {  // remove the bias: Σ (q + bias) a - bias Σ a
            lo = _mm_sub_epi32(lo, _mm_set1_epi32(kBias * ma.lo));
            hi = _mm_sub_epi32(hi, _mm_set1_epi32(kBias * ma.hi));
          }
          acc[t] = _mm_fmadd_ps(_mm_mul_ps(vd0, da), _mm_cvtepi32_ps(lo), acc[t]);
          acc[t] = _mm_fmadd_ps(_mm_mul_ps(vd1, da), _mm_cvtepi32_ps(hi), acc[t]);
        } else {
          __m128i s = _mm_add_epi32(lo, hi);
          if (kBias) s = _mm_sub_epi32(s, _mm_set1_epi32(kBias * (ma.lo + ma.hi)));
          acc[t] = _mm_fmadd_ps(_mm_mul_ps(vd0, da), _mm_cvtepi32_ps(s), acc[t]);
        }
        if (kOffset) acc[t] = _mm_fmadd_ps(vm, _mm_set1_ps(ma.s), acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    alignas(16) float res[4];
    _mm_store_ps(res, acc[t]);
    for (int r = 0; r < nr; ++r) out[t * ldo + r] = res[r];
  }
}

// Rows [r0, r1) of w times n_tok tokens: out[t * ldo + r - r0].
template <class B>
void gemv_range(const Tensor& w, int64_t r0, int64_t r1, const int8_t* xq, int64_t ldx, const AMeta* am,
                int64_t n_tok, float* out, int64_t ldo) {
  using Fn = void (*)(const Tensor&, int64_t, int, int64_t, const int8_t*, int64_t, const AMeta*, float*, int64_t);
  static constexpr Fn kFn[4] = {rows4<B, 1>, rows4<B, 2>, rows4<B, 3>, rows4<B, 4>};
  const int64_t G = w.cols / 32;
  for (int64_t r = r0; r < r1; r += 4) {
    const int nr = int(r1 - r < 4 ? r1 - r : 4);
    // Blocks of 4 tokens (more would spill registers); the four rows stay in L1 between them.
    for (int64_t t = 0; t < n_tok; t += 4) {
      const int64_t nt = n_tok - t < 4 ? n_tok - t : 4;
      kFn[nt - 1](w, r, nr, G, xq + t * ldx, ldx, am + t * G, out + t * ldo + (r - r0), ldo);
    }
  }
}

template <class B>
void gemv(ThreadPool& pool, float* out, const Tensor& w, const int8_t* xq, int64_t ldx, const AMeta* am,
          int64_t n_tok) {
  const int64_t N = w.rows;
  // About 8 work items per thread (at least 16 rows each): a 16-row item is only ~1 us of work on a small
  // projection, and claiming that many items cost a third of a 2-thread SmolLM2 step (9.8 vs 6.9 ms).
  const int64_t per = (N + 8 * pool.size() - 1) / (8 * pool.size());
  const int64_t rows_per_item = per < 16 ? 16 : (per + 3) / 4 * 4;
  pool.parallel_for((N + rows_per_item - 1) / rows_per_item, 1, [&](int64_t b, int64_t e, int) {
    const int64_t r0 = b * rows_per_item, r1 = e * rows_per_item < N ? e * rows_per_item : N;
    gemv_range<B>(w, r0, r1, xq, ldx, am, n_tok, out + r0, N);
  });
}

}  // namespace
#endif

bool cpu_gemv_int8(ThreadPool& pool, float* out, const Tensor& w, const int8_t* xq, int64_t ldx, const AMeta* am,
                   int64_t n_tok, int isa) {
#if TP_GEMV_X86
  if (isa < kIsaAvx2 || n_tok < 1 || n_tok > kGemvMaxTokens) return false;
  return visit_unpack_type(w.type, false, [&](auto tag) {
    gemv<typename decltype(tag)::type>(pool, out, w, xq, ldx, am, n_tok);
    return true;
  });
#else
  (void)pool, (void)out, (void)w, (void)xq, (void)ldx, (void)am, (void)n_tok, (void)isa;
  return false;
#endif
}

bool cpu_gemv_int8_rows(const Tensor& w, int64_t r0, int64_t r1, const int8_t* xq, int64_t ldx, const AMeta* am,
                        int64_t n_tok, float* out, int64_t ldo, int isa) {
#if TP_GEMV_X86
  if (isa < kIsaAvx2 || n_tok < 1 || n_tok > kGemvMaxTokens) return false;
  return visit_unpack_type(w.type, false, [&](auto tag) {
    gemv_range<typename decltype(tag)::type>(w, r0, r1, xq, ldx, am, n_tok, out, ldo);
    return true;
  });
#else
  (void)w, (void)r0, (void)r1, (void)xq, (void)ldx, (void)am, (void)n_tok, (void)out, (void)ldo, (void)isa;
  return false;
#endif
}

}  // namespace tp
