// quant_api.cpp — the C ABI of the block formats: tp_type_traits, tp_quantize, tp_dequantize.
//
// Thin: validate the arguments a C caller can get wrong (null pointers, counts that are not whole blocks,
// a destination too small), then call the reference quantizer (quantize.h) or the shared block decoders
// (blocks.h). Every C++ exception becomes a tp_status plus tp_last_error() through api.cpp's helpers.
#include <cstdint>
#include <string>

#include "common.h"
#include "include/turboprefill.h"
#include "quant/blocks.h"
#include "quant/quantize.h"
#include "quant/types.h"

namespace {

// Traits of a type id the engine knows (supported or not); an unknown id is the caller's error.
tp::TypeTraits known_traits(int32_t type, const char* what) {
  const tp::TypeTraits t = tp::type_traits(type);
  if (t.block_elems == 0) tp::fail(TP_ERR_INVALID_ARGUMENT, "%s: unknown ggml type id %d", what, int(type));
  return t;
}

}  // namespace

extern "C" {

TP_API tp_status tp_type_traits(int32_t type, int64_t* block_elems, int64_t* block_bytes, const char** name) {
  try {
    tp::set_last_error("");
    const tp::TypeTraits t = known_traits(type, "tp_type_traits");
    if (block_elems) *block_elems = t.block_elems;
    if (block_bytes) *block_bytes = t.block_bytes;
    if (name) *name = t.name;  // static storage
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}

TP_API tp_status tp_quantize(int32_t type, const float* src, int64_t n_rows, int64_t n_per_row, void* dst,
                             int64_t dst_bytes) {
  try {
    tp::set_last_error("");
    const tp::TypeTraits t = known_traits(type, "tp_quantize");
    if (n_rows < 0 || n_per_row <= 0 || n_per_row % t.block_elems != 0)
      tp::fail(TP_ERR_INVALID_ARGUMENT,
               "tp_quantize: %lld rows of %lld elements; the row length must be a positive multiple of the "
               "%s block size %lld",
               (long long)n_rows, (long long)n_per_row, t.name, (long long)t.block_elems);
    const int64_t rb = tp::row_bytes(t, n_per_row);
    if (n_rows > INT64_MAX / rb)
      tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_quantize: %lld rows of %lld bytes overflow int64",
               (long long)n_rows, (long long)rb);
    if (dst_bytes < n_rows * rb)
      tp::fail(TP_ERR_INVALID_ARGUMENT,
               "tp_quantize: destination holds %lld bytes, %lld rows of %s need %lld", (long long)dst_bytes,
               (long long)n_rows, t.name, (long long)(n_rows * rb));
    if (n_rows > 0 && (!src || !dst)) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_quantize: null src or dst");
    tp::quantize_rows(tp::GgmlType(type), src, dst, n_rows, n_per_row);
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}

TP_API tp_status tp_dequantize(int32_t type, const void* src, int64_t n, float* dst) {
  try {
    tp::set_last_error("");
    const tp::TypeTraits t = known_traits(type, "tp_dequantize");
    if (n < 0 || n % t.block_elems != 0)
      tp::fail(TP_ERR_INVALID_ARGUMENT,
               "tp_dequantize: %lld elements is not a whole number of %s blocks (%lld per block)",
               (long long)n, t.name, (long long)t.block_elems);
    if (n > 0 && (!src || !dst)) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_dequantize: null src or dst");
    if (!tp::dequantize_row(tp::GgmlType(type), src, dst, n))
      tp::fail(TP_ERR_UNSUPPORTED, "tp_dequantize: no decoder for type %s (id %d)", t.name, int(type));
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}

}  // extern "C"
