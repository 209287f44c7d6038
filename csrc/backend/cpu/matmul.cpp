// matmul.cpp — CPU matmul: quantized weights × f32 activations through int8 dot products.
//
// Quantized weights (every type unpack.h decodes) take the int8 path:
//  1. Activations are quantized once per op, per token row and 32-element group, in two int8 stages:
//     q1 by unpack.h's quantizer (d1 = amax / 127, round half away from zero), then q2 = q8_quantize of
//     the residual x - d1 q1 at the fixed step d = d1 / 128 (|q2| <= 64), so x ≈ d (128 q1 + q2) with
//     ~15 bits per value. One int8 stage (llama.cpp's precision) moved Gemma 3 270M's logits by ~2% and
//     failed the 0.999-cosine bar vs llama.cpp on a long prompt; two stages track the exact f32 result
//     (tests/test_engine.py, tests/test_real_models.py). Vectorized bit-exactly on AVX-512.
//  2. Rows are split into tiles of kTileRows = 32. A thread decodes its tile with unpack.h's unpack_group
//     into a thread-local, SIMD-friendly layout — never the whole matrix, so weights stay zero-copy views
//     into the mmap and memory stays the file size: for group g, 4-byte chunk c (elements 4c..4c+3) of
//     the 32 rows lie side by side (byte offset g*1024 + c*128 + row*4), quants biased to unsigned
//     (q - kQMin for the signed types), plus the f32 scales/offsets per (group, row).
//  3. The tile is multiplied with blocks of 2-4 tokens: with AVX-512 VNNI one vpdpbusd multiplies the 32
//     rows' 4-byte chunks (two zmm) with one token's 4 activation bytes (broadcast), so each int32 lane is
//     one row's group sum and no horizontal reduction is needed. AVX2 has no such instruction: there the
//     activations are also written as int16 128 q1 + q2 and the tile widened to int16 quants without
//     bias (widen_tile), so one vpmaddwd per 8 rows and element pair does what takes two vpmaddubsw and
//     two vpmaddwd on the int8 layout (1.27-1.34x prefill on a Zen 3 machine; bench/README.md). A scalar
//     loop is the portable fallback.
//  4. Per group (or Q6_K half-group), s = 128 s1 + s2 - bias * Σ(128 q1 + q2) is exact in int32, then
//         acc = fma(d_w * d, float(s), acc);  acc = fma(m, s_a, acc)   (offset types, s_a = d Σ(128 q1 + q2))
// Every ISA evaluates exactly this sequence per (row, token) — integer sums are exact, the f32 steps are
// the same IEEE operations in the same order — so the results are bit-identical across AVX-512, AVX2 and
// scalar, across thread counts, and across ubatch splits (tests/test_cpu_kernels.py checks it).
//
// F32/F16/BF16 (and types without int8 unpacking) take the f32 path in matmul_f32.cpp.
//
// ISA: the library is built for baseline x86-64; the int8 kernels carry __attribute__((target)) and are
// picked at run time with __builtin_cpu_supports (cpu_set_isa_override forces a lower level for tests).
#include <atomic>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags the _mm512_undefined_* values inside its own intrinsics as maybe-uninitialized.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define TP_X86 1
#else
#define TP_X86 0
#endif

#include "backend/cpu/int8_act.h"
#include "backend/cpu/kernels.h"
#include "quant/blocks.h"
#include "quant/unpack.h"

