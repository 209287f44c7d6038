// api.cpp — the C ABI (include/turboprefill.h) over the C++ engine.
//
// Every entry point catches every exception and turns it into a tp_status plus a thread-local message
// for tp_last_error(); nothing C++ crosses the boundary.
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "backend/cpu/kernels.h"
#include "common.h"
#include "engine.h"
#include "gguf/gguf.h"
#include "pipeline/ring_stress.h"
#if defined(TP_WITH_CUDA)
#include "backend/cuda/device.h"
#endif

struct tp_engine {
  std::unique_ptr<tp::Engine> impl;
};

namespace tp {

namespace {
thread_local std::string g_last_error;
}

void set_last_error(const std::string& msg) { g_last_error = msg; }

// Maps the exception being handled to a status and records its message. Call only inside catch.
tp_status status_from_current_exception() {
  try {
    throw;
  } catch (const Error& e) {
    set_last_error(e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    set_last_error("out of memory");
    return TP_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_last_error(std::string("internal error: ") + e.what());
    return TP_ERR_INTERNAL;
  } catch (...) {
    set_last_error("internal error: unknown exception");
    return TP_ERR_INTERNAL;
  }
}

}  // namespace tp

#define TP_GUARD_BEGIN \
  try {                \
    tp::set_last_error("");
#define TP_GUARD_END                          \
  }                                           \
  catch (...) {                               \
    return tp::status_from_current_exception(); \
  }                                           \
  return TP_OK;

extern "C" {

const char* tp_last_error(void) { return tp::g_last_error.c_str(); }

const char* tp_build_info_json(void) {
  static const std::string info = [] {
    std::string cuda = "false", archs = "[]", ver = "null";
#if defined(TP_WITH_CUDA)
    cuda = "true";
    archs = "[";
    std::string a = TP_CUDA_ARCHS_STR;
    size_t start = 0;
    while (start < a.size()) {
      size_t semi = a.find(',', start);
      if (semi == std::string::npos) semi = a.size();
      if (archs.size() > 1) archs += ",";
      archs += "\"" + a.substr(start, semi - start) + "\"";
      start = semi + 1;
    }
    archs += "]";
    ver = "\"" + std::string(TP_CUDA_VERSION_STR) + "\"";
#endif
#if defined(TP_CUDA_EMULATE)
    const char* emulated = "true";  // a test build: the "GPUs" are tests/cuda_emu running on the CPU
#else
    const char* emulated = "false";
#endif
    return tp::fmt("{\"version\":\"0.1.0\",\"cuda\":%s,\"cuda_archs\":%s,\"cuda_version\":%s,\"cuda_emulated\":%s,"
                   "\"simd\":\"%s\"}",
                   cuda.c_str(), archs.c_str(), ver.c_str(), emulated, tp::cpu_simd_level());
  }();
  return info.c_str();
}

namespace {
char* dup_string(const std::string& s) {
  char* buf = static_cast<char*>(std::malloc(s.size() + 1));
  if (!buf) throw std::bad_alloc();
  std::memcpy(buf, s.c_str(), s.size() + 1);
  return buf;
}
}  // namespace

tp_status tp_cuda_devices_json(char** json_out) {
  TP_GUARD_BEGIN
  if (!json_out) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_cuda_devices_json: NULL argument");
  *json_out = nullptr;
#if defined(TP_WITH_CUDA)
  const std::vector<tp::cuda::GpuInfo> gpus = tp::cuda::list_devices();
  std::string js = "{\"gpus\":[";
  for (size_t i = 0; i < gpus.size(); ++i) {
    const auto& g = gpus[i];
    std::string name;
    for (char c : g.name)
      if (c != '"' && c != '\\' && static_cast<unsigned char>(c) >= 0x20) name += c;
    js += tp::fmt("%s{\"index\":%d,\"name\":\"%s\",\"cc\":\"%d.%d\",\"total_bytes\":%lld,\"free_bytes\":%lld,\"sms\":%d}",
                  i ? "," : "", g.index, name.c_str(), g.cc_major, g.cc_minor, (long long)g.total_bytes,
                  (long long)g.free_bytes, g.multiprocessors);
  }
  js += "],\"peer\":[";
  for (size_t a = 0; a < gpus.size(); ++a) {
    js += a ? ",[" : "[";
    for (size_t b = 0; b < gpus.size(); ++b)
      js += std::string(b ? "," : "") + (a == b || tp::cuda::can_access_peer(int(a), int(b)) ? "true" : "false");
    js += "]";
  }
  js += "]}";
  *json_out = dup_string(js);
#else
  tp::fail(TP_ERR_UNSUPPORTED, "this build of turboprefill has no CUDA backend (built with TP_CUDA=OFF or without nvcc)");
#endif
  TP_GUARD_END
}

void tp_engine_params_default(tp_engine_params* p) {
  if (!p) return;
  std::memset(p, 0, sizeof(*p));
  p->devices = "cpu";
  p->ubatch = 512;
  p->schedule = TP_SCHEDULE_PIPELINED;
}

tp_status tp_engine_create(const tp_engine_params* params, tp_engine** out) {
  TP_GUARD_BEGIN
  if (!params || !out) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_create: params and out must not be NULL");
  *out = nullptr;
  if (!params->model_path) tp::fail(TP_ERR_INVALID_ARGUMENT, "model_path is NULL");
  tp::EngineParams p;
  p.model_path = params->model_path;
  p.devices = tp::parse_devices(params->devices ? params->devices : "cpu");
  p.threads = params->threads;
  p.ubatch = params->ubatch;
  if (params->schedule != TP_SCHEDULE_PIPELINED && params->schedule != TP_SCHEDULE_SEQUENTIAL)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "schedule must be pipelined (0) or sequential (1), got %d", params->schedule);
  p.schedule = tp::Schedule(params->schedule);
  p.n_ctx = params->n_ctx;
  if (params->n_layer_split < 0 || params->n_layer_split > TP_MAX_STAGES)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "n_layer_split %d out of range [0, %d]", params->n_layer_split, TP_MAX_STAGES);
  for (int i = 0; i < params->n_layer_split; ++i) p.layer_split.push_back(params->layer_split[i]);
  p.ring_slots = params->ring_slots;
  p.ubatch_auto = params->ubatch_auto != 0;
  if (params->n_stage_threads < 0 || params->n_stage_threads > TP_MAX_STAGES)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "n_stage_threads %d out of range [0, %d]", params->n_stage_threads,
             TP_MAX_STAGES);
  for (int i = 0; i < params->n_stage_threads; ++i) p.stage_threads.push_back(params->stage_threads[i]);
  p.ubatch_min = params->ubatch_min;
  p.ubatch_cost = {params->ubatch_cost_tok, params->ubatch_cost_pair, params->ubatch_cost_step};
  p.n_seq = params->n_seq > 1 ? params->n_seq : 1;
  if (params->n_seq < 0) tp::fail(TP_ERR_INVALID_ARGUMENT, "n_seq must be >= 0 (got %d)", params->n_seq);
  auto* e = new tp_engine;
  try {
    e->impl = std::make_unique<tp::Engine>(p);
  } catch (...) {
    delete e;
    throw;
  }
  *out = e;
  TP_GUARD_END
}

