// quantize.h — reference quantizers: f32 rows into ggml block formats (GGUF_SPEC §2, §3).
//
// Owns the encoders the synthetic-model writer and the tests use. They reproduce ggml's reference
// (no-imatrix) quantizers bit for bit: quantize_row_{q4_0,q4_1,q5_0,q5_1,q8_0}_ref, q4_K/q5_K
// (make_qkx2_quants search) and q6_K (make_qx_quants search), plus F16 (round-to-nearest-even) and BF16
// (ggml's rounding, NaN forced quiet). The decoders live in blocks.h; this file is the only inverse of them.
#pragma once

#include <cstdint>

#include "quant/types.h"

namespace tp {

// Quantize n floats (a whole number of blocks of `type`) from x into y (n / block_elems blocks).
// Throws tp::Error(TP_ERR_UNSUPPORTED) for a type without a quantizer and TP_ERR_INVALID_ARGUMENT when n
// is not a multiple of the block size. Inputs should be finite for block types (ggml asserts that too);
// quantize_rows checks it.
void quantize_row(GgmlType type, const float* x, void* y, int64_t n);

// Quantize n_rows rows of n_per_row floats, row r from src + r * n_per_row into dst + r * row_bytes.
// Returns the bytes written (n_rows * row_bytes). Rows are independent, so large inputs are split over
// threads; the output does not depend on the split. Throws TP_ERR_INVALID_ARGUMENT on a non-finite input
// for block types (the block formats cannot represent one and ggml's result would be meaningless).
int64_t quantize_rows(GgmlType type, const float* src, void* dst, int64_t n_rows, int64_t n_per_row);

// True when quantize_row has an encoder for `type`.
bool has_quantizer(GgmlType type);

// f32 -> bf16 exactly as ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 64);  // NaN: set the quiet bit
  return uint16_t((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

}  // namespace tp