namespace tp {

namespace {

// ---------------------------------------------------------------------------------------------------------
// int8 path
// ---------------------------------------------------------------------------------------------------------

std::atomic<int> g_isa_override{-1};

int detect_isa() {
#if TP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return kIsaAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#endif
  return kIsaScalar;
}

}  // namespace

int int8_active_isa() {
  static const int detected = detect_isa();
  const int o = g_isa_override.load(std::memory_order_relaxed);
  return o >= 0 && o < detected ? o : detected;
}

int vec_isa() {
#if TP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;  // (every such CPU has F16C)
#endif
  return 0;
}

namespace {

constexpr int kTileRows = 32;
constexpr int kGroupBytes = 32 * kTileRows;  // one group of a tile: 8 chunks × 32 rows × 4 bytes
constexpr int kTokBlk = 4;

// Whether type B's kernels use both stages. All types do: one stage alone (int8 activations, llama.cpp's
// precision) is ~1.5x faster for the 4-bit types but measured cosine 0.99899 vs llama.cpp on the long
// Gemma 3 prompt of tests/test_real_models.py (bar 0.999; the exact f32 engine: 0.99904), so the one-stage
// kernels (k2 = false) are kept compiled but unused until a per-type or per-row policy is measured.
template <class B>
constexpr bool two_stage() {
  return true;
}

// A decoded tile of kTileRows rows (see the file comment).
struct Tile {
  std::vector<uint8_t> q;            // [G][8][kTileRows][4]
  std::vector<int16_t> w;            // AVX2: [G][16][kTileRows][2] signed quants (widen_tile)
  std::vector<float> d0, d1, m;      // [G][kTileRows]
  void reserve(int64_t G, bool wide) {
    if (wide && int64_t(w.size()) < G * kGroupBytes) w.resize(size_t(G * kGroupBytes));
    if (int64_t(q.size()) < G * kGroupBytes) {
      q.resize(size_t(G * kGroupBytes));
      d0.resize(size_t(G * kTileRows));
      d1.resize(size_t(G * kTileRows));
      m.resize(size_t(G * kTileRows));
    }
  }
};

template <class B>
constexpr int bias_of() {
  return Unpack<B>::kQMin < 0 ? -Unpack<B>::kQMin : 0;
}

// MXFP4 is the expert format of gpt-oss, where a ubatch gives each expert few tokens and decoding the tile is
// as costly as multiplying it: its codes map to the biased quants (value + 12) by one 16-entry table lookup
// per nibble (pshufb where the CPU has SSSE3) instead of unpack_group's per-element arithmetic. Same values.
constexpr uint8_t kMxfp4Biased[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
static_assert(kMxfp4Biased[7] == 12 + 12 && kMxfp4Biased[15] == 12 - 12, "value + bias_of<block_mxfp4>()");

#if TP_X86
__attribute__((target("ssse3"))) void mxfp4_lookup_ssse3(const uint8_t* qs, uint8_t* u) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kMxfp4Biased));
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), m = _mm_set1_epi8(0x0F);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u), _mm_shuffle_epi8(lut, _mm_and_si128(v, m)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(u + 16), _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m)));
}
#endif

WGroup unpack_mxfp4_biased(const block_mxfp4& b, uint8_t* u) {
#if TP_X86
  static const bool ssse3 = __builtin_cpu_supports("ssse3");
  if (ssse3) {
    mxfp4_lookup_ssse3(b.qs, u);
  } else
#endif
  {
    for (int j = 0; j < 16; ++j) {
      u[j] = kMxfp4Biased[b.qs[j] & 0xF];
      u[j + 16] = kMxfp4Biased[b.qs[j] >> 4];
    }
  }
  return group_scale(&b, 0);
}

// Decodes rows [r0, r0 + nr) of w into T; rows nr.. of the tile are zero.
template <class B>
void decode_tile(const Tensor& w, int64_t r0, int nr, int64_t G, Tile& T) {
  constexpr int bias = bias_of<B>();
  for (int r = 0; r < kTileRows; ++r) {
    if (r >= nr) {
      for (int64_t g = 0; g < G; ++g) {
        for (int c = 0; c < 8; ++c) memset(&T.q[size_t(g * kGroupBytes + c * 4 * kTileRows + r * 4)], 0, 4);
        T.d0[size_t(g * kTileRows + r)] = T.d1[size_t(g * kTileRows + r)] = T.m[size_t(g * kTileRows + r)] = 0;
      }
      continue;
    }
    const B* row = reinterpret_cast<const B*>(w.row(r0 + r));
    for (int64_t g = 0; g < G; ++g) {
      uint8_t u[32];
      WGroup wg;
      if constexpr (std::is_same_v<B, block_mxfp4>) {
        wg = unpack_mxfp4_biased(row[g], u);
      } else {
        int8_t q[32];
        wg = unpack_row_group(row, g, q);
        for (int i = 0; i < 32; ++i) u[i] = uint8_t(int(q[i]) + bias);
      }
      uint8_t* dst = &T.q[size_t(g * kGroupBytes + r * 4)];
      for (int c = 0; c < 8; ++c) memcpy(dst + c * 4 * kTileRows, u + 4 * c, 4);
      T.d0[size_t(g * kTileRows + r)] = wg.d[0];
      T.d1[size_t(g * kTileRows + r)] = wg.d[1];
      T.m[size_t(g * kTileRows + r)] = wg.m;
    }
  }
}

// The AVX2 kernels' layout of a decoded tile: for group g, element pair p (elements 2p, 2p+1) of the 32 rows
// side by side as int16 (offset g*1024 + p*64 + row*2), the quants without their bias.
template <class B>
void widen_tile(Tile& T, int64_t G) {
  constexpr int bias = bias_of<B>();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* u = &T.q[size_t(g * kGroupBytes)];
    int16_t* w = &T.w[size_t(g * kGroupBytes)];
    for (int c = 0; c < 8; ++c)
      for (int r = 0; r < kTileRows; ++r)
        for (int j = 0; j < 4; ++j)
          w[(2 * c + j / 2) * 2 * kTileRows + r * 2 + (j & 1)] = int16_t(int(u[c * 4 * kTileRows + r * 4 + j]) - bias);
  }
}

// ---- activation quantization ------------------------------------------------------------------------------

