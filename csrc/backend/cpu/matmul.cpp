// matmul.cpp — CPU matmul: quantized weights × f32 activations through int8 dot products.
//
// Quantized weights (every type unpack.h decodes) take the int8 path:
//  1. The activations are quantized once per op, per token row and per 32-element group, with unpack.h's
//     quantizer (d = amax / 127, round half away from zero; vectorized bit-exactly on AVX-512).
//  2. Rows are split into tiles of kTileRows = 32. A thread decodes its tile with unpack.h's unpack_group
//     into a thread-local, SIMD-friendly layout — never the whole matrix, so weights stay zero-copy views
//     into the mmap and memory stays the file size: for group g, 4-byte chunk c (elements 4c..4c+3) of
//     the 32 rows lie side by side (byte offset g*1024 + c*128 + row*4), quants biased to unsigned
//     (q - kQMin for the signed types), plus the f32 scales/offsets per (group, row).
//  3. The tile is multiplied with blocks of kTokBlk tokens: with AVX-512 VNNI one vpdpbusd multiplies the
//     32 rows' 4-byte chunks (two zmm) with one token's 4 activation bytes (broadcast), so each int32
//     lane is one row's group sum and no horizontal reduction is needed; AVX2 does the same with
//     vpmaddubsw + vpmaddwd on 8-row ymm vectors; a scalar loop is the portable fallback.
//  4. Per group, the exact integer sum (minus bias * Σq_a for the biased types) becomes f32:
//         acc = fma(d_w * d_a, float(s), acc);  acc = fma(m, s_a, acc)   (offset types)
//     and Q6_K's two 16-element halves take one fma each (d_w[0], then d_w[1]).
// Every ISA evaluates exactly this sequence per (row, token) — integer sums are exact, the f32 steps are
// the same IEEE operations in the same order — so the results are bit-identical across AVX-512, AVX2 and
// scalar, across thread counts, and across ubatch splits (tests/test_cpu_kernels.py checks it).
//
// F32/F16/BF16 (and types without int8 unpacking) keep the f32 path: rows decoded into a thread-local
// tile and multiplied with a register-blocked f32 kernel, compiled per ISA with target_clones.
//
// ISA: the library is built for baseline x86-64; the int8 kernels carry __attribute__((target)) and are
// picked at run time with __builtin_cpu_supports (cpu_set_isa_override forces a lower level for tests).
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags the _mm512_undefined_* placeholders inside its own intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TP_X86 1
#else
#define TP_X86 0
#endif

#include "backend/cpu/kernels.h"
#include "quant/blocks.h"
#include "quant/unpack.h"