void tp_engine_free(tp_engine* engine) { delete engine; }

tp_status tp_engine_info(const tp_engine* engine, tp_model_info* out) {
  TP_GUARD_BEGIN
  if (!engine || !out) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_info: NULL argument");
  const tp::Engine& e = *engine->impl;
  const tp::ModelConfig& c = e.config();
  std::memset(out, 0, sizeof(*out));
  std::strncpy(out->architecture, c.arch_name.c_str(), sizeof(out->architecture) - 1);
  out->n_vocab = c.n_vocab;
  out->n_embd = c.n_embd;
  out->n_layer = c.n_layer;
  out->n_head = c.n_head;
  out->n_head_kv = c.n_head_kv;
  out->head_dim = c.head_dim;
  out->n_ff = c.n_ff;
  out->n_ctx_train = c.n_ctx_train;
  out->n_ctx = e.n_ctx();
  out->n_past = e.n_past();
  out->n_stages = int64_t(e.stages().size());
  out->n_params = e.weights().n_params;
  out->file_bytes = int64_t(e.file().file_size());
  out->n_expert = c.n_expert;
  out->n_expert_used = c.n_expert_used;
  out->n_ff_exp = c.n_ff_exp;
  out->n_swa = c.n_swa;
  for (bool b : c.layer_swa) out->n_swa_layers += b ? 1 : 0;
  out->attn_sinks = c.attn_sinks ? 1 : 0;
  const char* scaling = c.yarn.ext_factor != 0.0f ? "yarn" : c.rope_freq_scale != 1.0f ? "linear" : "none";
  std::strncpy(out->rope_scaling, scaling, sizeof(out->rope_scaling) - 1);
  for (int i = 0; i < 4; ++i) out->rope_sections[i] = c.rope_sections[i];
  out->next_pos = e.next_pos();
  out->n_seq = e.n_seq();
  TP_GUARD_END
}

