// engine.cpp — model loading, stage placement, and the calls on sequence slots (prefill, decode; see engine.h).
#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

#include "backend/ops.h"
#if defined(TP_WITH_CUDA)
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/device.h"
#endif

namespace tp {

namespace {

// Sequence slots cost nothing until used, but each is a row of per-slot tables in every stage.
constexpr int kMaxSeq = 4096;

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// Checks that a CUDA device entry ("cuda" or "cuda:N") names a usable GPU; otherwise says why and what to do
// instead. Returns the number of visible GPUs.
int check_cuda_entry(const std::string& entry) {
#if defined(TP_WITH_CUDA)
  std::vector<cuda::GpuInfo> gpus;
  try {
    gpus = cuda::list_devices();
  } catch (const Error& e) {  // no driver, driver too old: the runtime cannot start
    fail(TP_ERR_DEVICE, "device '%s': no CUDA GPU is visible (%s); use devices=\"cpu\"", entry.c_str(), e.what());
  }
  if (gpus.empty())
    fail(TP_ERR_DEVICE, "device '%s': no CUDA GPU is visible (the driver reports 0 devices); use devices=\"cpu\"",
         entry.c_str());
  if (entry != "cuda") {
    const std::string num = entry.substr(5);
    if (num.empty() || num.size() > 4 || num.find_first_not_of("0123456789") != std::string::npos)
      fail(TP_ERR_INVALID_ARGUMENT, "bad device entry '%s': expected cuda or cuda:N with N a number", entry.c_str());
    if (std::stoi(num) >= int(gpus.size()))
      fail(TP_ERR_DEVICE, "device '%s': only %d CUDA GPU(s) are visible (cuda:0 .. cuda:%d)", entry.c_str(),
           int(gpus.size()), int(gpus.size()) - 1);
  }
  return int(gpus.size());
#else
  fail(TP_ERR_DEVICE,
       "device '%s': this build of turboprefill has no CUDA backend (built with TP_CUDA=OFF or without nvcc); "
       "use devices=\"cpu\" or reinstall with nvcc on PATH",
       entry.c_str());
#endif
}

bool is_cuda_entry(const std::string& d) { return d.rfind("cuda", 0) == 0; }

// One entry per stage: "cuda" stands for every visible GPU (cuda:0, cuda:1, ...). Stages of one prefill run
// on one kind of backend: a cpu/cuda mix is refused (activations cannot cross between them yet).
std::vector<std::string> expand_devices(const std::vector<std::string>& devices) {
  std::vector<std::string> out;
  bool any_cpu = false, any_cuda = false;
  for (const std::string& d : devices) {
    if (!is_cuda_entry(d)) {
      any_cpu = true;
      out.push_back(d);
      continue;
    }
    any_cuda = true;
    const int n = check_cuda_entry(d);
    if (d == "cuda")
      for (int i = 0; i < n; ++i) out.push_back("cuda:" + std::to_string(i));
    else
      out.push_back(d);
  }
  if (any_cpu && any_cuda)
    fail(TP_ERR_UNSUPPORTED, "devices mix cpu and cuda stages, which this version does not support; use only cpu "
         "entries (devices=\"cpu:0,cpu:1\") or only cuda entries (devices=\"cuda\" or \"cuda:0,cuda:1\")");
  if (int64_t(out.size()) > TP_MAX_STAGES)
    fail(TP_ERR_INVALID_ARGUMENT, "%d stages after expanding \"cuda\"; at most %d stages are supported",
         int(out.size()), TP_MAX_STAGES);
  return out;
}

// Hands a stage's backend the weights it will read (a no-op for cpu; cuda copies them to its GPU now, so
// an out-of-memory shows at load time and nothing is copied inside a prefill).
void upload_stage_weights(Ops& ops, const ModelWeights& w, int64_t begin, int64_t end, bool first, bool last) {
  for (int64_t il = begin; il < end; ++il) {
    const LayerWeights& l = w.layers[size_t(il)];
    for (const Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.bo, &l.sinks,
                            &l.q_norm, &l.k_norm, &l.post_attn_norm, &l.ffn_norm, &l.gate, &l.up, &l.down,
                            &l.post_ffw_norm, &l.gate_inp, &l.gate_inp_b, &l.gate_exps, &l.up_exps, &l.down_exps,
                            &l.gate_exps_b, &l.up_exps_b, &l.down_exps_b})
      if (t->present()) ops.upload(*t);
  }
  if (w.rope_freqs.present()) ops.upload(w.rope_freqs);
  if (first) ops.upload(w.tok_embd);
  if (last) {
    ops.upload(w.output_norm);
    ops.upload(w.output);
  }
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
    if (is_cuda_entry(d)) check_cuda_entry(d);
  if (p.ubatch < 1) fail(TP_ERR_INVALID_ARGUMENT, "ubatch must be >= 1 (got %lld)", (long long)p.ubatch);
  if (p.ubatch_auto && (p.ubatch_min < 0 || p.ubatch_min > p.ubatch))
    fail(TP_ERR_INVALID_ARGUMENT, "ubatch_min must be in [1, ubatch_max=%lld] (got %lld)", (long long)p.ubatch,
         (long long)p.ubatch_min);
  if (p.ubatch_cost.tok < 0 || p.ubatch_cost.pair < 0 || p.ubatch_cost.step < 0 ||
      (p.ubatch_cost.tok == 0) != (p.ubatch_cost.pair == 0))
    fail(TP_ERR_INVALID_ARGUMENT, "ubatch cost coefficients must both be > 0 (or both 0 for the defaults); got "
         "%g per token, %g per pair", p.ubatch_cost.tok, p.ubatch_cost.pair);
  if (p.threads < 0) fail(TP_ERR_INVALID_ARGUMENT, "threads must be >= 0 (got %d)", p.threads);
  if (p.ring_slots < 0) fail(TP_ERR_INVALID_ARGUMENT, "ring_slots must be >= 0 (got %d)", p.ring_slots);
  if (p.n_ctx < 0) fail(TP_ERR_INVALID_ARGUMENT, "n_ctx must be >= 0 (got %lld)", (long long)p.n_ctx);
  if (p.n_seq < 1 || p.n_seq > kMaxSeq)
    fail(TP_ERR_INVALID_ARGUMENT, "n_seq must be in [1, %d] (got %d)", kMaxSeq, p.n_seq);
  seqs_.resize(size_t(p.n_seq));