// Stage 1 is unpack.h's quantize_group (d1 = amax / 127); stage 2 quantizes the residual r = x - d1 q1
// (rounded once, fma; |r| <= d1 / 2 (1 + 2^-23)) with q8_quantize at the fixed step d1 / 128, so |q2| <= 64.
void quantize_row_scalar(const float* x, int64_t K, int8_t* q, AMeta* meta) {
  for (int64_t g = 0; g < K / 32; ++g) {
    int8_t* q1 = q + kActBytes * g;
    int8_t* q2 = q1 + 32;
    const AGroup a1 = quantize_group(x + 32 * g, q1);
    const float d = a1.d * (1.0f / 128.0f);
    int32_t lo = 0, hi = 0, lo1 = 0, hi1 = 0;
    for (int i = 0; i < 32; ++i) {
      const float r = std::fma(-a1.d, float(q1[i]), x[32 * g + i]);
      q2[i] = q8_quantize(r, d);
      (i < 16 ? lo : hi) += 128 * q1[i] + q2[i];
      (i < 16 ? lo1 : hi1) += q1[i];
    }
    meta[g] = {d, q8_sum(d, lo + hi), lo, hi, a1.d, a1.s, lo1, hi1};
  }
}

#if TP_X86
#define TP_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// q8_quantize of 16 lanes, bit-identical: IEEE division, round half away from zero; d != 0.
TP_AVX512_TARGET inline __m512i q8_quantize16(__m512 v, __m512 dv) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  const __m512 y = _mm512_div_ps(v, dv);
  const __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m512 frac = _mm512_abs_ps(_mm512_sub_ps(y, t));  // exact
  const __mmask16 up = _mm512_cmp_ps_mask(frac, half, _CMP_GE_OQ);
  const __m512 step =
      _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(one), _mm512_and_si512(_mm512_castps_si512(y), sign)));
  return _mm512_maskz_cvttps_epi32(__mmask16(0xFFFF), _mm512_mask_add_ps(t, up, t, step));
}

TP_AVX512_TARGET void quantize_row_avx512(const float* x, int64_t K, int8_t* q, AMeta* meta) {
  for (int64_t g = 0; g < K / 32; ++g) {
    int8_t* q1 = q + kActBytes * g;
    const __m512 v[2] = {_mm512_loadu_ps(x + 32 * g), _mm512_loadu_ps(x + 32 * g + 16)};
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const float d1 = q8_scale(amax);
    if (d1 == 0.0f) {
      memset(q1, 0, kActBytes);
      meta[g] = {0.0f, q8_sum(0.0f, 0), 0, 0, 0.0f, q8_sum(0.0f, 0), 0, 0};
      continue;
    }
    const float d = d1 * (1.0f / 128.0f);
    const __m512 d1v = _mm512_set1_ps(d1), dv = _mm512_set1_ps(d), nd1 = _mm512_set1_ps(-d1);
    int32_t sums[2], sums1[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i i1 = q8_quantize16(v[h], d1v);
      const __m512 r = _mm512_fmadd_ps(nd1, _mm512_maskz_cvtepi32_ps(__mmask16(0xFFFF), i1), v[h]);
      const __m512i i2 = d == 0.0f ? _mm512_setzero_si512() : q8_quantize16(r, dv);  // d1 / 128 underflowed
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + 16 * h), _mm512_cvtepi32_epi8(i1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + 32 + 16 * h), _mm512_cvtepi32_epi8(i2));
      sums[h] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(i1, 7), i2));
      sums1[h] = _mm512_reduce_add_epi32(i1);
    }
    meta[g] = {d, q8_sum(d, sums[0] + sums[1]), sums[0], sums[1], d1, q8_sum(d1, sums1[0] + sums1[1]), sums1[0],
               sums1[1]};
  }
}
#endif

#if TP_X86
#define TP_AVX2_QTARGET __attribute__((target("avx2,fma")))

// q8_quantize of 8 lanes, bit-identical (as q8_quantize16): IEEE division, round half away from zero.
TP_AVX2_QTARGET inline __m256i q8_quantize8(__m256 v, __m256 dv) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 y = _mm256_div_ps(v, dv);
  const __m256 t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));  // exact
  const __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  const __m256 step = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(y, sign));  // ±1 with y's sign
  return _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, step)));
}

// 8 int32 lanes (each in [-128, 127]) to 8 int8 in lane order.
TP_AVX2_QTARGET inline void store_i8x8(int8_t* dst, __m256i v) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(w, w));
}