namespace tp {

namespace {

// ---------------------------------------------------------------------------------------------------------
// f32 path (F32/F16/BF16 weights)
// ---------------------------------------------------------------------------------------------------------

constexpr int64_t kRowTile = 16;
constexpr int kVec = 16;

// NR rows of w (stride ldw) times NT rows of x (stride ldx), K elements; out[t * ldo + r].
template <int NR, int NT>
__attribute__((always_inline)) inline void dot_block(const float* w, int64_t ldw, const float* x, int64_t ldx,
                                                     int64_t K, float* out, int64_t ldo) {
  v16f acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = v16f{};
  int64_t k = 0;
  for (; k + kVec <= K; k += kVec) {
    v16f xv[NT];
    for (int t = 0; t < NT; ++t) memcpy(&xv[t], x + t * ldx + k, sizeof(v16f));
    for (int r = 0; r < NR; ++r) {
      v16f wv;
      memcpy(&wv, w + r * ldw + k, sizeof(v16f));
      for (int t = 0; t < NT; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int t = 0; t < NT; ++t) {
      // Fixed-order horizontal sum, then the scalar tail.
      float s = 0.0f;
      for (int i = 0; i < kVec; ++i) s += acc[r][t][i];
      for (int64_t kk = k; kk < K; ++kk) s += w[r * ldw + kk] * x[t * ldx + kk];
      out[t * ldo + r] = s;
    }
  }
}

// Rows [0, nr) of a decoded tile against all n_tok tokens.
TP_CPU_CLONES void tile_times_tokens(const float* wt, int64_t nr, int64_t K, const float* x, int64_t n_tok,
                                     float* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    int64_t t = 0;
    for (; t + 4 <= n_tok; t += 4) dot_block<4, 4>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
    for (; t < n_tok; ++t) dot_block<4, 1>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
  }
  for (; r < nr; ++r) {
    int64_t t = 0;
    for (; t + 4 <= n_tok; t += 4) dot_block<1, 4>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
    for (; t < n_tok; ++t) dot_block<1, 1>(wt + r * K, K, x + t * K, K, K, out + t * ldo + r, ldo);
  }
}

void matmul_f32(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok) {
  const int64_t K = w.cols, N = w.rows;
  const int64_t n_tiles = (N + kRowTile - 1) / kRowTile;
  pool.parallel_for(n_tiles, 1, [&](int64_t b, int64_t e, int) {
    thread_local std::vector<float> tile;
    if (int64_t(tile.size()) < kRowTile * K) tile.resize(size_t(kRowTile * K));
    for (int64_t ti = b; ti < e; ++ti) {
      const int64_t r0 = ti * kRowTile;
      const int64_t nr = N - r0 < kRowTile ? N - r0 : kRowTile;
      for (int64_t r = 0; r < nr; ++r) dequantize_row(w.type, w.row(r0 + r), tile.data() + r * K, K);
      tile_times_tokens(tile.data(), nr, K, in, n_tok, out + r0, N);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// int8 path
// ---------------------------------------------------------------------------------------------------------

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

std::atomic<int> g_isa_override{-1};

int detect_isa() {
#if TP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

int active_isa() {
  static const int detected = detect_isa();
  const int o = g_isa_override.load(std::memory_order_relaxed);
  return o >= 0 && o < detected ? o : detected;
}

constexpr int kTileRows = 32;
constexpr int kGroupBytes = 32 * kTileRows;  // one group of a tile: 8 chunks × 32 rows × 4 bytes
constexpr int kTokBlk = 4;

// One activation group in two int8 stages (see the file comment): x ≈ d[0] q1 + d[1] q2, s = s1 + s2 with
// s_i = d_i Σq_i (unpack.h's AGroup of each stage), and the integer half sums of q1 and q2 (lo[i], hi[i]).
struct AMeta {
  float d[2], s;
  int32_t lo[2], hi[2];
  int32_t pad;
};
constexpr int kActBytes = 64;  // per group and token: q1[32] then q2[32]

// A decoded tile of kTileRows rows (see the file comment).
struct Tile {
  std::vector<uint8_t> q;            // [G][8][kTileRows][4]
  std::vector<float> d0, d1, m;      // [G][kTileRows]
  void reserve(int64_t G) {
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
      int8_t q[32];
      const WGroup wg = unpack_row_group(row, g, q);
      uint8_t u[32];
      for (int i = 0; i < 32; ++i) u[i] = uint8_t(int(q[i]) + bias);
      uint8_t* dst = &T.q[size_t(g * kGroupBytes + r * 4)];
      for (int c = 0; c < 8; ++c) memcpy(dst + c * 4 * kTileRows, u + 4 * c, 4);
      T.d0[size_t(g * kTileRows + r)] = wg.d[0];
      T.d1[size_t(g * kTileRows + r)] = wg.d[1];
      T.m[size_t(g * kTileRows + r)] = wg.m;
    }
  }
}

// ---- activation quantization ------------------------------------------------------------------------------

// s1 + s2 out of line, so that no caller can contract d1 * Σq1 + s2 into an FMA (the AVX-512 quantizer is
// compiled with FMA, the scalar one without): every ISA rounds the product and the sum separately.
__attribute__((noinline)) float add_sums(float s1, float s2) { return s1 + s2; }

// Stage 2 quantizes the residual r = x - d1 q1, rounded once (fma), which |r| <= d1 / 2 bounds.
void quantize_row_scalar(const float* x, int64_t K, int8_t* q, AMeta* meta) {
  for (int64_t g = 0; g < K / 32; ++g) {
    int8_t* q1 = q + kActBytes * g;
    int8_t* q2 = q1 + 32;
    const AGroup a1 = quantize_group(x + 32 * g, q1);
    float r[32];
    for (int i = 0; i < 32; ++i) r[i] = std::fma(-a1.d, float(q1[i]), x[32 * g + i]);
    const AGroup a2 = quantize_group(r, q2);
    AMeta& m = meta[g];
    m.d[0] = a1.d;
    m.d[1] = a2.d;
    m.s = add_sums(a1.s, a2.s);
    for (int st = 0; st < 2; ++st) {
      const int8_t* qq = st == 0 ? q1 : q2;
      int32_t lo = 0, hi = 0;
      for (int i = 0; i < 16; ++i) lo += qq[i];
      for (int i = 16; i < 32; ++i) hi += qq[i];
      m.lo[st] = lo;
      m.hi[st] = hi;
    }
    m.pad = 0;
  }
}

#if TP_X86
#define TP_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// One stage of quantize_group on 32 floats, bit-identical to it: exact max |x|, IEEE division, round half
// away from zero. Returns d; q and the two int32 vectors of q come back through the pointers.
TP_AVX512_TARGET inline float quantize32_avx512(__m512 v0, __m512 v1, int8_t* q, __m512i* qi) {
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = q8_scale(amax);
  if (d == 0.0f) {
    memset(q, 0, 32);
    qi[0] = qi[1] = _mm512_setzero_si512();
    return d;
  }
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  const __m512 dv = _mm512_set1_ps(d);
  const __m512 vs[2] = {v0, v1};
  for (int h = 0; h < 2; ++h) {
    const __m512 y = _mm512_div_ps(vs[h], dv);
    const __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 frac = _mm512_abs_ps(_mm512_sub_ps(y, t));  // exact
    const __mmask16 up = _mm512_cmp_ps_mask(frac, half, _CMP_GE_OQ);
    const __m512 step = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(one), _mm512_and_si512(_mm512_castps_si512(y), sign)));
    qi[h] = _mm512_maskz_cvttps_epi32(__mmask16(0xFFFF), _mm512_mask_add_ps(t, up, t, step));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * h), _mm512_cvtepi32_epi8(qi[h]));
  }
  return d;
}

TP_AVX512_TARGET void quantize_row_avx512(const float* x, int64_t K, int8_t* q, AMeta* meta) {
  for (int64_t g = 0; g < K / 32; ++g) {
    int8_t* q1 = q + kActBytes * g;
    const __m512 v0 = _mm512_loadu_ps(x + 32 * g), v1 = _mm512_loadu_ps(x + 32 * g + 16);
    __m512i qi[2], qj[2];
    const float d1 = quantize32_avx512(v0, v1, q1, qi);
    const __m512 nd = _mm512_set1_ps(-d1);
    const __m512 r0 = _mm512_fmadd_ps(nd, _mm512_maskz_cvtepi32_ps(__mmask16(0xFFFF), qi[0]), v0);
    const __m512 r1 = _mm512_fmadd_ps(nd, _mm512_maskz_cvtepi32_ps(__mmask16(0xFFFF), qi[1]), v1);
    const float d2 = quantize32_avx512(r0, r1, q1 + 32, qj);
    AMeta& m = meta[g];
    m.d[0] = d1;
    m.d[1] = d2;
    m.lo[0] = _mm512_reduce_add_epi32(qi[0]);
    m.hi[0] = _mm512_reduce_add_epi32(qi[1]);
    m.lo[1] = _mm512_reduce_add_epi32(qj[0]);
    m.hi[1] = _mm512_reduce_add_epi32(qj[1]);
    m.s = add_sums(q8_sum(d1, m.lo[0] + m.hi[0]), q8_sum(d2, m.lo[1] + m.hi[1]));
    m.pad = 0;
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
  for (int t = 0; t < NT; ++t) {
    for (int r = 0; r < nr; ++r) {
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* wq = &T.q[size_t(g * kGroupBytes + r * 4)];
        const AMeta& a = am[t * G + g];
        int32_t s[2][2] = {{0, 0}, {0, 0}};  // [stage][half]
        for (int st = 0; st < 2; ++st) {
          const int8_t* aq = xq + t * ldx + kActBytes * g + 32 * st;
          for (int c = 0; c < 8; ++c)
            for (int j = 0; j < 4; ++j) s[st][c >> 2] += int32_t(wq[c * 4 * kTileRows + j]) * int32_t(aq[4 * c + j]);
        }
        const float* dw[2] = {&T.d0[size_t(g * kTileRows + r)], &T.d1[size_t(g * kTileRows + r)]};
        for (int h = 0; h < (kSplit ? 2 : 1); ++h) {
          for (int st = 0; st < 2; ++st) {
            const int32_t si = kSplit ? s[st][h] - bias * (h == 0 ? a.lo[st] : a.hi[st])
                                      : s[st][0] + s[st][1] - bias * (a.lo[st] + a.hi[st]);
            const float ts = *dw[h] * a.d[st];
            acc = std::fma(ts, float(si), acc);
          }
        }
        if (kOffset) acc = std::fma(T.m[size_t(g * kTileRows + r)], a.s, acc);
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
  __m512 fa[2][NT];
  for (int v = 0; v < 2; ++v)
    for (int t = 0; t < NT; ++t) fa[v][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = T.q.data() + g * kGroupBytes;
    const int8_t* ag = xq + kActBytes * g;
    for (int h = 0; h < (kSplit ? 2 : 1); ++h) {
      __m512i ia[2][2][NT];  // [row vector][stage][token]
      for (int v = 0; v < 2; ++v)
        for (int st = 0; st < 2; ++st)
          for (int t = 0; t < NT; ++t) ia[v][st][t] = _mm512_setzero_si512();
      const int c0 = kSplit ? 4 * h : 0, c1 = kSplit ? 4 * h + 4 : 8;
      for (int c = c0; c < c1; ++c) {
        const __m512i w0 = _mm512_loadu_si512(wg + c * 4 * kTileRows);
        const __m512i w1 = _mm512_loadu_si512(wg + c * 4 * kTileRows + 64);
        for (int t = 0; t < NT; ++t) {
          for (int st = 0; st < 2; ++st) {
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
        for (int st = 0; st < 2; ++st) {
          const __m512 da = _mm512_set1_ps(a.d[st]);
          if (bias) {
            const int32_t qs = kSplit ? (h == 0 ? a.lo[st] : a.hi[st]) : a.lo[st] + a.hi[st];
            const __m512i corr = _mm512_set1_epi32(bias * qs);
            ia[0][st][t] = _mm512_sub_epi32(ia[0][st][t], corr);
            ia[1][st][t] = _mm512_sub_epi32(ia[1][st][t], corr);
          }
          fa[0][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw0, da), _mm512_maskz_cvtepi32_ps(__mmask16(0xFFFF), ia[0][st][t]),
                                     fa[0][t]);
          fa[1][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw1, da), _mm512_maskz_cvtepi32_ps(__mmask16(0xFFFF), ia[1][st][t]),
                                     fa[1][t]);
        }
      }
    }
    if (kOffset) {
      const __m512 m0 = _mm512_loadu_ps(T.m.data() + g * kTileRows);
      const __m512 m1 = _mm512_loadu_ps(T.m.data() + g * kTileRows + 16);
      for (int t = 0; t < NT; ++t) {
        const __m512 s = _mm512_set1_ps(am[t * G + g].s);
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

// 16 rows (two ymm) of the tile starting at row rb; Q8_0 (bias 128) uses the sign trick because
// vpmaddubsw would saturate on 255 * 127 * 2; its integer sums are the same exact values.
template <class B, int NT>
TP_AVX2_TARGET void kernel_avx2_half(const Tile& T, int64_t G, const int8_t* xq, int64_t ldx, const AMeta* am,
                                     float* out, int64_t ldo, int rb, int nr) {
  constexpr bool kSplit = Unpack<B>::kSplit, kOffset = Unpack<B>::kOffset;
  constexpr int bias = bias_of<B>();
  constexpr bool kSignTrick = bias == 128;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  __m256 fa[2][NT];
  for (int v = 0; v < 2; ++v)
    for (int t = 0; t < NT; ++t) fa[v][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = T.q.data() + g * kGroupBytes + rb * 4;
    const int8_t* ag = xq + kActBytes * g;
    for (int h = 0; h < (kSplit ? 2 : 1); ++h) {
      __m256i ia[2][2][NT];
      for (int v = 0; v < 2; ++v)
        for (int st = 0; st < 2; ++st)
          for (int t = 0; t < NT; ++t) ia[v][st][t] = _mm256_setzero_si256();
      const int c0 = kSplit ? 4 * h : 0, c1 = kSplit ? 4 * h + 4 : 8;
      for (int c = c0; c < c1; ++c) {
        __m256i w[2];
        w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 4 * kTileRows));
        w[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 4 * kTileRows + 32));
        for (int t = 0; t < NT; ++t) {
          for (int st = 0; st < 2; ++st) {
            const __m256i a = _mm256_set1_epi32(load_i32(ag + t * ldx + 32 * st + 4 * c));
            for (int v = 0; v < 2; ++v) {
              __m256i p;
              if (kSignTrick) {
                const __m256i ws = _mm256_xor_si256(w[v], flip);
                p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(a, ws));
              } else {
                p = _mm256_maddubs_epi16(w[v], a);
              }
              ia[v][st][t] = _mm256_add_epi32(ia[v][st][t], _mm256_madd_epi16(p, ones));
            }
          }
        }
      }
      const float* dp = (h == 0 ? T.d0.data() : T.d1.data()) + g * kTileRows + rb;
      const __m256 dw[2] = {_mm256_loadu_ps(dp), _mm256_loadu_ps(dp + 8)};
      for (int t = 0; t < NT; ++t) {
        const AMeta& a = am[t * G + g];
        for (int st = 0; st < 2; ++st) {
          const __m256 da = _mm256_set1_ps(a.d[st]);
          for (int v = 0; v < 2; ++v) {
            if (bias && !kSignTrick) {
              const int32_t qs = kSplit ? (h == 0 ? a.lo[st] : a.hi[st]) : a.lo[st] + a.hi[st];
              ia[v][st][t] = _mm256_sub_epi32(ia[v][st][t], _mm256_set1_epi32(bias * qs));
            }
            fa[v][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw[v], da), _mm256_cvtepi32_ps(ia[v][st][t]), fa[v][t]);
          }
        }
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
};

template <class B>
KernelSet<B> kernels_for(int isa) {
#if TP_X86
  if (isa == kAvx512Vnni) return {{kernel_vnni<B, 1>, kernel_vnni<B, 2>, kernel_vnni<B, 3>, kernel_vnni<B, 4>}};
  if (isa == kAvx2) return {{kernel_avx2<B, 1>, kernel_avx2<B, 2>, kernel_avx2<B, 3>, kernel_avx2<B, 4>}};
#endif
  return {{kernel_scalar<B, 1>, kernel_scalar<B, 2>, kernel_scalar<B, 3>, kernel_scalar<B, 4>}};
}

template <class B>
void matmul_int8(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok) {
  const int64_t K = w.cols, N = w.rows, G = K / 32;
  const int isa = active_isa();
  const KernelSet<B> ks = kernels_for<B>(isa);

  // 1. Quantize the activations, one token row per work item.
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<AMeta> meta;
  const int64_t ldx = G * kActBytes;
  if (int64_t(xq.size()) < n_tok * ldx) xq.resize(size_t(n_tok * ldx));
  if (int64_t(meta.size()) < n_tok * G) meta.resize(size_t(n_tok * G));
  int8_t* xqp = xq.data();
  AMeta* mp = meta.data();
  pool.parallel_for(n_tok, 4, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) {
#if TP_X86
      if (isa == kAvx512Vnni) {
        quantize_row_avx512(in + t * K, K, xqp + t * ldx, mp + t * G);
        continue;
      }
#endif
      quantize_row_scalar(in + t * K, K, xqp + t * ldx, mp + t * G);
    }
  });

  // 2. Row tiles: decode once, then every token block.
  const int64_t n_tiles = (N + kTileRows - 1) / kTileRows;
  pool.parallel_for(n_tiles, 1, [&](int64_t b, int64_t e, int) {
    thread_local Tile tile;
    tile.reserve(G);
    for (int64_t ti = b; ti < e; ++ti) {
      const int64_t r0 = ti * kTileRows;
      const int nr = int(N - r0 < kTileRows ? N - r0 : kTileRows);
      decode_tile<B>(w, r0, nr, G, tile);
      int64_t t = 0;
      for (; t + kTokBlk <= n_tok; t += kTokBlk)
        ks.fn[kTokBlk - 1](tile, G, xqp + t * ldx, ldx, mp + t * G, out + t * N + r0, N, nr);
      if (t < n_tok) ks.fn[n_tok - t - 1](tile, G, xqp + t * ldx, ldx, mp + t * G, out + t * N + r0, N, nr);
    }
  });
}

}  // namespace

void cpu_matmul(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok) {
  const bool done = visit_unpack_type(w.type, false, [&](auto tag) {
    matmul_int8<typename decltype(tag)::type>(pool, out, w, in, n_tok);
    return true;
  });
  if (!done) matmul_f32(pool, out, w, in, n_tok);
}

void cpu_set_isa_override(int level) { g_isa_override.store(level, std::memory_order_relaxed); }

const char* cpu_simd_level() {
  switch (active_isa()) {
    case kAvx512Vnni: return "int8:avx512-vnni f32:avx512f";
    case kAvx2: return "int8:avx2 f32:avx2+fma";
    default:
#if TP_X86
      return "int8:scalar f32:baseline";
#else
      return "int8:scalar f32:portable";
#endif
  }
}

}  // namespace tp