  file_ = std::make_unique<GgufFile>(p.model_path);
  cfg_ = load_config(*file_);
  w_ = load_weights(*file_, cfg_);
  n_ctx_ = p.n_ctx > 0 ? p.n_ctx : cfg_.n_ctx_train;
  place_stages(p);
}

Engine::~Engine() = default;

void Engine::place_stages(const EngineParams& p) {
  const std::vector<std::string> devices = expand_devices(p.devices);
  const int64_t P = int64_t(devices.size());
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
  if (!p.stage_threads.empty() && int64_t(p.stage_threads.size()) != P)
    fail(TP_ERR_INVALID_ARGUMENT, "threads has %d entries but there are %lld stages; give one per stage or one "
         "number for all", int(p.stage_threads.size()), (long long)P);
  for (int t : p.stage_threads)
    if (t < 1) fail(TP_ERR_INVALID_ARGUMENT, "per-stage threads must be >= 1 (got %d)", t);
  const int64_t U = p.ubatch;
  int64_t layer = 0;
  try {
    for (int64_t s = 0; s < P; ++s) {
      auto st = std::make_unique<Stage>();
      st->index = int(s);
      st->device = devices[size_t(s)];
      st->layer_begin = layer;
      st->layer_end = layer + split[size_t(s)];
      layer = st->layer_end;
      try {
#if defined(TP_WITH_CUDA)
        if (is_cuda_entry(st->device))
          st->ops = make_cuda_ops(std::stoi(st->device.substr(5)), U);
        else
#endif
          st->ops = make_cpu_ops(p.stage_threads.empty() ? threads : p.stage_threads[size_t(s)]);
        upload_stage_weights(*st->ops, w_, st->layer_begin, st->layer_end, s == 0, s == P - 1);
        st->scratch = LayerScratch::make(*st->ops, cfg_, U);
        st->x = st->ops->alloc(U * cfg_.n_embd);
        if (s == P - 1) {
          st->normed = st->ops->alloc(U * cfg_.n_embd);
          // Last-token logits are allocated now, so a prefill never allocates inside the pipeline loop
          // (a device allocation can synchronize the GPU); all-token logits grow on first request.
          st->logits = st->ops->alloc(cfg_.n_vocab);
          st->logits_rows = 1;
        }
      } catch (const Error& e) {
        if (e.status() != TP_ERR_OUT_OF_MEMORY) throw;
        fail(TP_ERR_OUT_OF_MEMORY, "stage %d (layers %lld-%lld): %s", int(s), (long long)st->layer_begin,
             (long long)st->layer_end - 1, e.what());
      }
      stages_.push_back(std::move(st));
    }
    pipeline_ = std::make_unique<Pipeline>(stages_, cfg_, w_, U, p.ring_slots, p.schedule);
  } catch (const std::bad_alloc&) {
    fail(TP_ERR_OUT_OF_MEMORY, "out of memory allocating activation buffers for ubatch %lld (n_embd %lld, n_ff %lld)",
         (long long)U, (long long)cfg_.n_embd, (long long)cfg_.n_ff);
  }
}

void Engine::prefill(const int32_t* tokens, int64_t n, bool all_logits, float* logits, int64_t logits_len) {
  if (tokens)
    for (int64_t i = 0; i < n; ++i)
      if (tokens[i] < 0)  // prefill_mm would read a negative id as an embedding row
        fail(TP_ERR_INVALID_ARGUMENT, "token id %d at position %lld is out of range [0, %lld)", tokens[i],
             (long long)i, (long long)cfg_.n_vocab);
  prefill_mm(tokens, n, nullptr, 0, nullptr, all_logits, logits, logits_len);
}

class Engine::Claim {
 public:
  Claim(Engine& e, const int32_t* seqs, int64_t n, const char* what) : e_(e) {
    std::lock_guard<std::mutex> lk(e.seq_mu_);
    for (int64_t i = 0; i < n; ++i)
      if (e.seqs_[size_t(seqs[i])].busy)
        fail(TP_ERR_INVALID_ARGUMENT, "%s: sequence %d is already running a call (one call at a time per sequence)",
             what, seqs[i]);
    for (int64_t i = 0; i < n; ++i) e.seqs_[size_t(seqs[i])].busy = true;
    seqs_.assign(seqs, seqs + n);
  }
  ~Claim() {
    std::lock_guard<std::mutex> lk(e_.seq_mu_);
    for (int32_t s : seqs_) e_.seqs_[size_t(s)].busy = false;
  }
  Claim(const Claim&) = delete;
  Claim& operator=(const Claim&) = delete;