TP_AVX2_QTARGET inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// quantize_row_scalar on AVX2, bit-identical: the same divisions, roundings and one fma per element.
// w (may be null): the same values as int16 128 q1 + q2 (|.| <= 16320), 32 per group, for the AVX2 tile kernels.
TP_AVX2_QTARGET void quantize_row_avx2(const float* x, int64_t K, int8_t* q, AMeta* meta, int16_t* w) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t g = 0; g < K / 32; ++g) {
    int8_t* q1 = q + kActBytes * g;
    __m256 v[4], am = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 32 * g + 8 * i);
      am = _mm256_max_ps(am, _mm256_and_ps(v[i], absm));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float d1 = q8_scale(_mm_cvtss_f32(m4));
    if (d1 == 0.0f) {
      memset(q1, 0, kActBytes);
      if (w) memset(w + 32 * g, 0, 32 * sizeof(int16_t));
      meta[g] = {0.0f, q8_sum(0.0f, 0), 0, 0, 0.0f, q8_sum(0.0f, 0), 0, 0};
      continue;
    }
    const float d = d1 * (1.0f / 128.0f);
    const __m256 d1v = _mm256_set1_ps(d1), dv = _mm256_set1_ps(d), nd1 = _mm256_set1_ps(-d1);
    int32_t sums[2] = {0, 0}, sums1[2] = {0, 0};
    for (int i = 0; i < 4; ++i) {
      const __m256i i1 = q8_quantize8(v[i], d1v);
      const __m256 r = _mm256_fmadd_ps(nd1, _mm256_cvtepi32_ps(i1), v[i]);
      const __m256i i2 = d == 0.0f ? _mm256_setzero_si256() : q8_quantize8(r, dv);  // d1 / 128 underflowed
      store_i8x8(q1 + 8 * i, i1);
      store_i8x8(q1 + 32 + 8 * i, i2);
      const __m256i wide = _mm256_add_epi32(_mm256_slli_epi32(i1, 7), i2);
      if (w)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(w + 32 * g + 8 * i),
                         _mm_packs_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1)));
      sums[i / 2] += hsum8(wide);
      sums1[i / 2] += hsum8(i1);
    }
    meta[g] = {d, q8_sum(d, sums[0] + sums[1]), sums[0], sums[1], d1, q8_sum(d1, sums1[0] + sums1[1]), sums1[0],
               sums1[1]};
  }
}
#endif

// ---- tile × token-block kernels -----------------------------------------------------------------------------
//
// All kernels: tile T (G groups), NT tokens whose quants start at xq (stride K bytes) and metadata at am
// (stride G), output out[t * ldo + r] for r < nr.

template <class B, int NT>
void kernel_scalar(const Tile& T, int64_t G, const int8_t* xq, int64_t ldx, const AMeta* am, float* out, int64_t ldo,
                   int nr) {
  constexpr bool kSplit = Unpack<B>::kSplit, kOffset = Unpack<B>::kOffset;
  constexpr int bias = bias_of<B>();
  constexpr bool k2 = two_stage<B>();
  constexpr int kSt = k2 ? 2 : 1;
  for (int t = 0; t < NT; ++t) {
    for (int r = 0; r < nr; ++r) {
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* wq = &T.q[size_t(g * kGroupBytes + r * 4)];
        const AMeta& a = am[t * G + g];
        int32_t s[2][2] = {{0, 0}, {0, 0}};  // [stage][half]
        for (int st = 0; st < kSt; ++st) {
          const int8_t* aq = xq + t * ldx + kActBytes * g + 32 * st;
          for (int c = 0; c < 8; ++c)
            for (int j = 0; j < 4; ++j) s[st][c >> 2] += int32_t(wq[c * 4 * kTileRows + j]) * int32_t(aq[4 * c + j]);
        }
        const float dw[2] = {T.d0[size_t(g * kTileRows + r)], T.d1[size_t(g * kTileRows + r)]};
        for (int h = 0; h < (kSplit ? 2 : 1); ++h) {
          const int32_t lo = k2 ? a.lo : a.lo1, hi = k2 ? a.hi : a.hi1;
          const int32_t si = kSplit ? (k2 ? 128 * s[0][h] + s[1][h] : s[0][h]) - bias * (h == 0 ? lo : hi)
                                    : (k2 ? 128 * (s[0][0] + s[0][1]) + s[1][0] + s[1][1] : s[0][0] + s[0][1]) -
                                          bias * (lo + hi);
          const float ts = dw[h] * (k2 ? a.d : a.d1);
          acc = std::fma(ts, float(si), acc);
        }
        if (kOffset) acc = std::fma(T.m[size_t(g * kTileRows + r)], k2 ? a.s : a.s1, acc);
      }
      out[t * ldo + r] = acc;
    }
  }
}

