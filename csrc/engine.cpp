// engine.cpp — model loading, stage placement and the prefill driver (see engine.h).
#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

#include "backend/ops.h"
#if defined(TP_WITH_CUDA)
#include "backend/cuda/device.h"
#endif

namespace tp {

namespace {

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// Refuses CUDA device entries with a message that says why and what to do instead.
[[noreturn]] void refuse_cuda(const std::string& entry) {
#if defined(TP_WITH_CUDA)
  const std::vector<cuda::GpuInfo> gpus = cuda::list_devices();  // throws TP_ERR_DEVICE without a driver
  if (gpus.empty())
    fail(TP_ERR_DEVICE, "device '%s': no CUDA GPU is visible (the driver reports 0 devices); use devices=\"cpu\"",
         entry.c_str());
  fail(TP_ERR_UNSUPPORTED,
       "device '%s': %d CUDA GPU(s) found, but the CUDA backend's kernels are not implemented yet in this "
       "version; use devices=\"cpu\"",
       entry.c_str(), int(gpus.size()));
#else
  fail(TP_ERR_DEVICE,
       "device '%s': this build of turboprefill has no CUDA backend (built with TP_CUDA=OFF or without nvcc); "
       "use devices=\"cpu\" or reinstall with nvcc on PATH",
       entry.c_str());
#endif
}

}  // namespace

std::vector<std::string> parse_devices(const std::string& spec) {
  std::vector<std::string> out;
  size_t start = 0;
  const std::string s = trim(spec);
  if (s.empty()) fail(TP_ERR_INVALID_ARGUMENT, "devices is empty; use \"cpu\" or \"cpu:0,cpu:1\"");
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    std::string e = trim(s.substr(start, comma - start));
    if (e == "cpu") e = "cpu:" + std::to_string(out.size());
    const bool is_cpu = e.rfind("cpu:", 0) == 0, is_cuda = e == "cuda" || e.rfind("cuda:", 0) == 0;
    if (!is_cpu && !is_cuda)
      fail(TP_ERR_INVALID_ARGUMENT, "bad device entry '%s' in devices=\"%s\"; expected cpu, cpu:N, cuda or cuda:N",
           e.c_str(), spec.c_str());
    if (is_cpu) {
      const std::string num = e.substr(4);
      if (num.empty() || num.find_first_not_of("0123456789") != std::string::npos)
        fail(TP_ERR_INVALID_ARGUMENT, "bad device entry '%s': expected cpu:N with N a number", e.c_str());
    }
    out.push_back(e);
    start = comma + 1;
  }
  return out;
}

Engine::Engine(const EngineParams& p) : params_(p) {
  if (p.devices.empty()) fail(TP_ERR_INVALID_ARGUMENT, "no devices given");
  if (int64_t(p.devices.size()) > TP_MAX_STAGES)
    fail(TP_ERR_INVALID_ARGUMENT, "%d devices given; at most %d stages are supported", int(p.devices.size()),
         TP_MAX_STAGES);
  for (const std::string& d : p.devices)
    if (d.rfind("cuda", 0) == 0) refuse_cuda(d);
  if (p.ubatch < 1) fail(TP_ERR_INVALID_ARGUMENT, "ubatch must be >= 1 (got %lld)", (long long)p.ubatch);
  if (p.threads < 0) fail(TP_ERR_INVALID_ARGUMENT, "threads must be >= 0 (got %d)", p.threads);
  if (p.ring_slots < 0) fail(TP_ERR_INVALID_ARGUMENT, "ring_slots must be >= 0 (got %d)", p.ring_slots);
  if (p.n_ctx < 0) fail(TP_ERR_INVALID_ARGUMENT, "n_ctx must be >= 0 (got %lld)", (long long)p.n_ctx);

  file_ = std::make_unique<GgufFile>(p.model_path);
  cfg_ = load_config(*file_);
  w_ = load_weights(*file_, cfg_);
  n_ctx_ = p.n_ctx > 0 ? p.n_ctx : cfg_.n_ctx_train;
  place_stages(p);
}

Engine::~Engine() = default;