tp_status tp_engine_moe_stats(const tp_engine* engine, int64_t* steps, int64_t* experts) {
  TP_GUARD_BEGIN
  if (!engine || !steps || !experts) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_moe_stats: NULL argument");
  const tp::Ops::RouterStats r = engine->impl->router_stats();
  *steps = r.calls;
  *experts = r.experts;
  TP_GUARD_END
}

tp_status tp_engine_prefill(tp_engine* engine, const int32_t* tokens, int64_t n, int32_t all_logits, float* logits,
                            int64_t logits_len) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_prefill: engine is NULL");
  engine->impl->prefill(tokens, n, all_logits != 0, logits, logits_len);
  TP_GUARD_END
}

tp_status tp_engine_prefill_mm(tp_engine* engine, const int32_t* tokens, int64_t n, const float* embd,
                               int64_t n_embd_rows, const int32_t* pos, int32_t all_logits, float* logits,
                               int64_t logits_len) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_prefill_mm: engine is NULL");
  engine->impl->prefill_mm(tokens, n, embd, n_embd_rows, pos, all_logits != 0, logits, logits_len);
  TP_GUARD_END
}

tp_status tp_engine_reset(tp_engine* engine) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_reset: engine is NULL");
  engine->impl->reset();
  TP_GUARD_END
}

void tp_engine_cancel(tp_engine* engine) {
  if (engine) engine->impl->cancel();
}

tp_status tp_engine_in_flight(const tp_engine* engine, int32_t* counts, int32_t cap, int32_t* n_stages) {
  TP_GUARD_BEGIN
  if (!engine || !n_stages || (cap > 0 && !counts))
    tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_in_flight: NULL argument");
  *n_stages = engine->impl->in_flight(counts, cap);
  TP_GUARD_END
}

tp_status tp_engine_cancel_seq(tp_engine* engine, int32_t seq) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_cancel_seq: engine is NULL");
  engine->impl->cancel_seq(seq);
  TP_GUARD_END
}

tp_status tp_engine_set_ubatch_limit(tp_engine* engine, int64_t limit) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_set_ubatch_limit: engine is NULL");
  engine->impl->set_ubatch_limit(limit);
  TP_GUARD_END
}

namespace {
void copy_trace(const std::vector<tp::TraceEvent>& tr, tp_trace_event* events, int64_t cap, int64_t* n_events) {
  *n_events = int64_t(tr.size());
  for (int64_t i = 0; events && i < cap && i < int64_t(tr.size()); ++i) {
    events[i].stage = tr[size_t(i)].stage;
    events[i].ubatch = tr[size_t(i)].ubatch;
    events[i].n_tokens = tr[size_t(i)].n_tokens;
    events[i].t_start = tr[size_t(i)].t_start;
    events[i].t_end = tr[size_t(i)].t_end;
  }
}
}  // namespace

tp_status tp_engine_last_seconds(const tp_engine* engine, double* seconds) {
  TP_GUARD_BEGIN
  if (!engine || !seconds) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_last_seconds: NULL argument");
  *seconds = engine->impl->last_seconds();
  TP_GUARD_END
}

tp_status tp_engine_trace(const tp_engine* engine, tp_trace_event* events, int64_t cap, int64_t* n_events) {
  TP_GUARD_BEGIN
  if (!engine || !n_events) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_trace: NULL argument");
  copy_trace(engine->impl->trace(), events, cap, n_events);
  TP_GUARD_END
}

