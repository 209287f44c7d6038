// engine.h — Engine: loads a model, places its layers on stages, runs prefills and keeps the sequence.
//
// The engine owns the mmapped GGUF file, the model config and weight views, and one Stage per device
// entry. A stage is (device, layer range, Ops with its KV cache, scratch). prefill() cuts the prompt into
// ubatches and moves each through the stages; the sequence (n_past tokens in every stage's KV cache)
// persists across calls until reset().
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/weights.h"

namespace tp {

enum class Schedule { Pipelined = 0, Sequential = 1 };

struct EngineParams {
  std::string model_path;
  std::vector<std::string> devices{"cpu:0"};  // one stage per entry
  int threads = 0;                            // per stage; 0 = cores / stages
  int64_t ubatch = 512;
  Schedule schedule = Schedule::Pipelined;
  int64_t n_ctx = 0;                          // 0 = model's training context
  std::vector<int64_t> layer_split;           // layers per stage; empty = even
  int ring_slots = 0;                         // 0 = default
};

struct TraceEvent {
  int stage = 0;
  int ubatch = 0;
  int64_t n_tokens = 0;
  double t_start = 0, t_end = 0;  // seconds since the prefill started
};

struct Stage {
  int index = 0;
  std::string device;
  int64_t layer_begin = 0, layer_end = 0;  // [begin, end)
  std::unique_ptr<Ops> ops;
  LayerScratch scratch;
  float* x = nullptr;       // [ubatch, n_embd] residual stream of the ubatch being computed
  float* normed = nullptr;  // [ubatch, n_embd] output-norm rows (last stage)
  float* logits = nullptr;  // [ubatch, n_vocab] (last stage; rows = 1 unless all-token logits were asked)
  int64_t logits_rows = 0;
};

class Engine {
 public:
  explicit Engine(const EngineParams& p);
  ~Engine();

  // Runs tokens after the n_past tokens already in the sequence. On failure or cancellation the sequence
  // is left as it was before the call.
  void prefill(const int32_t* tokens, int64_t n, bool all_logits, float* logits, int64_t logits_len);
  void reset() { n_past_ = 0; }
  void cancel() { cancel_.store(true, std::memory_order_relaxed); }

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  const GgufFile& file() const { return *file_; }
  int64_t n_ctx() const { return n_ctx_; }
  int64_t n_past() const { return n_past_; }
  const std::vector<std::unique_ptr<Stage>>& stages() const { return stages_; }
  const std::vector<TraceEvent>& trace() const { return trace_; }
  double last_seconds() const { return last_seconds_; }

 private:
  void place_stages(const EngineParams& p);
  void run_stage(Stage& st, const int32_t* tokens, int64_t pos0, int64_t n_tok, bool want_all, bool want_last);

  EngineParams params_;
  std::unique_ptr<GgufFile> file_;
  ModelConfig cfg_;
  ModelWeights w_;
  std::vector<std::unique_ptr<Stage>> stages_;
  int64_t n_ctx_ = 0;
  int64_t n_past_ = 0;
  std::atomic<bool> cancel_{false};
  std::vector<TraceEvent> trace_;
  double last_seconds_ = 0;
};

// "cpu" -> {"cpu:0"}; "cpu:0,cpu:1" -> two entries; whitespace ignored. Throws on an empty or bad entry.
std::vector<std::string> parse_devices(const std::string& spec);

}  // namespace tp