#if TP_X86
static inline int32_t load_i32(const void* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

#define TP_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma")))

// 32 rows (two zmm of 16 int32 lanes) × NT tokens; per token and 4-byte chunk, one broadcast per stage.
template <class B, int NT>
TP_VNNI_TARGET void kernel_vnni(const Tile& T, int64_t G, const int8_t* xq, int64_t ldx, const AMeta* am, float* out,
                                int64_t ldo, int nr) {
  constexpr bool kSplit = Unpack<B>::kSplit, kOffset = Unpack<B>::kOffset;
  constexpr int bias = bias_of<B>();
  constexpr bool k2 = two_stage<B>();
  constexpr int kSt = k2 ? 2 : 1;
  __m512 fa[2][NT];
  for (int v = 0; v < 2; ++v)
    for (int t = 0; t < NT; ++t) fa[v][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = T.q.data() + g * kGroupBytes;
    const int8_t* ag = xq + kActBytes * g;
    for (int h = 0; h < (kSplit ? 2 : 1); ++h) {
      __m512i ia[2][2][NT];  // [row vector][stage][token]
      for (int v = 0; v < 2; ++v)
        for (int st = 0; st < kSt; ++st)
          for (int t = 0; t < NT; ++t) ia[v][st][t] = _mm512_setzero_si512();
      const int c0 = kSplit ? 4 * h : 0, c1 = kSplit ? 4 * h + 4 : 8;
      for (int c = c0; c < c1; ++c) {
        const __m512i w0 = _mm512_loadu_si512(wg + c * 4 * kTileRows);
        const __m512i w1 = _mm512_loadu_si512(wg + c * 4 * kTileRows + 64);
        for (int t = 0; t < NT; ++t) {
          for (int st = 0; st < kSt; ++st) {
            const __m512i a = _mm512_set1_epi32(load_i32(ag + t * ldx + 32 * st + 4 * c));
            ia[0][st][t] = _mm512_dpbusd_epi32(ia[0][st][t], w0, a);
            ia[1][st][t] = _mm512_dpbusd_epi32(ia[1][st][t], w1, a);
          }
        }
      }
      const float* dp = (h == 0 ? T.d0.data() : T.d1.data()) + g * kTileRows;
      const __m512 dw0 = _mm512_loadu_ps(dp), dw1 = _mm512_loadu_ps(dp + 16);
      for (int t = 0; t < NT; ++t) {
        const AMeta& a = am[t * G + g];
        const __m512 da = _mm512_set1_ps(k2 ? a.d : a.d1);
        const int32_t lo = k2 ? a.lo : a.lo1, hi = k2 ? a.hi : a.hi1;
        __m512i iv[2];
        for (int v = 0; v < 2; ++v) {
          iv[v] = k2 ? _mm512_add_epi32(_mm512_slli_epi32(ia[v][0][t], 7), ia[v][1][t]) : ia[v][0][t];
          if (bias) iv[v] = _mm512_sub_epi32(iv[v], _mm512_set1_epi32(bias * (kSplit ? (h == 0 ? lo : hi) : lo + hi)));
        }
        const __mmask16 all = 0xFFFF;
        fa[0][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw0, da), _mm512_maskz_cvtepi32_ps(all, iv[0]), fa[0][t]);
        fa[1][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw1, da), _mm512_maskz_cvtepi32_ps(all, iv[1]), fa[1][t]);
      }
    }
    if (kOffset) {
      const __m512 m0 = _mm512_loadu_ps(T.m.data() + g * kTileRows);
      const __m512 m1 = _mm512_loadu_ps(T.m.data() + g * kTileRows + 16);
      for (int t = 0; t < NT; ++t) {
        const __m512 s = _mm512_set1_ps(k2 ? am[t * G + g].s : am[t * G + g].s1);
        fa[0][t] = _mm512_fmadd_ps(m0, s, fa[0][t]);
        fa[1][t] = _mm512_fmadd_ps(m1, s, fa[1][t]);
      }
    }
  }
  const __mmask16 k0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  const __mmask16 k1 = nr >= 32 ? __mmask16(0xFFFF) : nr <= 16 ? __mmask16(0) : __mmask16((1u << (nr - 16)) - 1);
  for (int t = 0; t < NT; ++t) {
    _mm512_mask_storeu_ps(out + t * ldo, k0, fa[0][t]);
    _mm512_mask_storeu_ps(out + t * ldo + 16, k1, fa[1][t]);
  }
}

#define TP_AVX2_TARGET __attribute__((target("avx2,fma")))

