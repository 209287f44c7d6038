// ops_test.cu — tp_cuda_op_test_*: host buffers in, one CUDA Ops call, host buffers out.
//
// Test entry points (tests/test_cuda_ops.py declares them with its own cffi FFI; they are not in the public
// header and exist only in CUDA builds). Each creates a fresh CUDA Ops on `device` — so the Ops glue
// (uploads, weight lookup, KV cache, events, send) is what runs, not a bare kernel — copies the inputs in,
// NaN-fills the outputs so an element a kernel forgets fails the comparison, runs the op, and copies the
// result back with Ops::to_host. Layouts are those of backend/ops.h. Errors become a tp_status with
// tp_last_error() set through the helpers common.h declares.
#include <cuda_runtime.h>

#include <memory>

#include "backend/cuda/cuda_ops.h"
#include "common.h"
#include "include/turboprefill.h"

namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    tp::fail(TP_ERR_DEVICE, "tp_cuda_op_test: %s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
  }
}

void require(bool ok, const char* what) {
  if (!ok) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_cuda_op_test: bad arguments: %s", what);
}

// A CUDA Ops plus the host <-> device copies the tests need (the Ops interface has no host-to-device copy:
// the engine never needs one).
struct Gpu {
  int device;
  std::unique_ptr<tp::Ops> ops;

  explicit Gpu(int dev, int64_t max_tokens = 1) : device(dev), ops(tp::make_cuda_ops(dev, max_tokens)) {}

