// unpack_check.cpp — test entry points over quant/unpack.h, so that CPU tests prove the block math the
// CUDA int8 kernels run (tests/test_unpack.py, tests/test_cuda_matmul.py load them with their own cffi
// declarations; they are deliberately not part of the public header).
//
//   tp_unpack_dequantize    x = d * q + m through unpack_group        (must equal tp_dequantize bit for bit)
//   tp_unpack_groups        the raw representation: q [n] int8, d [n/16] (one per 16 elements), m [n/32]
//   tp_unpack_quantize_act  activation groups: q [n] int8, d [n/32], s [n/32]
//   tp_unpack_matmul_int8   y[t][r] = Σ_groups group_dot(...) in k order: the CPU reference of what the
//                           CUDA MMQ/MMVQ kernels compute (same quantized activations, same integer sums)
// Layouts: weights are `rows` GGUF rows of k elements (row stride k / block_elems * block_bytes);
// activations and outputs are row-major [n_tok, k] and [n_tok, rows].
#include <cstdint>
#include <vector>

#include "common.h"
#include "include/turboprefill.h"
#include "quant/types.h"
#include "quant/unpack.h"

namespace {

// Traits of a type with int8 unpacking, or a tp::Error naming the call and the type.
tp::TypeTraits int8_traits(int32_t type, const char* what) {
  const tp::TypeTraits t = tp::type_traits(type);
  if (t.block_elems == 0) tp::fail(TP_ERR_INVALID_ARGUMENT, "%s: unknown ggml type id %d", what, int(type));
  const bool ok = tp::visit_unpack_type(tp::GgmlType(type), false, [](auto) { return true; });
  if (!ok)
    tp::fail(TP_ERR_UNSUPPORTED, "%s: type %s (id %d) has no int8 unpacking (supported: Q4_0, Q4_1, Q5_0, "
             "Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4)", what, t.name, int(type));
  return t;
}

void check_whole_blocks(const tp::TypeTraits& t, int64_t n, const char* what) {
  if (n < 0 || n % t.block_elems != 0)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "%s: %lld elements is not a whole number of %s blocks (%lld per block)",
             what, (long long)n, t.name, (long long)t.block_elems);
}

// Unpacks n elements (whole blocks) into q [n], wd [n/32] groups.
template <class B>
void unpack_all(const void* src, int64_t n, int8_t* q, tp::WGroup* wg) {
  const B* blocks = static_cast<const B*>(src);
  for (int64_t gi = 0; gi < n / 32; ++gi) wg[gi] = tp::unpack_row_group(blocks, gi, q + 32 * gi);
}

}  // namespace

extern "C" {

TP_API tp_status tp_unpack_dequantize(int32_t type, const void* src, int64_t n, float* dst) {
  try {
    tp::set_last_error("");
    const tp::TypeTraits t = int8_traits(type, "tp_unpack_dequantize");
    check_whole_blocks(t, n, "tp_unpack_dequantize");
    if (n > 0 && (!src || !dst)) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_unpack_dequantize: null src or dst");
    tp::visit_unpack_type(tp::GgmlType(type), 0, [&](auto tag) {
      using B = typename decltype(tag)::type;
      const B* blocks = static_cast<const B*>(src);
      int8_t q[32];
      for (int64_t gi = 0; gi < n / 32; ++gi) {
        const tp::WGroup w = tp::unpack_row_group(blocks, gi, q);
        for (int i = 0; i < 32; ++i) dst[32 * gi + i] = w.d[i / 16] * float(q[i]) + w.m;
      }
      return 0;
    });
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}

TP_API tp_status tp_unpack_groups(int32_t type, const void* src, int64_t n, int8_t* q, float* d, float* m) {
  try {
    tp::set_last_error("");
    const tp::TypeTraits t = int8_traits(type, "tp_unpack_groups");
    check_whole_blocks(t, n, "tp_unpack_groups");
    if (n > 0 && (!src || !q || !d || !m)) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_unpack_groups: null pointer");
    std::vector<tp::WGroup> wg(static_cast<size_t>(n / 32));
    tp::visit_unpack_type(tp::GgmlType(type), 0, [&](auto tag) {
      unpack_all<typename decltype(tag)::type>(src, n, q, wg.data());
      return 0;
    });
    for (int64_t gi = 0; gi < n / 32; ++gi) {
      d[2 * gi] = wg[size_t(gi)].d[0];
      d[2 * gi + 1] = wg[size_t(gi)].d[1];
      m[gi] = wg[size_t(gi)].m;
    }
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}

TP_API tp_status tp_unpack_quantize_act(const float* x, int64_t n, int8_t* q, float* d, float* s) {
  try {
    tp::set_last_error("");
    if (n < 0 || n % 32 != 0)
      tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_unpack_quantize_act: %lld elements is not a multiple of 32",
               (long long)n);
    if (n > 0 && (!x || !q || !d || !s)) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_unpack_quantize_act: null pointer");
    for (int64_t gi = 0; gi < n / 32; ++gi) {
      const tp::AGroup a = tp::quantize_group(x + 32 * gi, q + 32 * gi);
      d[gi] = a.d;
      s[gi] = a.s;
    }
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}

TP_API tp_status tp_unpack_matmul_int8(int32_t type, const void* w, int64_t rows, int64_t k, const float* x,
                                       int64_t n_tok, float* y) {
  try {
    tp::set_last_error("");
    const tp::TypeTraits t = int8_traits(type, "tp_unpack_matmul_int8");
    if (rows < 0 || n_tok < 0 || k <= 0 || k % t.block_elems != 0)
      tp::fail(TP_ERR_INVALID_ARGUMENT,
               "tp_unpack_matmul_int8: rows %lld, k %lld, n_tok %lld; k must be a positive multiple of the "
               "%s block size %lld", (long long)rows, (long long)k, (long long)n_tok, t.name,
               (long long)t.block_elems);
    if (rows > 0 && n_tok > 0 && (!w || !x || !y))
      tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_unpack_matmul_int8: null pointer");
    const int64_t ng = k / 32, rb = tp::row_bytes(t, k);
    std::vector<int8_t> xq(static_cast<size_t>(n_tok * k)), wq(static_cast<size_t>(k));
    std::vector<tp::AGroup> xa(static_cast<size_t>(n_tok * ng));
    std::vector<tp::WGroup> wg(static_cast<size_t>(ng));
    for (int64_t gi = 0; gi < n_tok * ng; ++gi)
      xa[size_t(gi)] = tp::quantize_group(x + 32 * gi, &xq[size_t(32 * gi)]);
    tp::visit_unpack_type(tp::GgmlType(type), 0, [&](auto tag) {
      using B = typename decltype(tag)::type;
      using U = tp::Unpack<B>;
      for (int64_t r = 0; r < rows; ++r) {
        unpack_all<B>(static_cast<const uint8_t*>(w) + r * rb, k, wq.data(), wg.data());
        for (int64_t tk = 0; tk < n_tok; ++tk) {
          float acc = 0.0f;
          for (int64_t gi = 0; gi < ng; ++gi) {
            const int8_t* a = &xq[size_t(tk * k + 32 * gi)];
            const int8_t* b = &wq[size_t(32 * gi)];
            acc += tp::group_dot<U::kSplit, U::kOffset>(wg[size_t(gi)], xa[size_t(tk * ng + gi)],
                                                        tp::dot_i8(b, a, 16), tp::dot_i8(b + 16, a + 16, 16));
          }
          y[tk * rows + r] = acc;
        }
      }
      return 0;
    });
    return TP_OK;
  } catch (...) {
    return tp::status_from_current_exception();
  }
}

}  // extern "C"
