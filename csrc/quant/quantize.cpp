// quantize.cpp — reference quantizers (GGUF_SPEC §2.2, §3.1): f32 -> F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/
// Q4_K/Q5_K/Q6_K/MXFP4, bit-exact with ggml's quantize_row_*_ref (no imatrix).
//
// Bit-exactness depends on doing the same float operations in the same order as ggml: every product and
// sum below is written in ggml's association order, `nearest_int` is ggml's round-half-to-even trick, and
// the legacy formats truncate through int8 as ggml's casts do. Floating-point contraction into FMA would
// change the last bit of the K-quant searches, so it is switched off for this file (ggml's reference build
// does not fuse either). Tests compare against the `gguf` package and, when installed, ggml itself.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quant/quantize.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "common.h"
#include "quant/blocks.h"

namespace tp {
namespace {

// ggml's nearest_int: adding 1.5 * 2^23 moves the integer part into the low mantissa bits and the FPU's
// round-to-nearest-even does the rounding (so 2.5 -> 2, 3.5 -> 4). Valid for |f| < 2^22.
inline int nearest_int(float f) {
  const float v = f + 12582912.f;
  int32_t i;
  memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// Float -> int conversion as x86 executes C's cast (cvttss2si): truncation toward zero, INT32_MIN for NaN
// or out-of-range values (C++ leaves those undefined). The legacy quantizers cast through int8_t exactly
// like ggml, so we keep ggml's bytes for every input without undefined behaviour.
inline int32_t trunc_to_i32(float f) {
  if (!(f > -2147483904.f && f < 2147483648.f)) return INT32_MIN;
  return int32_t(f);
}
inline int8_t trunc_to_i8(float f) { return int8_t(trunc_to_i32(f)); }  // keeps the low byte, like the cast

// ---- 32-element legacy blocks -----------------------------------------------------------------------------

// The signed value with the largest magnitude; the first one wins a tie (Q4_0/Q5_0 scale sign).
inline float signed_absmax(const float* x, int n) {
  float amax = 0.f, max = 0.f;
  for (int j = 0; j < n; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

inline void min_max(const float* x, int n, float* mn, float* mx) {
  float lo = FLT_MAX, hi = -FLT_MAX;
  for (int j = 0; j < n; ++j) {
    if (x[j] < lo) lo = x[j];
    if (x[j] > hi) hi = x[j];
  }
  *mn = lo;
  *mx = hi;
}

// Q4_0: d = max / -8 puts the extreme value at q = 0 exactly; x/d + 8.5 truncated = round to nearest.
void quantize_block(const float* x, block_q4_0* y) {
  const float d = signed_absmax(x, QK) / -8;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  y->d = f32_to_f16(d);
  for (int j = 0; j < QK / 2; ++j) {
    const uint8_t q0 = uint8_t(std::min<int>(15, trunc_to_i8(x[j] * id + 8.5f)));
    const uint8_t q1 = uint8_t(std::min<int>(15, trunc_to_i8(x[j + QK / 2] * id + 8.5f)));
    y->qs[j] = uint8_t(q0 | (q1 << 4));
  }
}

void quantize_block(const float* x, block_q4_1* y) {
  float mn, mx;
  min_max(x, QK, &mn, &mx);
  const float d = (mx - mn) / 15;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  y->d = f32_to_f16(d);
  y->m = f32_to_f16(mn);
  for (int j = 0; j < QK / 2; ++j) {
    const uint8_t q0 = uint8_t(std::min<int>(15, trunc_to_i8((x[j] - mn) * id + 0.5f)));
    const uint8_t q1 = uint8_t(std::min<int>(15, trunc_to_i8((x[j + QK / 2] - mn) * id + 0.5f)));
    y->qs[j] = uint8_t(q0 | (q1 << 4));
  }
}

// Q5_0/Q5_1 store the low nibble in qs and bit 4 of element j in bit j of the little-endian u32 qh.
void pack_q5(const uint8_t* q, uint8_t* qs, uint8_t* qh_bytes) {
  uint32_t qh = 0;
  for (int j = 0; j < QK / 2; ++j) {
    qs[j] = uint8_t((q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4));
    qh |= uint32_t((q[j] >> 4) & 1) << j;
    qh |= uint32_t((q[j + QK / 2] >> 4) & 1) << (j + QK / 2);
  }
  for (int b = 0; b < 4; ++b) qh_bytes[b] = uint8_t(qh >> (8 * b));
}

void quantize_block(const float* x, block_q5_0* y) {
  const float d = signed_absmax(x, QK) / -16;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  y->d = f32_to_f16(d);
  uint8_t q[QK];
  for (int j = 0; j < QK; ++j) q[j] = uint8_t(std::min<int>(31, trunc_to_i8(x[j] * id + 16.5f)));
  pack_q5(q, y->qs, y->qh);
}

void quantize_block(const float* x, block_q5_1* y) {
  float mn, mx;
  min_max(x, QK, &mn, &mx);
  const float d = (mx - mn) / 31;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  y->d = f32_to_f16(d);
  y->m = f32_to_f16(mn);
  // ggml casts straight to uint8 without a clamp; (x - min) * id <= 31 * (1 + 3 ulp) < 31.5, so the clamp
  // never changes a value and only guards the packing.
  uint8_t q[QK];
  for (int j = 0; j < QK; ++j) {
    const uint8_t v = uint8_t(trunc_to_i32((x[j] - mn) * id + 0.5f));
    q[j] = std::min<uint8_t>(31, v);
  }
  pack_q5(q, y->qs, y->qh);
}

// Q8_0: symmetric, d = amax / 127, q = roundf (ties away from zero, unlike the K-quants).
void quantize_block(const float* x, block_q8_0* y) {
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  y->d = f32_to_f16(d);
  for (int j = 0; j < QK; ++j) y->qs[j] = trunc_to_i8(std::round(x[j] * id));
}

// MXFP4: the shared exponent puts amax in [4, 8) × 2^(e-128)·2, i.e. near the top code (6), as ggml's
// quantize_row_mxfp4_ref does (e = floor(log2 amax) - 2 + 127, 0 for an all-zero block); each element takes
// the code whose value is nearest, the first (lowest code) on a tie.
void quantize_block(const float* x, block_mxfp4* y) {
  float amax = 0.0f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  // Clamped to the representable exponents: ggml's cast is undefined outside them (|x| < 2^-125 or huge).
  const float ef = amax > 0.0f ? std::floor(std::log2(amax)) - 2 + 127 : 0.0f;
  const uint8_t e = uint8_t(std::min(254.0f, std::max(0.0f, ef)));
  const float d = e8m0_to_f32_half(e);
  y->e = e;
  auto best = [&](float v) {
    int bi = 0;
    float be = std::fabs(float(mxfp4_value(0)) * d - v);
    for (int i = 1; i < 16; ++i) {
      const float err = std::fabs(float(mxfp4_value(i)) * d - v);
      if (err < be) {
        bi = i;
        be = err;
      }
    }
    return uint8_t(bi);
  };
  for (int j = 0; j < QK / 2; ++j) y->qs[j] = uint8_t(best(x[j]) | (best(x[j + QK / 2]) << 4));
}

// ---- K-quants ------------------------------------------------------------------------------------------

// make_qkx2_quants: fit x ≈ scale * L + min (L in [0, nmax], min <= 0) minimizing Σ w (scale L + min - x)²
// over a grid of nstep+1 candidate inverse scales. Returns scale; *neg_min = -min (>= 0). A quirk kept
// from ggml: once a better fit is found, later candidates are rounded against that fit's min.
float make_qkx2_quants(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                       float rmin, float rdelta, int nstep) {
  float min = x[0], max = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *neg_min = -min;
    return 0.f;
  }
  float iscale = float(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = uint8_t(std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - min)))));
    const float diff = scale * float(L[i]) + min - x[i];
    best_error += w[i] * (diff * diff);
  }
  uint8_t Laux[QK_K];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * float(is) + float(nmax)) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - min))));
      Laux[i] = uint8_t(l);
      const float wl = w[i] * float(l);
      sum_l += wl;
      sum_l2 += wl * float(l);
      sum_xl += wl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (!(D > 0)) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    if (this_min > 0) {  // the format only subtracts a min: refit the scale with min = 0
      this_min = 0;
      this_scale = sum_xl / sum_l2;
    }
    float cur_error = 0;
    for (int i = 0; i < n; ++i) {
      const float diff = this_scale * float(Laux[i]) + this_min - x[i];
      cur_error += w[i] * (diff * diff);
    }
    if (cur_error < best_error) {
      for (int i = 0; i < n; ++i) L[i] = Laux[i];
      best_error = cur_error;
      scale = this_scale;
      min = this_min;
    }
  }
  *neg_min = -min;
  return scale;
}