void Engine::place_stages(const EngineParams& p) {
  const int64_t P = int64_t(p.devices.size());
  if (P > cfg_.n_layer)
    fail(TP_ERR_INVALID_ARGUMENT, "%lld stages for a model with %lld layers; every stage needs at least one layer",
         (long long)P, (long long)cfg_.n_layer);
  std::vector<int64_t> split = p.layer_split;
  if (split.empty()) {
    for (int64_t s = 0; s < P; ++s) split.push_back(cfg_.n_layer / P + (s < cfg_.n_layer % P ? 1 : 0));
  } else {
    if (int64_t(split.size()) != P)
      fail(TP_ERR_INVALID_ARGUMENT, "layer_split has %d entries but there are %lld devices", int(split.size()),
           (long long)P);
    int64_t sum = 0;
    for (int64_t v : split) {
      if (v < 1) fail(TP_ERR_INVALID_ARGUMENT, "layer_split entries must be >= 1 (got %lld)", (long long)v);
      sum += v;
    }
    if (sum != cfg_.n_layer)
      fail(TP_ERR_INVALID_ARGUMENT, "layer_split adds up to %lld layers but the model has %lld", (long long)sum,
           (long long)cfg_.n_layer);
  }
  int threads = p.threads;
  if (threads == 0) {
    const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
    threads = std::max(1, hw / int(P));
  }
  const int64_t U = p.ubatch;
  int64_t layer = 0;
  try {
    for (int64_t s = 0; s < P; ++s) {
      auto st = std::make_unique<Stage>();
      st->index = int(s);
      st->device = p.devices[size_t(s)];
      st->layer_begin = layer;
      st->layer_end = layer + split[size_t(s)];
      layer = st->layer_end;
      st->ops = make_cpu_ops(threads);
      st->scratch = LayerScratch::make(*st->ops, cfg_, U);
      st->x = st->ops->alloc(U * cfg_.n_embd);
      if (s == P - 1) st->normed = st->ops->alloc(U * cfg_.n_embd);
      stages_.push_back(std::move(st));
    }
    pipeline_ = std::make_unique<Pipeline>(stages_, cfg_, w_, U, p.ring_slots);
  } catch (const std::bad_alloc&) {
    fail(TP_ERR_OUT_OF_MEMORY, "out of memory allocating activation buffers for ubatch %lld (n_embd %lld, n_ff %lld)",
         (long long)U, (long long)cfg_.n_embd, (long long)cfg_.n_ff);
  }
}

void Engine::prefill(const int32_t* tokens, int64_t n, bool all_logits, float* logits, int64_t logits_len) {
  if (n <= 0) fail(TP_ERR_INVALID_ARGUMENT, "prefill needs at least one token (got %lld)", (long long)n);
  if (!tokens) fail(TP_ERR_INVALID_ARGUMENT, "tokens is NULL");
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= cfg_.n_vocab)
      fail(TP_ERR_INVALID_ARGUMENT, "token id %d at position %lld is out of range [0, %lld)", tokens[i], (long long)i,
           (long long)cfg_.n_vocab);
  if (n_past_ + n > n_ctx_)
    fail(TP_ERR_CONTEXT_OVERFLOW,
         "prompt of %lld tokens after %lld already in the sequence exceeds the context of %lld tokens; create the "
         "Engine with a larger n_ctx (the model was trained with %lld) or call reset()",
         (long long)n, (long long)n_past_, (long long)n_ctx_, (long long)cfg_.n_ctx_train);
  const int64_t need = all_logits ? n * cfg_.n_vocab : cfg_.n_vocab;
  if (logits && logits_len < need)
    fail(TP_ERR_INVALID_ARGUMENT, "logits buffer holds %lld floats, need %lld", (long long)logits_len, (long long)need);

  const int64_t n_pos = n_past_ + n;
  for (auto& st : stages_) {
    try {
      st->ops->kv_reserve(st->n_layers(), cfg_.kv_dim(), n_pos);
    } catch (const std::bad_alloc&) {
      fail(TP_ERR_OUT_OF_MEMORY, "stage %d (%s): out of memory growing the KV cache to %lld positions (%.1f MiB)",
           st->index, st->device.c_str(), (long long)n_pos,
           double(2 * st->n_layers() * cfg_.kv_dim() * n_pos * 4) / (1 << 20));
    }
  }

  PrefillJob job;
  job.tokens = tokens;
  job.n = n;
  job.pos0 = n_past_;
  job.all_logits = all_logits;
  job.logits = logits;
  job.schedule = params_.schedule;
  trace_.clear();
  const double t0 = now_seconds();
  trace_ = pipeline_->run(job);
  last_seconds_ = now_seconds() - t0;
  n_past_ += n;
}

uint64_t Engine::kv_digest() const {
  uint64_t h = 1469598103934665603ull;
  std::vector<float> k, v;
  for (const auto& st : stages_) {
    k.resize(size_t(n_past_ * cfg_.kv_dim()));
    v.resize(k.size());
    for (int64_t l = 0; l < st->n_layers(); ++l) {
      st->ops->kv_to_host(int(l), k.data(), v.data(), n_past_);
      for (const std::vector<float>* buf : {&k, &v}) {
        const auto* p = reinterpret_cast<const uint8_t*>(buf->data());
        for (size_t i = 0; i < buf->size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
      }
    }
  }
  return h;
}

}  // namespace tp
