// vision_test.cu — tp_cuda_op_test_attention_seg / _unary: host buffers in, one CUDA Ops call, host buffers out
// (tests/test_cuda_vision.py declares them with its own cffi FFI; CUDA builds only). Like ops_test.cu: a fresh
// CUDA Ops on `device`, inputs copied in with Ops::from_host, the output NaN-filled first so an element the
// kernel forgets fails, the result read back with Ops::to_host.
#include <cmath>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "common.h"
#include "include/turboprefill.h"

namespace {

struct VisionGpu {
  std::unique_ptr<tp::Ops> ops;

  explicit VisionGpu(int dev) : ops(tp::make_cuda_ops(dev, 1)) {}
  float* put(const float* host, int64_t n) {
    float* d = ops->alloc(n);
    ops->from_host(d, host, n);
    return d;
  }
  float* nan_buffer(int64_t n) {
    const std::vector<float> nan(static_cast<size_t>(n), NAN);
    return put(nan.data(), n);
  }
};

}  // namespace

extern "C" {

TP_API tp_status tp_cuda_op_test_attention_seg(int32_t device, float* out, const float* q, const float* k,
                                               const float* v, int64_t n_tok, int32_t n_head, int32_t head_dim,
                                               float kq_scale, const int32_t* seg, int64_t n_seg) {
  try {
    tp::set_last_error("");
    if (!out || !q || !k || !v || !seg || n_tok <= 0 || n_head <= 0 || head_dim <= 0 || n_seg < 1)
      tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_cuda_op_test_attention_seg: bad arguments");
    VisionGpu g(device);
    const int64_t n = n_tok * n_head * head_dim;
    const float *qd = g.put(q, n), *kd = g.put(k, n), *vd = g.put(v, n);
    float* od = g.nan_buffer(n);
    int32_t* sd = g.ops->alloc_i32(n_seg + 1);
    g.ops->from_host_i32(sd, seg, n_seg + 1);
    tp::AttnParams p{};
    p.n_head = p.n_head_kv = n_head;
    p.head_dim = head_dim;
    p.kq_scale = kq_scale;
    g.ops->attention_seg(od, qd, kd, vd, n_tok, p, sd, n_seg);
    g.ops->to_host(out, od, n);
  } catch (...) {
    return tp::status_from_current_exception();
  }
  return TP_OK;
}

// act: 0 Silu, 1 GeluTanh (tp::Activation).
TP_API tp_status tp_cuda_op_test_unary(int32_t device, float* out, const float* in, int64_t n, int32_t act) {
  try {
    tp::set_last_error("");
    if (!out || !in || n <= 0 || act < 0 || act > 1)
      tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_cuda_op_test_unary: bad arguments");
    VisionGpu g(device);
    const float* id = g.put(in, n);
    float* od = g.nan_buffer(n);
    g.ops->unary(od, id, n, tp::Activation(act));
    g.ops->to_host(out, od, n);
  } catch (...) {
    return tp::status_from_current_exception();
  }
  return TP_OK;
}

}  // extern "C"
