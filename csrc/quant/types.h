// types.h — ggml tensor types: ids, block structs (with size asserts) and scalar conversions.
//
// One place for the block layouts (GGUF_SPEC §2). Every struct here is the exact on-disk layout; the
// TP_HD helpers in blocks.h decode them and are shared by the CPU backend, the CUDA kernels and the
// reference quantizers, so the block math the CPU tests prove is the math every backend runs.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TP_HD __host__ __device__ __forceinline__
#else
#define TP_HD inline
#endif

namespace tp {

enum class GgmlType : int32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
  MXFP4 = 39,
};

constexpr int QK = 32;    // elements per legacy block
constexpr int QK_K = 256; // elements per K-quant super-block

struct block_q4_0 {
  uint16_t d;      // f16 scale
  uint8_t qs[16];  // nibbles: element j<16 low nibble of qs[j], j>=16 high nibble of qs[j-16]
};
struct block_q4_1 {
  uint16_t d, m;   // f16 scale, f16 min
  uint8_t qs[16];
};
struct block_q5_0 {
  uint16_t d;
  uint8_t qh[4];   // 5th bits, little-endian u32, bit j for element j
  uint8_t qs[16];
};
struct block_q5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct block_q8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct block_q4_K {
  uint16_t d, dmin;     // f16 super-block scale for scales / for mins
  uint8_t scales[12];   // 8 six-bit scales and 8 six-bit mins, packed (GGUF_SPEC §2.3)
  uint8_t qs[128];      // 4 chunks of 64 elements: low nibbles then high nibbles
};
struct block_q5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct block_q6_K {
  uint8_t ql[128];      // low 4 bits
  uint8_t qh[64];       // high 2 bits
  int8_t scales[16];    // one per 16 elements
  uint16_t d;           // f16 super-block scale (at the end)
};

// MXFP4 (OCP microscaling): 32 E2M1 codes sharing one power-of-two scale. Element j < 16 is the low nibble
// of qs[j], element j >= 16 the high nibble of qs[j - 16]. Value = kMxfp4Values[code] * 2^(e - 128): the table
// holds the E2M1 values doubled (integers) and the scale is halved, as ggml stores them (GGUF type 39).
struct block_mxfp4 {
  uint8_t e;       // E8M0 shared exponent
  uint8_t qs[16];  // E2M1 codes (sign bit 3, then exponent and mantissa)
};

static_assert(sizeof(block_q4_0) == 18, "q4_0 layout");
static_assert(sizeof(block_q4_1) == 20, "q4_1 layout");
static_assert(sizeof(block_q5_0) == 22, "q5_0 layout");
static_assert(sizeof(block_q5_1) == 24, "q5_1 layout");
static_assert(sizeof(block_q8_0) == 34, "q8_0 layout");
static_assert(sizeof(block_q4_K) == 144, "q4_K layout");
static_assert(sizeof(block_q5_K) == 176, "q5_K layout");
static_assert(sizeof(block_q6_K) == 210, "q6_K layout");
static_assert(sizeof(block_mxfp4) == 17, "mxfp4 layout");

struct TypeTraits {
  const char* name;
  int64_t block_elems;
  int64_t block_bytes;
  bool supported;  // weights of this type can be loaded and multiplied
};

// Traits of a type id; name "?" and supported=false for ids this engine does not know.
TypeTraits type_traits(int32_t type);

// Bytes of one row of n elements; n must be a multiple of the block size.
inline int64_t row_bytes(const TypeTraits& t, int64_t n) { return n / t.block_elems * t.block_bytes; }

// ---- scalar conversions (exact IEEE f16 -> f32; round-to-nearest-even f32 -> f16) -------------------

TP_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        mant <<= 1;
        ++e;
      } while ((mant & 0x400) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

TP_HD uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));  // inf / nan
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {  // result is subnormal or zero: scale by 2^24 and round to integer (ties to even)
    if (ax < 0x33000000u) return uint16_t(sign);  // < 2^-25 rounds to zero
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e;  // so that the value is m >> (shift) in units of 2^-24
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t r = ax + 0xfff + ((ax >> 13) & 1);  // round mantissa to 10 bits, ties to even
  return uint16_t(sign | (((r >> 23) - 127 + 15) << 10) | ((r >> 13) & 0x3ff));
}

// 2^(e - 128) exactly (the E8M0 scale halved, ggml's convention): e = 0 and 1 give the f32 subnormals
// 2^-128 and 2^-127, every other e a normal with exponent field e - 1. e = 255 (NaN in E8M0) gives 2^127.
TP_HD float e8m0_to_f32_half(uint8_t e) {
  const uint32_t bits = e < 2 ? (0x00200000u << e) : (uint32_t(e) - 1) << 23;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

TP_HD float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

}  // namespace tp