tp_status tp_engine_kv_digest(const tp_engine* engine, uint64_t* digest) {
  TP_GUARD_BEGIN
  if (!engine || !digest) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_kv_digest: NULL argument");
  *digest = engine->impl->kv_digest();
  TP_GUARD_END
}

tp_status tp_engine_prefill_seq(tp_engine* engine, int32_t seq, const int32_t* tokens, int64_t n, const float* embd,
                                int64_t n_embd_rows, const int32_t* pos, int32_t all_logits, float* logits,
                                int64_t logits_len) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_prefill_seq: engine is NULL");
  engine->impl->prefill_seq(seq, tokens, n, embd, n_embd_rows, pos, all_logits != 0, logits, logits_len);
  TP_GUARD_END
}

tp_status tp_engine_decode(tp_engine* engine, int32_t n, const int32_t* seqs, const int32_t* tokens, float* logits,
                           int64_t logits_len) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_decode: engine is NULL");
  engine->impl->decode(n, seqs, tokens, logits, logits_len);
  TP_GUARD_END
}

tp_status tp_engine_seq_free(tp_engine* engine, int32_t seq) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_seq_free: engine is NULL");
  engine->impl->seq_free(seq);
  TP_GUARD_END
}

tp_status tp_engine_seq_info(const tp_engine* engine, int32_t seq, int64_t* n_past, int64_t* next_pos) {
  TP_GUARD_BEGIN
  if (!engine || !n_past || !next_pos) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_seq_info: NULL argument");
  engine->impl->seq_info(seq, n_past, next_pos);
  TP_GUARD_END
}

tp_status tp_engine_seq_trace(const tp_engine* engine, int32_t seq, tp_trace_event* events, int64_t cap,
                              int64_t* n_events, double* seconds) {
  TP_GUARD_BEGIN
  if (!engine || !n_events) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_seq_trace: NULL argument");
  copy_trace(engine->impl->trace(seq), events, cap, n_events);
  if (seconds) *seconds = engine->impl->last_seconds(seq);
  TP_GUARD_END
}

tp_status tp_engine_seq_moe_stats(const tp_engine* engine, int32_t seq, int64_t* steps, int64_t* experts) {
  TP_GUARD_BEGIN
  if (!engine || !steps || !experts) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_seq_moe_stats: NULL argument");
  const tp::Ops::RouterStats r = engine->impl->router_stats(seq);
  *steps = r.calls;
  *experts = r.experts;
  TP_GUARD_END
}

tp_status tp_engine_seq_kv_digest(const tp_engine* engine, int32_t seq, uint64_t* digest) {
  TP_GUARD_BEGIN
  if (!engine || !digest) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_seq_kv_digest: NULL argument");
  *digest = engine->impl->kv_digest(seq);
  TP_GUARD_END
}

tp_status tp_engine_layer_swa(const tp_engine* engine, int8_t* swa, int64_t cap) {
  TP_GUARD_BEGIN
  if (!engine || !swa) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_layer_swa: NULL argument");
  const tp::ModelConfig& c = engine->impl->config();
  for (int64_t i = 0; i < cap && i < c.n_layer; ++i)
    swa[i] = c.n_swa > 0 && i < int64_t(c.layer_swa.size()) && c.layer_swa[size_t(i)] ? 1 : 0;
  TP_GUARD_END
}

tp_status tp_engine_cost_defaults(const tp_engine* engine, double* cost_tok, double* cost_pair) {
  TP_GUARD_BEGIN
  if (!engine || !cost_tok || !cost_pair) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_cost_defaults: NULL argument");
  const tp::UbatchCost k = tp::ubatch_cost_defaults(engine->impl->config());
  *cost_tok = k.tok;
  *cost_pair = k.pair;
  TP_GUARD_END
}

tp_status tp_engine_cost_step_default(const tp_engine* engine, double* cost_step) {
  TP_GUARD_BEGIN
  if (!engine || !cost_step) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_cost_step_default: NULL argument");
  *cost_step = tp::ubatch_cost_defaults(engine->impl->config()).step;
  TP_GUARD_END
}

