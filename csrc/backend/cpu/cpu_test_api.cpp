// cpu_test_api.cpp — C entry points for tests/test_cpu_kernels.py only (declared in the test's own cffi
// FFI, not in turboprefill.h): force a lower ISA for the int8 kernels, run the CPU attention kernel and the
// CPU backend's rope on host arrays.
#include <cstdint>

#include "backend/cpu/kernels.h"
#include "backend/ops.h"
#include "common.h"
#include "include/turboprefill.h"  // TP_API

extern "C" {

// level: 0 scalar, 1 AVX2, 2 AVX-512 VNNI (capped at what the CPU has); -1 restores auto-detection.
// Process-wide; returns the simd string now in effect.
TP_API const char* tp_cpu_test_set_isa(int32_t level) {
  tp::cpu_set_isa_override(level);
  return tp::cpu_simd_level();
}

// out/q: [n_tok][n_head * head_dim]; K/V: [pos0 + n_tok][n_head_kv * head_dim]. Returns 0.
TP_API int32_t tp_cpu_test_attention(float* out, const float* q, const float* K, const float* V, int64_t pos0,
                                     int64_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                     int32_t n_swa, float kq_scale, int32_t threads) {
  tp::AttnParams p{};
  p.n_head = n_head;
  p.n_head_kv = n_head_kv;
  p.head_dim = head_dim;
  p.n_swa = n_swa;
  p.kq_scale = kq_scale;
  tp::ThreadPool pool(threads < 1 ? 1 : threads);
  tp::cpu_attention(pool, out, q, K, V, pos0, n_tok, p);
  return 0;
}

// Ops::rope of the CPU backend in place: mode as tp::RopeMode (0 Norm, 1 Neox, 2 Mrope, 3 Vision), sections
// [4], pos: section-major [4, n_tok] or NULL for pos0 + i.                     x: [n_tok, n_heads, head_dim]
// Returns 0, or the tp_status of the failure with tp_last_error() set.
TP_API int32_t tp_cpu_test_rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0,
                                const int32_t* pos, int32_t mode, const int32_t* sections, int64_t n_rot, float base,
                                int32_t threads) {
  try {
    tp::RopeParams p;
    p.mode = tp::RopeMode(mode);
    p.n_rot = n_rot;
    p.base = base;
    for (int i = 0; i < 4; ++i) p.sections[i] = sections[i];
    tp::make_cpu_ops(threads < 1 ? 1 : threads)->rope(x, n_tok, n_heads, head_dim, pos0, p, pos);
    return 0;
  } catch (...) {
    return int32_t(tp::status_from_current_exception());
  }
}

// ---- vision encoder ops (tests/test_vision.py) ---------------------------------------------------------------

// q, k, v, out: [n_tok][n_head * head_dim]; seg: n_seg + 1 bounds. Returns 0.
TP_API int32_t tp_cpu_test_attention_seg(float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                                         int32_t n_head, int32_t head_dim, float kq_scale, const int32_t* seg,
                                         int64_t n_seg, int32_t threads) {
  tp::AttnParams p{};
  p.n_head = p.n_head_kv = n_head;
  p.head_dim = head_dim;
  p.kq_scale = kq_scale;
  tp::ThreadPool pool(threads < 1 ? 1 : threads);
  tp::cpu_attention_seg(pool, out, q, k, v, n_tok, p, seg, n_seg);
  return 0;
}

// act: 0 Silu, 1 GeluTanh (tp::Activation). Returns 0.
TP_API int32_t tp_cpu_test_unary(float* out, const float* in, int64_t n, int32_t act, int32_t threads) {
  tp::ThreadPool pool(threads < 1 ? 1 : threads);
  tp::cpu_unary(pool, out, in, n, tp::Activation(act));
  return 0;
}

}  // extern "C"