// 16 rows (two ymm of 8 int32 lanes) of the tile starting at row rb, on the widened tile (Tile::w) and
// activations (xq: int16 128 q1 + q2 per element, stride ldx bytes): per token and element pair one
// vpmaddwd per 8 rows gives each row's two products summed, so a row's group sum Σ (q - bias)(128 q1 + q2)
// = 128 s1 + s2 - bias · Σ(128 q1 + q2) is the exact integer of the other ISAs (|sum| < 2^27), with one
// multiply instruction per 16 products instead of four (vpmaddubsw + vpmaddwd per stage) on the int8 layout.
template <class B, int NT>
TP_AVX2_TARGET void kernel_avx2_half(const Tile& T, int64_t G, const int8_t* xq, int64_t ldx, const AMeta* am,
                                     float* out, int64_t ldo, int rb, int nr) {
  constexpr bool kSplit = Unpack<B>::kSplit, kOffset = Unpack<B>::kOffset;
  static_assert(two_stage<B>(), "the widened activations carry both stages");
  __m256 fa[2][NT];
  for (int v = 0; v < 2; ++v)
    for (int t = 0; t < NT; ++t) fa[v][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int16_t* wg = T.w.data() + g * kGroupBytes + rb * 2;
    const int8_t* ag = xq + 64 * g;  // 32 int16
    for (int h = 0; h < (kSplit ? 2 : 1); ++h) {
      __m256i ia[2][NT];
      for (int v = 0; v < 2; ++v)
        for (int t = 0; t < NT; ++t) ia[v][t] = _mm256_setzero_si256();
      const int p0 = kSplit ? 8 * h : 0, p1 = kSplit ? 8 * h + 8 : 16;
      for (int pr = p0; pr < p1; ++pr) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + pr * 2 * kTileRows));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + pr * 2 * kTileRows + 16));
        for (int t = 0; t < NT; ++t) {
          const __m256i a = _mm256_set1_epi32(load_i32(ag + t * ldx + 4 * pr));
          ia[0][t] = _mm256_add_epi32(ia[0][t], _mm256_madd_epi16(w0, a));
          ia[1][t] = _mm256_add_epi32(ia[1][t], _mm256_madd_epi16(w1, a));
        }
      }
      const float* dp = (h == 0 ? T.d0.data() : T.d1.data()) + g * kTileRows + rb;
      const __m256 dw[2] = {_mm256_loadu_ps(dp), _mm256_loadu_ps(dp + 8)};
      for (int t = 0; t < NT; ++t) {
        const __m256 da = _mm256_set1_ps(am[t * G + g].d);
        for (int v = 0; v < 2; ++v)
          fa[v][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw[v], da), _mm256_cvtepi32_ps(ia[v][t]), fa[v][t]);
      }
    }
    if (kOffset) {
      const float* mp = T.m.data() + g * kTileRows + rb;
      const __m256 mv[2] = {_mm256_loadu_ps(mp), _mm256_loadu_ps(mp + 8)};
      for (int t = 0; t < NT; ++t) {
        const __m256 s = _mm256_set1_ps(am[t * G + g].s);
        for (int v = 0; v < 2; ++v) fa[v][t] = _mm256_fmadd_ps(mv[v], s, fa[v][t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    float buf[16];
    _mm256_storeu_ps(buf, fa[0][t]);
    _mm256_storeu_ps(buf + 8, fa[1][t]);
    for (int r = 0; r < 16 && rb + r < nr; ++r) out[t * ldo + rb + r] = buf[r];
  }
}

template <class B, int NT>
void kernel_avx2(const Tile& T, int64_t G, const int8_t* xq, int64_t ldx, const AMeta* am, float* out, int64_t ldo,
                 int nr) {
  kernel_avx2_half<B, NT>(T, G, xq, ldx, am, out, ldo, 0, nr);
  if (nr > 16) kernel_avx2_half<B, NT>(T, G, xq, ldx, am, out, ldo, 16, nr);
}
#endif

using KernelFn = void (*)(const Tile&, int64_t, const int8_t*, int64_t, const AMeta*, float*, int64_t, int);

template <class B>
struct KernelSet {
  KernelFn fn[kTokBlk];  // fn[n - 1] handles n tokens
  bool wide;             // reads the widened tile and activations (ActView::wide)
};

template <class B>
KernelSet<B> kernels_for(int isa) {
#if TP_X86
  if (isa == kIsaAvx512Vnni)
    return {{kernel_vnni<B, 1>, kernel_vnni<B, 2>, kernel_vnni<B, 3>, kernel_vnni<B, 4>}, false};
  if (isa == kIsaAvx2) return {{kernel_avx2<B, 1>, kernel_avx2<B, 2>, kernel_avx2<B, 3>, kernel_avx2<B, 4>}, true};
#endif
  return {{kernel_scalar<B, 1>, kernel_scalar<B, 2>, kernel_scalar<B, 3>, kernel_scalar<B, 4>}, false};
}

// Per-thread buffers shared by every weight type (a thread_local inside the template would be one per type).
struct ActBuf {
  std::vector<int8_t> q;
  std::vector<AMeta> meta;
  std::vector<int16_t> w;  // AVX2: the rows widened to int16 (quantize_row_avx2), K per row
};
ActBuf& act_buf() {
  thread_local ActBuf b;
  return b;
}
ActBuf& gathered_buf() {
  thread_local ActBuf b;
  return b;
}
Tile& tile_buf() {
  thread_local Tile t;
  return t;
}

// Quantizes n rows of K floats into ab: row t's quants at t * ldx bytes, its metadata at t * G.
void quantize_act(ThreadPool& pool, int isa, const float* in, int64_t n, int64_t K, ActBuf& ab) {
  const int64_t G = K / 32, ldx = G * kActBytes;
  if (int64_t(ab.q.size()) < n * ldx) ab.q.resize(size_t(n * ldx));
  if (int64_t(ab.meta.size()) < n * G) ab.meta.resize(size_t(n * G));
  if (isa == kIsaAvx2 && int64_t(ab.w.size()) < n * K) ab.w.resize(size_t(n * K));
  int8_t* xq = ab.q.data();
  AMeta* mp = ab.meta.data();
  int16_t* wp = ab.w.data();
  pool.parallel_for(n, 4, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) {
#if TP_X86
      if (isa == kIsaAvx512Vnni) {
        quantize_row_avx512(in + t * K, K, xq + t * ldx, mp + t * G);
        continue;
      }
      if (isa == kIsaAvx2) {
        quantize_row_avx2(in + t * K, K, xq + t * ldx, mp + t * G, wp + t * K);
        continue;
      }
#endif
      quantize_row_scalar(in + t * K, K, xq + t * ldx, mp + t * G);
    }
  });
}