tp_status tp_plan_ubatches(const int8_t* layer_swa, int64_t n_layer, int64_t n_swa, double cost_tok,
                           double cost_pair, double cost_step, int64_t n_stages, int64_t n, int64_t pos0,
                           int64_t umin, int64_t umax, int64_t* bounds, int64_t cap, int64_t* n_bounds) {
  TP_GUARD_BEGIN
  if (!n_bounds || n_layer < 1 || n < 1 || pos0 < 0 || n_swa < 0 || !(cost_tok > 0) || !(cost_pair >= 0) ||
      !(cost_step >= 0) || n_stages < 1)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_plan_ubatches: bad arguments (n_layer %lld, n %lld, pos0 %lld)",
             (long long)n_layer, (long long)n, (long long)pos0);
  tp::ModelConfig c;
  c.n_layer = n_layer;
  c.n_swa = n_swa;
  for (int64_t i = 0; i < n_layer; ++i) c.layer_swa.push_back(layer_swa && layer_swa[i] != 0);
  const std::vector<int64_t> b = tp::plan_ubatches(c, {cost_tok, cost_pair, cost_step}, n, pos0, umin, umax, n_stages);
  *n_bounds = int64_t(b.size());
  for (int64_t i = 0; bounds && i < cap && i < int64_t(b.size()); ++i) bounds[i] = b[size_t(i)];
  TP_GUARD_END
}

tp_status tp_engine_save_state(tp_engine* engine, const char* path) {
  TP_GUARD_BEGIN
  if (!engine || !path) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_save_state: NULL argument");
  engine->impl->save_state(path);
  TP_GUARD_END
}

tp_status tp_engine_load_state(tp_engine* engine, const char* path) {
  TP_GUARD_BEGIN
  if (!engine || !path) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_load_state: NULL argument");
  engine->impl->load_state(path);
  TP_GUARD_END
}

tp_status tp_engine_inject_fault(tp_engine* engine, int64_t layer) {
  TP_GUARD_BEGIN
  if (!engine) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_engine_inject_fault: engine is NULL");
  engine->impl->inject_fault(layer);
  TP_GUARD_END
}

tp_status tp_ring_stress(int32_t capacity, int64_t n_items, int64_t max_delay_ns, uint64_t seed, int64_t* errors) {
  TP_GUARD_BEGIN
  if (!errors || capacity < 1 || n_items < 0 || max_delay_ns < 0)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_ring_stress: bad arguments");
  *errors = tp::ring_stress(capacity, n_items, max_delay_ns, seed);
  TP_GUARD_END
}

tp_status tp_gguf_describe_json(const char* path, char** json_out) {
  TP_GUARD_BEGIN
  if (!path || !json_out) tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_gguf_describe_json: NULL argument");
  *json_out = nullptr;
  tp::GgufFile f(path);
  *json_out = dup_string(tp::gguf_describe_json(f));
  TP_GUARD_END
}

void tp_free(void* p) { std::free(p); }

tp_status tp_cpu_matmul(int32_t type, const void* w, int64_t rows, int64_t k, const float* x, int64_t n_tok, float* y,
                        int32_t threads) {
  TP_GUARD_BEGIN
  const tp::TypeTraits tt = tp::type_traits(type);
  if (!tt.supported) tp::fail(TP_ERR_UNSUPPORTED, "tp_cpu_matmul: unsupported type %d", type);
  if (!w || !x || !y || rows < 1 || n_tok < 1 || k < 1 || k % tt.block_elems != 0)
    tp::fail(TP_ERR_INVALID_ARGUMENT, "tp_cpu_matmul: bad arguments (rows %lld, k %lld, n_tok %lld, block %lld)",
             (long long)rows, (long long)k, (long long)n_tok, (long long)tt.block_elems);
  tp::Tensor t;
  t.name = "matmul";
  t.type = tp::GgmlType(type);
  t.cols = k;
  t.rows = rows;
  t.row_bytes = tp::row_bytes(tt, k);
  t.data = w;
  auto ops = tp::make_cpu_ops(threads < 1 ? 1 : threads);
  ops->matmul(y, t, x, n_tok);
  TP_GUARD_END
}

}  // extern "C"