// Q4_K / Q5_K share everything but nmax and the search grid (GGUF_SPEC §3.1).
struct QkxParams {
  int nmax;
  float rmin, rdelta;
  int nstep;
};

// Fills the 12 packed scale bytes, d and dmin, and the per-element levels L[256] for one super-block.
void quantize_k_scales(const float* x, const QkxParams& p, uint8_t* scales12, uint16_t* d_out,
                       uint16_t* dmin_out, uint8_t* L) {
  float scales[8], mins[8], weights[32];
  float max_scale = 0, max_min = 0;  // scales and mins are both >= 0 here
  for (int j = 0; j < 8; ++j) {
    const float* xj = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xj[l] * xj[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xj[l]);
    scales[j] = make_qkx2_quants(32, p.nmax, xj, weights, L + 32 * j, &mins[j], p.rmin, p.rdelta, p.nstep);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  memset(scales12, 0, 12);
  for (int j = 0; j < 8; ++j) {
    const uint8_t ls = uint8_t(std::min(63, nearest_int(inv_scale * scales[j])));
    const uint8_t lm = uint8_t(std::min(63, nearest_int(inv_min * mins[j])));
    if (j < 4) {  // packing of GGUF_SPEC §2.3, the inverse of get_scale_min_k4
      scales12[j] |= ls;
      scales12[j + 4] |= lm;
    } else {
      scales12[j + 4] = uint8_t((ls & 0xF) | ((lm & 0xF) << 4));
      scales12[j - 4] |= uint8_t((ls >> 4) << 6);
      scales12[j] |= uint8_t((lm >> 4) << 6);
    }
  }
  *d_out = f32_to_f16(max_scale / 63.f);
  *dmin_out = f32_to_f16(max_min / 63.f);

  // Re-round every value against the scales as stored (6-bit, f16), which is what the decoder sees.
  const float d = f16_to_f32(*d_out), dmin = f16_to_f32(*dmin_out);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    get_scale_min_k4(j, scales12, &sc, &m);
    const float dj = d * float(sc);
    if (dj == 0.f) continue;  // sub-block decodes to -dm regardless; keep the search's levels as ggml does
    const float dm = dmin * float(m);
    for (int l = 0; l < 32; ++l)
      L[32 * j + l] = uint8_t(std::max(0, std::min(p.nmax, nearest_int((x[32 * j + l] + dm) / dj))));
  }
}