// The tile kernels' view of the quantized rows: the int8 stages, or on AVX2 the widened int16 rows (and the
// tile widened to match, see widen_tile).
struct ActView {
  const int8_t* q;
  int64_t ld;  // bytes per row
  bool wide;
};
ActView act_view(const ActBuf& ab, int isa, int64_t K) {
  if (isa == kIsaAvx2) return {reinterpret_cast<const int8_t*>(ab.w.data()), 2 * K, true};
  return {ab.q.data(), K / 32 * kActBytes, false};
}

// Decodes rows [r0, r0 + nr) of w into T in the layout the kernels of `a` read.
template <class B>
void decode_tile_for(const Tensor& w, int64_t r0, int nr, int64_t G, Tile& T, const ActView& a) {
  decode_tile<B>(w, r0, nr, G, T);
  if (a.wide) widen_tile<B>(T, G);
}

// A decoded tile times n consecutive quantized rows (quants stride ldx, metadata stride G): out[t * ldo + r].
template <class B>
void tile_times_rows(const KernelSet<B>& ks, const Tile& tile, int64_t G, const int8_t* xq, int64_t ldx,
                     const AMeta* mp, int64_t n, float* out, int64_t ldo, int nr) {
  // Two stages double the int32 accumulators of the int8 layout: fewer tokens per block avoid register
  // spills (measured). The widened AVX2 kernels take 4 tokens (1.05-1.1x faster than 3 and 1.4x than 2 on a
  // Q4_K_M prefill, though 2 row vectors × 4 tokens of int32 and f32 sums leave the f32 ones to spill).
  const int blk = ks.wide ? 4 : two_stage<B>() ? (Unpack<B>::kSplit ? 2 : 3) : kTokBlk;
  int64_t t = 0;
  for (; t + blk <= n; t += blk) ks.fn[blk - 1](tile, G, xq + t * ldx, ldx, mp + t * G, out + t * ldo, ldo, nr);
  if (t < n) ks.fn[n - t - 1](tile, G, xq + t * ldx, ldx, mp + t * G, out + t * ldo, ldo, nr);
}

template <class B>
void matmul_int8(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok) {
  const int64_t K = w.cols, N = w.rows, G = K / 32, ldx = G * kActBytes;
  const int isa = int8_active_isa();
  const KernelSet<B> ks = kernels_for<B>(isa);
  // 1. Quantize the activations, one token row per work item.
  ActBuf& ab = act_buf();
  quantize_act(pool, isa, in, n_tok, K, ab);
  // 2a. Few tokens (decode steps): dot each row straight from its blocks.
  if (n_tok <= kGemvMaxTokens && cpu_gemv_int8(pool, out, w, ab.q.data(), ldx, ab.meta.data(), n_tok, isa)) return;
  // 2b. Row tiles: decode once, then every token block.
  const ActView av = act_view(ab, isa, K);
  const int64_t n_tiles = (N + kTileRows - 1) / kTileRows;
  pool.parallel_for(n_tiles, 1, [&](int64_t b, int64_t e, int) {
    Tile& tile = tile_buf();
    tile.reserve(G, av.wide);
    for (int64_t ti = b; ti < e; ++ti) {
      const int64_t r0 = ti * kTileRows;
      const int nr = int(N - r0 < kTileRows ? N - r0 : kTileRows);
      decode_tile_for<B>(w, r0, nr, G, tile, av);
      tile_times_rows<B>(ks, tile, G, av.q, av.ld, ab.meta.data(), n_tok, out + r0, N, nr);
    }
  });
}