  // A device copy of n floats of host memory (complete when this returns).
  float* put(const float* host, int64_t n) {
    float* d = ops->alloc(n);
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    check_cuda(cudaMemcpy(d, host, size_t(n) * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return d;
  }
  // A device copy of n int32 of host memory (complete when this returns).
  int32_t* put_i32(const int32_t* host, int64_t n) {
    int32_t* d = ops->alloc_i32(n);
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    check_cuda(cudaMemcpy(d, host, size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice), "cudaMemcpy");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return d;
  }
  // n int32 of device memory to the host, after everything enqueued (the Ops's to_host copies floats only).
  void get_i32(int32_t* host, const int32_t* dev, int64_t n) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    check_cuda(cudaMemcpy(host, dev, size_t(n) * sizeof(int32_t), cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
  // n floats of NaN.
  float* nan_buffer(int64_t n) {
    float* d = ops->alloc(n);
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    check_cuda(cudaMemset(d, 0xff, size_t(n) * sizeof(float)), "cudaMemset");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return d;
  }
};

tp::Tensor f32_vector(const char* name, const float* host, int64_t n) {
  tp::Tensor t;
  t.name = name;
  t.type = tp::GgmlType::F32;
  t.cols = n;
  t.rows = 1;
  t.row_bytes = n * int64_t(sizeof(float));
  t.data = host;
  return t;
}

}  // namespace

#define TP_TEST_BEGIN \
  try {               \
    tp::set_last_error("");
#define TP_TEST_END                             \
  return TP_OK;                                 \
  }                                             \
  catch (...) {                                 \
    return tp::status_from_current_exception(); \
  }

extern "C" {

TP_API tp_status tp_cuda_op_test_rope_yarn(int32_t device, float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                                           int64_t pos0, int32_t neox, int64_t n_rot, float base, float freq_scale,
                                           const float* freq_factors, float ext_factor, float mscale, float corr_low,
                                           float corr_high);
TP_API tp_status tp_cuda_op_test_attention_sinks(int32_t device, int32_t kernel, float* out, const float* q,
                                                 const float* k, const float* v, int64_t pos0, int64_t n_tok,
                                                 int64_t n_head, int64_t n_head_kv, int64_t head_dim, float kq_scale,
                                                 int64_t n_swa, const float* sinks, float* k_cache, float* v_cache);

// out = rms_norm(in) * w                                  in/out: [rows, dim], w: [dim]
TP_API tp_status tp_cuda_op_test_rms_norm(int32_t device, float* out, const float* in, const float* w, int64_t rows,
                                          int64_t dim, float eps) {
  TP_TEST_BEGIN
  require(out && in && w && rows > 0 && dim > 0, "rms_norm");
  Gpu g(device);
  const tp::Tensor wt = f32_vector("test.norm", w, dim);
  g.ops->upload(wt);
  const float* x = g.put(in, rows * dim);
  float* y = g.nan_buffer(rows * dim);
  g.ops->rms_norm(y, x, wt, rows, dim, eps);
  g.ops->to_host(out, y, rows * dim);
  TP_TEST_END
}

// x = rope(x) in place                                    x: [n_tok, n_heads, head_dim]; freq_factors may be NULL
TP_API tp_status tp_cuda_op_test_rope(int32_t device, float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                                      int64_t pos0, int32_t neox, int64_t n_rot, float base, float freq_scale,
                                      const float* freq_factors) {
  return tp_cuda_op_test_rope_yarn(device, x, n_tok, n_heads, head_dim, pos0, neox, n_rot, base, freq_scale,
                                   freq_factors, 0.0f, 1.0f, 0.0f, 0.0f);
}

// The same with YaRN (RopeParams::yarn; ext_factor 0 is plain RoPE).
TP_API tp_status tp_cuda_op_test_rope_yarn(int32_t device, float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                                           int64_t pos0, int32_t neox, int64_t n_rot, float base, float freq_scale,
                                           const float* freq_factors, float ext_factor, float mscale, float corr_low,
                                           float corr_high) {
  TP_TEST_BEGIN
  require(x && n_tok > 0 && n_heads > 0 && head_dim > 0 && n_rot >= 0 && n_rot <= head_dim && n_rot % 2 == 0, "rope");
  Gpu g(device);
  const int64_t n = n_tok * n_heads * head_dim;
  float* d = g.put(x, n);
  tp::RopeParams p;
  p.mode = neox ? tp::RopeMode::Neox : tp::RopeMode::Norm;
  p.n_rot = n_rot;
  p.base = base;
  p.freq_scale = freq_scale;
  p.freq_factors = freq_factors;  // host memory: the Ops copies it to the GPU on first use
  p.yarn.ext_factor = ext_factor;
  p.yarn.mscale = mscale;
  p.yarn.corr_low = corr_low;
  p.yarn.corr_high = corr_high;
  g.ops->rope(d, n_tok, n_heads, head_dim, pos0, p, nullptr);
  g.ops->to_host(x, d, n);
  TP_TEST_END
}

// Rope with position ids (Ops::rope's pos): mode as tp::RopeMode (0 Norm, 1 Neox, 2 Mrope, 3 Vision),
// sections [4]; pos: host section-major [4, n_tok], or NULL for pos0 + i.   x: [n_tok, n_heads, head_dim]
TP_API tp_status tp_cuda_op_test_rope_multi(int32_t device, float* x, int64_t n_tok, int64_t n_heads,
                                            int64_t head_dim, int64_t pos0, const int32_t* pos, int32_t mode,
                                            const int32_t* sections, int64_t n_rot, float base) {
  TP_TEST_BEGIN
  require(x && sections && n_tok > 0 && n_heads > 0 && head_dim > 0 && mode >= 0 && mode <= 3, "rope_multi");
  Gpu g(device);
  const int64_t n = n_tok * n_heads * head_dim;
  float* d = g.put(x, n);
  int32_t* dpos = nullptr;
  if (pos) {
    dpos = g.ops->alloc_i32(4 * n_tok);
    g.ops->from_host_i32(dpos, pos, 4 * n_tok);
  }
  tp::RopeParams p;
  p.mode = tp::RopeMode(mode);
  p.n_rot = n_rot;
  p.base = base;
  for (int i = 0; i < 4; ++i) p.sections[i] = sections[i];
  g.ops->rope(d, n_tok, n_heads, head_dim, pos0, p, dpos);
  g.ops->to_host(x, d, n);
  TP_TEST_END
}

// dst = src through Ops::from_host and to_host (n floats).
TP_API tp_status tp_cuda_op_test_from_host(int32_t device, float* dst, const float* src, int64_t n) {
  TP_TEST_BEGIN
  require(dst && src && n > 0, "from_host");
  Gpu g(device);
  float* d = g.nan_buffer(n);
  g.ops->from_host(d, src, n);
  g.ops->to_host(dst, d, n);
  TP_TEST_END
}

// Attention of a ubatch against a KV history, as a stage runs it: the history (positions 0..pos0-1) and the
// ubatch (pos0..pos0+n_tok-1) are stored with two kv_store calls, then attention runs with `kernel`
// (0 auto, 1 tensor cores, 2 f32). k, v: [pos0 + n_tok, n_head_kv * head_dim]; q: [n_tok, n_head, head_dim];
// out: [n_tok, n_head * head_dim]. k_cache/v_cache (may be NULL) receive the cache as kv_to_host returns it.
TP_API tp_status tp_cuda_op_test_attention(int32_t device, int32_t kernel, float* out, const float* q, const float* k,
                                           const float* v, int64_t pos0, int64_t n_tok, int64_t n_head,
                                           int64_t n_head_kv, int64_t head_dim, float kq_scale, int64_t n_swa,
                                           float* k_cache, float* v_cache) {
  return tp_cuda_op_test_attention_sinks(device, kernel, out, q, k, v, pos0, n_tok, n_head, n_head_kv, head_dim,
                                         kq_scale, n_swa, nullptr, k_cache, v_cache);
}

// The same with AttnParams::sinks = `sinks` ([n_head] f32 host memory, uploaded as a weight) when not NULL.
TP_API tp_status tp_cuda_op_test_attention_sinks(int32_t device, int32_t kernel, float* out, const float* q,
                                                 const float* k, const float* v, int64_t pos0, int64_t n_tok,
                                                 int64_t n_head, int64_t n_head_kv, int64_t head_dim, float kq_scale,
                                                 int64_t n_swa, const float* sinks, float* k_cache, float* v_cache) {
  TP_TEST_BEGIN
  require(out && q && k && v && pos0 >= 0 && n_tok > 0 && n_head > 0 && n_head_kv > 0 && n_head % n_head_kv == 0 &&
              head_dim > 0 && n_swa >= 0 && kernel >= 0 && kernel <= 2,
          "attention");
  Gpu g(device);
  tp::cuda_ops_set_attention_kernel(*g.ops, kernel);
  const int64_t kv_dim = n_head_kv * head_dim, n_pos = pos0 + n_tok;
  g.ops->kv_reserve(0, 1, kv_dim, n_pos);
  const float* kd = g.put(k, n_pos * kv_dim);
  const float* vd = g.put(v, n_pos * kv_dim);
  if (pos0 > 0) g.ops->kv_store(0, 0, kd, vd, 0, pos0);
  g.ops->kv_store(0, 0, kd + pos0 * kv_dim, vd + pos0 * kv_dim, pos0, n_tok);
  const float* qd = g.put(q, n_tok * n_head * head_dim);
  float* od = g.nan_buffer(n_tok * n_head * head_dim);
  tp::AttnParams p;
  p.n_head = n_head;
  p.n_head_kv = n_head_kv;
  p.head_dim = head_dim;
  p.kq_scale = kq_scale;
  p.n_swa = n_swa;
  if (sinks) p.sinks = f32_vector("test.attn_sinks", sinks, n_head);
  g.ops->attention(od, qd, 0, 0, pos0, n_tok, p);
  g.ops->to_host(out, od, n_tok * n_head * head_dim);
  if (k_cache && v_cache) g.ops->kv_to_host(0, 0, k_cache, v_cache, n_pos);
  TP_TEST_END
}

// out = act(gate) * up (act: tp::Activation, 0 silu, 1 gelu-tanh, 2 swiglu-oai)  all: [n]
TP_API tp_status tp_cuda_op_test_glu(int32_t device, float* out, const float* gate, const float* up, int64_t n,
                                     int32_t act) {
  TP_TEST_BEGIN
  require(out && gate && up && n > 0 && act >= 0 && act <= int32_t(tp::Activation::SwigluOai), "glu");
  Gpu g(device);
  const float* gd = g.put(gate, n);
  const float* ud = g.put(up, n);
  float* od = g.nan_buffer(n);
  g.ops->glu(od, gd, ud, n, tp::Activation(act));
  g.ops->to_host(out, od, n);
  TP_TEST_END
}

// out = a + b, then out[r] += bias for the rows of out seen as [n / bias_n, bias_n]   all: [n]; bias: [bias_n]
TP_API tp_status tp_cuda_op_test_add(int32_t device, float* out, const float* a, const float* b, int64_t n,
                                     const float* bias, int64_t bias_n) {
  TP_TEST_BEGIN
  require(out && a && b && n > 0 && (!bias || (bias_n > 0 && n % bias_n == 0)), "add");
  Gpu g(device);
  const float* ad = g.put(a, n);
  const float* bd = g.put(b, n);
  float* od = g.nan_buffer(n);
  g.ops->add(od, ad, bd, n);
  if (bias) g.ops->add_bias(od, f32_vector("test.bias", bias, bias_n), n / bias_n);
  g.ops->to_host(out, od, n);
  TP_TEST_END
}

// out[i] = dequant(table[tokens[i]]) * scale               table: n_rows GGUF rows of `cols` elements of `type`
TP_API tp_status tp_cuda_op_test_embed(int32_t device, float* out, int32_t type, const void* table, int64_t n_rows,
                                       int64_t cols, const int32_t* tokens, int64_t n, float scale) {
  TP_TEST_BEGIN
  const tp::TypeTraits tt = tp::type_traits(type);
  require(out && table && tokens && n > 0 && n_rows > 0 && tt.block_elems > 0 && cols > 0 &&
              cols % tt.block_elems == 0,
          "embed");
  for (int64_t i = 0; i < n; ++i) require(tokens[i] >= 0 && tokens[i] < n_rows, "embed token id out of range");
  Gpu g(device);
  tp::Tensor t;
  t.name = "test.token_embd";
  t.type = tp::GgmlType(type);
  t.cols = cols;
  t.rows = n_rows;
  t.row_bytes = tp::row_bytes(tt, cols);
  t.data = table;
  g.ops->upload(t);
  float* od = g.nan_buffer(n * cols);
  g.ops->embed(od, t, tokens, n, scale);
  g.ops->to_host(out, od, n * cols);
  TP_TEST_END
}

// ---- mixture of experts ----

// ids, weights = router_topk(logits)                      logits: [n_tok, n_expert]; ids, weights: [n_tok * k]
TP_API tp_status tp_cuda_op_test_router_topk(int32_t device, int32_t* ids, float* weights, const float* logits,
                                             int64_t n_tok, int64_t n_expert, int64_t k) {
  TP_TEST_BEGIN
  require(ids && weights && logits && n_tok > 0 && k > 0 && k <= n_expert, "router_topk");
  Gpu g(device);
  const float* ld = g.put(logits, n_tok * n_expert);
  float* wd = g.nan_buffer(n_tok * k);
  int32_t* id = g.ops->alloc_i32(n_tok * k);  // allocations start as 0xff.. in the emulation: -1, an invalid id
  g.ops->router_topk(id, wd, ld, n_tok, n_expert, k);
  g.ops->to_host(weights, wd, n_tok * k);
  g.get_i32(ids, id, n_tok * k);
  TP_TEST_END
}

// out = moe_matmul(w, bias, in, ids) as the decoder calls it. w: n_expert stacked matrices of `rows` GGUF rows
// of `cols` elements of `type` (a 3-D expert tensor); bias: [n_expert, rows] f32 or NULL; in: [n_tok * k, cols]
// when in_per_slot else [n_tok, cols]; ids: [n_tok * k]; out: [n_tok * k, rows]. The Ops reserves no matmul
// scratch for a ubatch here, so moe_matmul's own growth path runs.
TP_API tp_status tp_cuda_op_test_moe_matmul(int32_t device, float* out, int32_t type, const void* w, int64_t n_expert,
                                            int64_t rows, int64_t cols, const float* bias, const float* in,
                                            int32_t in_per_slot, const int32_t* ids, int64_t n_tok, int64_t k) {
  TP_TEST_BEGIN
  const tp::TypeTraits tt = tp::type_traits(type);
  require(out && w && in && ids && n_expert > 0 && rows > 0 && cols > 0 && n_tok > 0 && k > 0 && tt.block_elems > 0 &&
              cols % tt.block_elems == 0,
          "moe_matmul");
  for (int64_t i = 0; i < n_tok * k; ++i)
    require(ids[i] >= 0 && ids[i] < n_expert, "moe_matmul expert id out of range");
  Gpu g(device);
  tp::Tensor t;
  t.name = "test.ffn_exps";
  t.type = tp::GgmlType(type);
  t.cols = cols;
  t.rows = n_expert * rows;
  t.mats = n_expert;
  t.row_bytes = tp::row_bytes(tt, cols);
  t.data = w;
  tp::Tensor b;
  if (bias) {
    b = f32_vector("test.ffn_exps_b", bias, rows);
    b.rows = n_expert;
  }
  const int64_t n_src = in_per_slot ? n_tok * k : n_tok;
  const float* x = g.put(in, n_src * cols);
  int32_t* id = g.put_i32(ids, n_tok * k);
  float* y = g.nan_buffer(n_tok * k * rows);
  g.ops->moe_matmul(y, t, b, x, in_per_slot != 0, id, n_tok, k);
  g.ops->to_host(out, y, n_tok * k * rows);
  TP_TEST_END
}

// out = moe_combine(y, weights)                           y: [n_tok * k, dim]; weights: [n_tok * k]; out: [n_tok, dim]
TP_API tp_status tp_cuda_op_test_moe_combine(int32_t device, float* out, const float* y, const float* weights,
                                             int64_t n_tok, int64_t k, int64_t dim) {
  TP_TEST_BEGIN
  require(out && y && weights && n_tok > 0 && k > 0 && dim > 0, "moe_combine");
  Gpu g(device);
  const float* yd = g.put(y, n_tok * k * dim);
  const float* wd = g.put(weights, n_tok * k);
  float* od = g.nan_buffer(n_tok * dim);
  g.ops->moe_combine(od, yd, wd, n_tok, k, dim);
  g.ops->to_host(out, od, n_tok * dim);
  TP_TEST_END
}

// A stage hand-off as the scheduler does it: send from an Ops on src_device into a buffer of an Ops on
// dst_device, record "filled" on the sender, wait on it on the receiver, read back there.
TP_API tp_status tp_cuda_op_test_send(int32_t src_device, int32_t dst_device, float* out, const float* in,
                                      int64_t n) {
  TP_TEST_BEGIN
  require(out && in && n > 0, "send");
  Gpu src(src_device), dst(dst_device);
  const float* x = src.put(in, n);
  float* y = dst.nan_buffer(n);
  void* filled = dst.ops->event_create();
  try {
    src.ops->send(y, *dst.ops, x, n);
    src.ops->event_record(filled);
    dst.ops->event_wait(filled);
    dst.ops->to_host(out, y, n);
  } catch (...) {
    dst.ops->event_destroy(filled);
    throw;
  }
  dst.ops->event_destroy(filled);
  TP_TEST_END
}

}  // extern "C"