void quantize_block(const float* x, block_q4_K* y) {
  uint8_t L[QK_K];
  quantize_k_scales(x, {15, -1.f, 0.1f, 20}, y->scales, &y->d, &y->dmin, L);
  for (int c = 0; c < 4; ++c)  // chunk c: sub-block 2c in the low nibbles, 2c+1 in the high nibbles
    for (int l = 0; l < 32; ++l) y->qs[32 * c + l] = uint8_t(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
}

void quantize_block(const float* x, block_q5_K* y) {
  uint8_t L[QK_K];
  quantize_k_scales(x, {31, -0.5f, 0.1f, 15}, y->scales, &y->d, &y->dmin, L);
  memset(y->qh, 0, sizeof(y->qh));
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t lo = L[64 * c + l], hi = L[64 * c + 32 + l];
      y->qs[32 * c + l] = uint8_t((lo & 0xF) | ((hi & 0xF) << 4));
      y->qh[l] |= uint8_t(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
    }
  }
}

// make_qx_quants with rmse_type 1 (weights x²), no imatrix: symmetric levels L in [0, 2 nmax) meaning
// L - nmax, scale searched over iscale = -(nmax + 0.1 is) / max for is in [-9, 9]. Returns the scale
// (negative when the largest-magnitude value is positive, as in ggml).
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < 1e-15f) {  // ggml's GROUP_MAX_EPS: an all-zero group
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  auto level = [nmax](float v) { return std::max(-nmax, std::min(nmax - 1, nearest_int(v))); };
  float iscale = float(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = level(iscale * x[i]);
    L[i] = int8_t(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * float(l);
    suml2 += w * float(l) * float(l);
  }
  float scale = suml2 != 0.f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(float(nmax) + 0.1f * float(is)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = level(iscale * x[i]);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * float(l);
      suml2 += w * float(l) * float(l);
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {  // (Σwxl)²/Σwl² is the error reduction of this fit
      for (int i = 0; i < n; ++i) L[i] = int8_t(nmax + level(iscale * x[i]));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

void quantize_block(const float* x, block_q6_K* y) {
  int8_t L[QK_K];
  float scales[QK_K / 16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < QK_K / 16; ++ib) {
    scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
    if (std::fabs(scales[ib]) > max_abs_scale) {
      max_abs_scale = std::fabs(scales[ib]);
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < 1e-15f) {  // all-zero super-block
    memset(y, 0, sizeof(*y));
    return;
  }
  // The largest-magnitude sub-block scale maps to -128, so its sign picks d's sign; the int8 scales carry
  // the rest.
  const float iscale = -128.f / max_scale;
  y->d = f32_to_f16(1 / iscale);
  for (int ib = 0; ib < QK_K / 16; ++ib)
    y->scales[ib] = int8_t(std::min(127, nearest_int(iscale * scales[ib])));
  const float d_super = f16_to_f32(y->d);
  for (int j = 0; j < QK_K / 16; ++j) {
    const float d = d_super * float(y->scales[j]);
    if (d == 0.f) continue;  // keep make_qx_quants' levels, as ggml does
    for (int i = 0; i < 16; ++i)
      L[16 * j + i] = int8_t(std::max(-32, std::min(31, nearest_int(x[16 * j + i] / d))) + 32);
  }
  for (int h = 0; h < 2; ++h) {  // halves of 128: layout of GGUF_SPEC §2.5
    const int8_t* Lh = L + 128 * h;
    uint8_t* ql = y->ql + 64 * h;
    uint8_t* qh = y->qh + 32 * h;
    for (int l = 0; l < 32; ++l) {
      const int q1 = Lh[l], q2 = Lh[l + 32], q3 = Lh[l + 64], q4 = Lh[l + 96];
      ql[l] = uint8_t((q1 & 0xF) | ((q3 & 0xF) << 4));
      ql[l + 32] = uint8_t((q2 & 0xF) | ((q4 & 0xF) << 4));
      qh[l] = uint8_t((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
    }
  }
}

template <typename Block>
void quantize_blocks(const float* x, void* y, int64_t n, int block_elems) {
  Block* out = static_cast<Block*>(y);
  for (int64_t i = 0; i < n / block_elems; ++i) quantize_block(x + i * block_elems, out + i);
}

bool is_block_type(GgmlType t) { return t != GgmlType::F32 && t != GgmlType::F16 && t != GgmlType::BF16; }

}  // namespace

bool has_quantizer(GgmlType type) {
  switch (type) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
    case GgmlType::Q5_0:
    case GgmlType::Q5_1:
    case GgmlType::Q8_0:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K:
    case GgmlType::MXFP4:
      return true;
    default:
      return false;
  }
}

void quantize_row(GgmlType type, const float* x, void* y, int64_t n) {
  const TypeTraits tt = type_traits(int32_t(type));
  if (!has_quantizer(type))
    fail(TP_ERR_UNSUPPORTED, "quantize: no quantizer for type %s (id %d)", tt.name, int(type));
  if (n < 0 || n % tt.block_elems != 0)
    fail(TP_ERR_INVALID_ARGUMENT,
         "quantize: %lld elements is not a whole number of %s blocks (%lld per block)", (long long)n, tt.name,
         (long long)tt.block_elems);
  switch (type) {
    case GgmlType::F32:
      memcpy(y, x, size_t(n) * sizeof(float));
      return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(y)[i] = f32_to_f16(x[i]);
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(y)[i] = f32_to_bf16(x[i]);
      return;
    case GgmlType::Q4_0: return quantize_blocks<block_q4_0>(x, y, n, QK);
    case GgmlType::Q4_1: return quantize_blocks<block_q4_1>(x, y, n, QK);
    case GgmlType::Q5_0: return quantize_blocks<block_q5_0>(x, y, n, QK);
    case GgmlType::Q5_1: return quantize_blocks<block_q5_1>(x, y, n, QK);
    case GgmlType::Q8_0: return quantize_blocks<block_q8_0>(x, y, n, QK);
    case GgmlType::Q4_K: return quantize_blocks<block_q4_K>(x, y, n, QK_K);
    case GgmlType::Q5_K: return quantize_blocks<block_q5_K>(x, y, n, QK_K);
    case GgmlType::Q6_K: return quantize_blocks<block_q6_K>(x, y, n, QK_K);
    case GgmlType::MXFP4: return quantize_blocks<block_mxfp4>(x, y, n, QK);
    default:
      fail(TP_ERR_INTERNAL, "quantize: type %s listed as quantizable but not dispatched", tt.name);
  }
}

int64_t quantize_rows(GgmlType type, const float* src, void* dst, int64_t n_rows, int64_t n_per_row) {
  const TypeTraits tt = type_traits(int32_t(type));
  if (!has_quantizer(type))
    fail(TP_ERR_UNSUPPORTED, "quantize: no quantizer for type %s (id %d)", tt.name, int(type));
  if (n_rows < 0 || n_per_row <= 0 || n_per_row % tt.block_elems != 0)
    fail(TP_ERR_INVALID_ARGUMENT, "quantize: %lld rows of %lld elements: the row length must be a positive "
         "multiple of the %s block size %lld", (long long)n_rows, (long long)n_per_row, tt.name,
         (long long)tt.block_elems);
  if (n_rows > INT64_MAX / n_per_row)
    fail(TP_ERR_INVALID_ARGUMENT, "quantize: %lld x %lld elements overflow int64", (long long)n_rows,
         (long long)n_per_row);
  const int64_t rb = row_bytes(tt, n_per_row);
  if (is_block_type(type)) {
    for (int64_t i = 0; i < n_rows * n_per_row; ++i) {
      if (!std::isfinite(src[i]))
        fail(TP_ERR_INVALID_ARGUMENT, "quantize: non-finite value %g at row %lld, column %lld (type %s)",
             double(src[i]), (long long)(i / n_per_row), (long long)(i % n_per_row), tt.name);
    }
  }
  auto run = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_row(type, src + r * n_per_row, static_cast<uint8_t*>(dst) + r * rb, n_per_row);
  };
  // Threads only pay off for the searched formats on large inputs (the synthetic-model writer); each row
  // is quantized independently, so the bytes do not depend on the split.
  const int64_t min_elems_per_thread = int64_t(1) << 18;
  const int64_t hw = std::max<int64_t>(1, int64_t(std::thread::hardware_concurrency()));
  const int64_t n_threads =
      std::max<int64_t>(1, std::min({hw, n_rows, n_rows * n_per_row / min_elems_per_thread}));
  const int64_t per = (n_rows + n_threads - 1) / n_threads;
  auto chunk = [&](int64_t t) { run(std::min(n_rows, t * per), std::min(n_rows, (t + 1) * per)); };
  std::vector<std::thread> workers;
  int64_t t = 1;
  try {
    for (; t < n_threads; ++t) workers.emplace_back(chunk, t);
  } catch (const std::system_error&) {
    // No more threads available: this thread does the remaining chunks itself.
  }
  chunk(0);
  for (int64_t u = t; u < n_threads; ++u) chunk(u);
  for (auto& w : workers) w.join();
  return n_rows * rb;
}

}  // namespace tp