// The grouped expert product (kernels.h): each input row is quantized once however many experts read it,
// the quantized rows are gathered in slot order, and the (expert, row tile) pairs of all experts with slots
// are one work list, so small experts do not each pay a parallel_for.
template <class B>
void matmul_int8_grouped(ThreadPool& pool, float* y, const Tensor& w, const float* in, int64_t n_in,
                         const int64_t* src, const int64_t* start) {
  const int64_t K = w.cols, R = w.mat_rows(), G = K / 32, ldx = G * kActBytes, n_rows = start[w.mats];
  const int isa = int8_active_isa();
  const KernelSet<B> ks = kernels_for<B>(isa);
  ActBuf& ab = act_buf();
  quantize_act(pool, isa, in, n_in, K, ab);
  // By reference: a thread_local named inside the lambdas would be each worker's own.
  ActBuf& gathered = gathered_buf();
  if (int64_t(gathered.q.size()) < n_rows * ldx) gathered.q.resize(size_t(n_rows * ldx));
  if (int64_t(gathered.meta.size()) < n_rows * G) gathered.meta.resize(size_t(n_rows * G));
  const bool wide = act_view(ab, isa, K).wide;
  if (wide && int64_t(gathered.w.size()) < n_rows * K) gathered.w.resize(size_t(n_rows * K));
  pool.parallel_for(n_rows, 16, [&](int64_t b, int64_t e, int) {
    for (int64_t s = b; s < e; ++s) {
      memcpy(gathered.q.data() + s * ldx, ab.q.data() + src[s] * ldx, size_t(ldx));
      memcpy(gathered.meta.data() + s * G, ab.meta.data() + src[s] * G, size_t(G) * sizeof(AMeta));
      if (wide) memcpy(gathered.w.data() + s * K, ab.w.data() + src[s] * K, size_t(K) * sizeof(int16_t));
    }
  });
  const ActView av = act_view(gathered, isa, K);
  const int64_t tiles = (R + kTileRows - 1) / kTileRows;
  std::vector<int64_t> items;  // expert * tiles + tile, for experts with slots
  for (int64_t e = 0; e < w.mats; ++e)
    if (start[e + 1] > start[e])
      for (int64_t ti = 0; ti < tiles; ++ti) items.push_back(e * tiles + ti);
  pool.parallel_for(int64_t(items.size()), 1, [&](int64_t b, int64_t e, int) {
    Tile& tile = tile_buf();
    tile.reserve(G, av.wide);
    for (int64_t it = b; it < e; ++it) {
      const int64_t ex = items[size_t(it)] / tiles, r0 = items[size_t(it)] % tiles * kTileRows;
      const int nr = int(R - r0 < kTileRows ? R - r0 : kTileRows);
      const int64_t s0 = start[ex];
      // An expert with few tokens (every expert in a decode step): rows straight from their blocks.
      if (start[ex + 1] - s0 <= kGemvMaxTokens &&
          cpu_gemv_int8_rows(w.mat(ex), r0, r0 + nr, gathered.q.data() + s0 * ldx, ldx, gathered.meta.data() + s0 * G,
                             start[ex + 1] - s0, y + s0 * R + r0, R, isa))
        continue;
      decode_tile_for<B>(w.mat(ex), r0, nr, G, tile, av);
      tile_times_rows<B>(ks, tile, G, av.q + s0 * av.ld, av.ld, gathered.meta.data() + s0 * G, start[ex + 1] - s0,
                         y + s0 * R + r0, R, nr);
    }
  });
}

}  // namespace

void cpu_matmul(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok) {
  const bool done = visit_unpack_type(w.type, false, [&](auto tag) {
    matmul_int8<typename decltype(tag)::type>(pool, out, w, in, n_tok);
    return true;
  });
  if (!done) cpu_matmul_f32(pool, out, w, in, n_tok);
}

bool cpu_matmul_grouped(ThreadPool& pool, float* y, const Tensor& w, const float* in, int64_t n_in, const int64_t* src,
                        const int64_t* start) {
  return visit_unpack_type(w.type, false, [&](auto tag) {
    matmul_int8_grouped<typename decltype(tag)::type>(pool, y, w, in, n_in, src, start);
    return true;
  });
}

#if TP_X86
#define TP_F32_BASE "baseline"
#else
#define TP_F32_BASE "portable"
#endif

void cpu_set_isa_override(int level) { g_isa_override.store(level, std::memory_order_relaxed); }

const char* cpu_simd_level() {
  // The int8 kernels' ISA (which tests may cap) and the float kernels' (vec_isa), e.g. "int8:avx2 f32:avx2+fma".
  static const char* const kNames[3][3] = {
      {"int8:scalar f32:" TP_F32_BASE, "int8:scalar f32:avx2+fma", "int8:scalar f32:avx512f"},
      {"int8:avx2 f32:" TP_F32_BASE, "int8:avx2 f32:avx2+fma", "int8:avx2 f32:avx512f"},
      {"int8:avx512-vnni f32:" TP_F32_BASE, "int8:avx512-vnni f32:avx2+fma", "int8:avx512-vnni f32:avx512f"},
  };
  return kNames[int8_active_isa()][vec_isa()];
}

}  // namespace tp