 private:
  Engine& e_;
  std::vector<int32_t> seqs_;
};

void Engine::check_seq(int seq) const {
  if (seq < 0 || seq >= n_seq())
    fail(TP_ERR_INVALID_ARGUMENT, "sequence id %d is out of range [0, %d) (the Engine was created with n_seq=%d)", seq,
         n_seq(), n_seq());
}

Engine::Slot Engine::slot(int seq) const {
  check_seq(seq);
  std::lock_guard<std::mutex> lk(seq_mu_);
  return seqs_[size_t(seq)];
}

void Engine::seq_free(int seq) {
  check_seq(seq);
  std::lock_guard<std::mutex> lk(seq_mu_);
  Slot& s = seqs_[size_t(seq)];
  if (s.busy) fail(TP_ERR_INVALID_ARGUMENT, "sequence %d is running a call; cancel it or wait before freeing it", seq);
  s.n_past = s.next_pos = 0;  // the KV memory stays with the slot for its next prompt
}

void Engine::reset() {
  std::lock_guard<std::mutex> lk(seq_mu_);
  if (seqs_[0].busy) fail(TP_ERR_INVALID_ARGUMENT, "reset() while a prefill is running; cancel it first");
  seqs_[0].n_past = seqs_[0].next_pos = 0;
}

void Engine::seq_info(int seq, int64_t* n_past, int64_t* next_pos) const {
  check_seq(seq);
  std::lock_guard<std::mutex> lk(seq_mu_);
  *n_past = seqs_[size_t(seq)].n_past;
  *next_pos = seqs_[size_t(seq)].next_pos;
}

void Engine::prefill_seq(int seq, const int32_t* tokens, int64_t n, const float* embd, int64_t n_embd_rows,
                         const int32_t* pos, bool all_logits, float* logits, int64_t logits_len) {
  check_seq(seq);
  if (n <= 0) fail(TP_ERR_INVALID_ARGUMENT, "prefill needs at least one token (got %lld)", (long long)n);
  if (!tokens) fail(TP_ERR_INVALID_ARGUMENT, "tokens is NULL");
  if (n_embd_rows < 0 || (n_embd_rows > 0 && !embd))
    fail(TP_ERR_INVALID_ARGUMENT, "embd is NULL or n_embd_rows (%lld) < 0", (long long)n_embd_rows);
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] >= cfg_.n_vocab)
      fail(TP_ERR_INVALID_ARGUMENT, "token id %d at position %lld is out of range [0, %lld)", tokens[i], (long long)i,
           (long long)cfg_.n_vocab);
    if (tokens[i] < 0 && -1 - int64_t(tokens[i]) >= n_embd_rows)
      fail(TP_ERR_INVALID_ARGUMENT, "entry %lld (%d) names embedding row %lld but embd has %lld rows (entries < 0 are "
           "rows -1 - entry)", (long long)i, tokens[i], -1 - (long long)tokens[i], (long long)n_embd_rows);
  }
  if (pos && !cfg_.mrope())
    fail(TP_ERR_INVALID_ARGUMENT, "explicit positions given but the model (%s) has no M-RoPE sections; pass pos=None",
         cfg_.arch_name.c_str());
  const int64_t need = all_logits ? n * cfg_.n_vocab : cfg_.n_vocab;
  if (logits && logits_len < need)
    fail(TP_ERR_INVALID_ARGUMENT, "logits buffer holds %lld floats, need %lld", (long long)logits_len, (long long)need);

  std::shared_lock<std::shared_mutex> state(state_mu_);
  const int32_t seq32 = seq;
  Claim claim(*this, &seq32, 1, "prefill");
  const Slot cur = slot(seq);
  if (cur.n_past + n > n_ctx_)
    fail(TP_ERR_CONTEXT_OVERFLOW,
         "prompt of %lld tokens after %lld already in sequence %d exceeds the context of %lld tokens; create the "
         "Engine with a larger n_ctx (the model was trained with %lld) or free the sequence",
         (long long)n, (long long)cur.n_past, seq, (long long)n_ctx_, (long long)cfg_.n_ctx_train);
  file_->check_intact();  // weights are views of the mapping: a truncated file would be SIGBUS, not an error

  // M-RoPE models always run on explicit ids: without the caller's, the plain ones from next_pos.
  std::vector<int32_t> plain;
  int64_t next_pos = cur.n_past + n;
  if (cfg_.mrope() && !pos) {
    if (cur.next_pos + n > INT32_MAX)
      fail(TP_ERR_CONTEXT_OVERFLOW, "rope positions %lld.. of %lld tokens exceed int32", (long long)cur.next_pos,
           (long long)n);
    plain.assign(size_t(4 * n), 0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t s = 0; s < 3; ++s) plain[size_t(s * n + i)] = int32_t(cur.next_pos + i);
    pos = plain.data();
    next_pos = cur.next_pos + n;
  } else if (pos) {
    next_pos = cur.next_pos;
    for (int64_t i = 0; i < 3 * n; ++i) next_pos = std::max(next_pos, int64_t(pos[i]) + 1);
  }

  Job job;
  job.tokens = tokens;
  job.embd = embd;
  job.pos = pos;
  job.n = n;
  job.seq = seq;
  job.pos0 = cur.n_past;
  job.all_logits = all_logits;
  job.logits = logits;
  if (params_.ubatch_auto) {
    const UbatchCost k = params_.ubatch_cost.tok > 0 ? params_.ubatch_cost : ubatch_cost_defaults(cfg_);
    const int64_t umin = params_.ubatch_min > 0 ? params_.ubatch_min : std::max<int64_t>(1, params_.ubatch / 8);
    job.bounds = plan_ubatches(cfg_, k, n, cur.n_past, umin, params_.ubatch, int64_t(stages_.size()));
  }
  const double t0 = now_seconds();
  std::vector<TraceEvent> trace = run_job(job);
  const double seconds = now_seconds() - t0;
  std::lock_guard<std::mutex> lk(seq_mu_);
  Slot& s = seqs_[size_t(seq)];
  s.n_past += n;
  s.next_pos = next_pos;
  s.trace = std::move(trace);
  s.seconds = seconds;
  s.router = job.router;
}

