// blocks.h — TP_HD block decoders: one function per type that turns one block into floats.
//
// These are the single definition of each format's value formula (GGUF_SPEC §2). The CPU matmul, the
// reference dequantizer and the CUDA kernels all call them. The arithmetic order follows ggml's
// reference dequantizers (f32 products such as d*sc then *q, minus dmin*m) so that results match the
// `gguf` package bit for bit.
#pragma once

#include "quant/types.h"

namespace tp {

// Q4_K / Q5_K: sub-block j's 6-bit scale and min from the 12-byte packing.
TP_HD void get_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

TP_HD void dequant_block(const block_q4_0* b, float* y) {
  const float d = f16_to_f32(b->d);
  for (int j = 0; j < 16; ++j) {
    y[j] = float((b->qs[j] & 0xF) - 8) * d;
    y[j + 16] = float((b->qs[j] >> 4) - 8) * d;
  }
}

TP_HD void dequant_block(const block_q4_1* b, float* y) {
  const float d = f16_to_f32(b->d), m = f16_to_f32(b->m);
  for (int j = 0; j < 16; ++j) {
    y[j] = float(b->qs[j] & 0xF) * d + m;
    y[j + 16] = float(b->qs[j] >> 4) * d + m;
  }
}

TP_HD uint32_t load_u32_le(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

TP_HD void dequant_block(const block_q5_0* b, float* y) {
  const float d = f16_to_f32(b->d);
  const uint32_t qh = load_u32_le(b->qh);
  for (int j = 0; j < 16; ++j) {
    const int x0 = int((b->qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16;
    const int x1 = int((b->qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
    y[j] = float(x0) * d;
    y[j + 16] = float(x1) * d;
  }
}

TP_HD void dequant_block(const block_q5_1* b, float* y) {
  const float d = f16_to_f32(b->d), m = f16_to_f32(b->m);
  const uint32_t qh = load_u32_le(b->qh);
  for (int j = 0; j < 16; ++j) {
    const int x0 = int((b->qs[j] & 0xF) | (((qh >> j) & 1) << 4));
    const int x1 = int((b->qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    y[j] = float(x0) * d + m;
    y[j + 16] = float(x1) * d + m;
  }
}

TP_HD void dequant_block(const block_q8_0* b, float* y) {
  const float d = f16_to_f32(b->d);
  for (int j = 0; j < 32; ++j) y[j] = float(b->qs[j]) * d;
}

TP_HD void dequant_block(const block_q4_K* b, float* y) {
  const float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
  const uint8_t* q = b->qs;
  for (int c = 0; c < 4; ++c) {  // chunk of 64: sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
    uint8_t sc, m;
    get_scale_min_k4(2 * c, b->scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    get_scale_min_k4(2 * c + 1, b->scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[64 * c + l] = d1 * float(q[32 * c + l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) y[64 * c + 32 + l] = d2 * float(q[32 * c + l] >> 4) - m2;
  }
}

TP_HD void dequant_block(const block_q5_K* b, float* y) {
  const float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
  for (int c = 0; c < 4; ++c) {
    uint8_t sc, m;
    get_scale_min_k4(2 * c, b->scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    get_scale_min_k4(2 * c + 1, b->scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) {
      const int lo = (b->qs[32 * c + l] & 0xF) + (((b->qh[l] >> (2 * c)) & 1) << 4);
      const int hi = (b->qs[32 * c + l] >> 4) + (((b->qh[l] >> (2 * c + 1)) & 1) << 4);
      y[64 * c + l] = d1 * float(lo) - m1;
      y[64 * c + 32 + l] = d2 * float(hi) - m2;
    }
  }
}

TP_HD void dequant_block(const block_q6_K* b, float* y) {
  const float d = f16_to_f32(b->d);
  for (int h = 0; h < 2; ++h) {  // two halves of 128 elements
    const uint8_t* ql = b->ql + 64 * h;
    const uint8_t* qh = b->qh + 32 * h;
    const int8_t* sc = b->scales + 8 * h;
    float* yh = y + 128 * h;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      yh[l] = d * float(sc[is + 0]) * float(q1);
      yh[l + 32] = d * float(sc[is + 2]) * float(q2);
      yh[l + 64] = d * float(sc[is + 4]) * float(q3);
      yh[l + 96] = d * float(sc[is + 6]) * float(q4);
    }
  }
}

// The E2M1 code values doubled (ggml's kvalues_mxfp4): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, × 2.
TP_HD int8_t mxfp4_value(int code) {
  // Sign in bit 3; the magnitudes 0 1 2 3 4 6 8 12 of codes 0..7 are the nibbles of one constant (no table,
  // no branch: the same on host and device).
  const int mag = int((0xC8643210u >> (4 * (code & 7))) & 0xF);
  return int8_t(code & 8 ? -mag : mag);
}

TP_HD void dequant_block(const block_mxfp4* b, float* y) {
  const float d = e8m0_to_f32_half(b->e);
  for (int j = 0; j < 16; ++j) {
    y[j] = float(mxfp4_value(b->qs[j] & 0xF)) * d;
    y[j + 16] = float(mxfp4_value(b->qs[j] >> 4)) * d;
  }
}

// Dequantize n elements (a whole number of blocks) of `type` from src into y. Returns false for a type
// without a decoder. Plain float types are converted element by element.
TP_HD bool dequantize_row(GgmlType type, const void* src, float* y, int64_t n) {
  switch (type) {
    case GgmlType::F32:
      for (int64_t i = 0; i < n; ++i) y[i] = static_cast<const float*>(src)[i];
      return true;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) y[i] = f16_to_f32(static_cast<const uint16_t*>(src)[i]);
      return true;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
      return true;
#define TP_DEQ_CASE(T, blk, QB)                                                   \
  case GgmlType::T:                                                               \
    for (int64_t i = 0; i < n / QB; ++i) dequant_block(static_cast<const blk*>(src) + i, y + i * QB); \
    return true;
    TP_DEQ_CASE(Q4_0, block_q4_0, QK)
    TP_DEQ_CASE(Q4_1, block_q4_1, QK)
    TP_DEQ_CASE(Q5_0, block_q5_0, QK)
    TP_DEQ_CASE(Q5_1, block_q5_1, QK)
    TP_DEQ_CASE(Q8_0, block_q8_0, QK)
    TP_DEQ_CASE(Q4_K, block_q4_K, QK_K)
    TP_DEQ_CASE(Q5_K, block_q5_K, QK_K)
    TP_DEQ_CASE(Q6_K, block_q6_K, QK_K)
    TP_DEQ_CASE(MXFP4, block_mxfp4, QK)
#undef TP_DEQ_CASE
    default:
      return false;
  }
}

}  // namespace tp