void Engine::decode(int64_t n, const int32_t* seqs, const int32_t* tokens, float* logits, int64_t logits_len) {
  if (n <= 0) fail(TP_ERR_INVALID_ARGUMENT, "decode needs at least one sequence (got %lld)", (long long)n);
  if (!seqs || !tokens) fail(TP_ERR_INVALID_ARGUMENT, "decode: seqs and tokens must not be NULL");
  if (n > n_seq())
    fail(TP_ERR_INVALID_ARGUMENT, "decode of %lld rows but the Engine has %d sequences (one row per sequence)",
         (long long)n, n_seq());
  std::vector<bool> seen(size_t(n_seq()), false);
  for (int64_t i = 0; i < n; ++i) {
    check_seq(seqs[i]);
    if (seen[size_t(seqs[i])])
      fail(TP_ERR_INVALID_ARGUMENT, "decode lists sequence %d twice (one token per sequence per call)", seqs[i]);
    seen[size_t(seqs[i])] = true;
    if (tokens[i] < 0 || tokens[i] >= cfg_.n_vocab)
      fail(TP_ERR_INVALID_ARGUMENT, "token id %d for sequence %d is out of range [0, %lld)", tokens[i], seqs[i],
           (long long)cfg_.n_vocab);
  }
  if (logits && logits_len < n * cfg_.n_vocab)
    fail(TP_ERR_INVALID_ARGUMENT, "logits buffer holds %lld floats, need %lld (n × n_vocab)", (long long)logits_len,
         (long long)(n * cfg_.n_vocab));

  std::shared_lock<std::shared_mutex> state(state_mu_);
  Claim claim(*this, seqs, n, "decode");
  Job job;
  job.rows.resize(size_t(n));
  std::vector<int32_t> pos(size_t(4 * n), 0);
  {
    std::lock_guard<std::mutex> lk(seq_mu_);
    for (int64_t i = 0; i < n; ++i) {
      const Slot& s = seqs_[size_t(seqs[i])];
      if (s.n_past + 1 > n_ctx_)
        fail(TP_ERR_CONTEXT_OVERFLOW, "sequence %d already holds %lld tokens, the whole context of %lld; free it or "
             "create the Engine with a larger n_ctx", seqs[i], (long long)s.n_past, (long long)n_ctx_);
      if (s.next_pos >= INT32_MAX)
        fail(TP_ERR_CONTEXT_OVERFLOW, "sequence %d: rope position %lld exceeds int32", seqs[i], (long long)s.next_pos);
      job.rows[size_t(i)] = {seqs[i], s.n_past};
      // Rows sit at unrelated positions, so rope always takes explicit ids: t (h, w for M-RoPE) = next_pos.
      for (int64_t sec = 0; sec < 3; ++sec) pos[size_t(sec * n + i)] = int32_t(s.next_pos);
    }
  }
  file_->check_intact();
  job.tokens = tokens;
  job.pos = pos.data();
  job.n = n;
  job.all_logits = true;
  job.logits = logits;
  const double t0 = now_seconds();
  std::vector<TraceEvent> trace = run_job(job);
  const double seconds = now_seconds() - t0;
  std::lock_guard<std::mutex> lk(seq_mu_);
  for (int64_t i = 0; i < n; ++i) {
    Slot& s = seqs_[size_t(seqs[i])];
    s.n_past += 1;
    s.next_pos += 1;
    s.trace = trace;
    s.seconds = seconds;
    s.router = job.router;
  }
}

std::vector<TraceEvent> Engine::run_job(Job& job) {
  std::vector<TraceEvent> trace;
  try {
    trace = pipeline_->run(job);
  } catch (...) {
    file_->check_reads();  // a file truncated under the run is the root cause of whatever else failed
    throw;
  }
  file_->check_reads();  // reads past a truncation returned zeros (map_guard.h): the results are garbage
  return trace;
}

uint64_t Engine::kv_digest(int seq) const {
  check_seq(seq);
  std::unique_lock<std::shared_mutex> state(state_mu_);
  const int64_t n_past = slot(seq).n_past;
  uint64_t h = 1469598103934665603ull;
  std::vector<float> k, v;
  for (const auto& st : stages_) {
    k.resize(size_t(n_past * cfg_.kv_dim()));
    v.resize(k.size());
    for (int64_t l = 0; l < st->n_layers(); ++l) {
      st->ops->kv_to_host(seq, int(l), k.data(), v.data(), n_past);
      for (const std::vector<float>* buf : {&k, &v}) {
        const auto* p = reinterpret_cast<const uint8_t*>(buf->data());
        for (size_t i = 0; i < buf->size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
      }
    }
  }
  return h;
}

}  // namespace tp
