// engine.h — Engine: loads a model, places its layers on stages, runs prefills and keeps the sequence.
//
// The engine owns the mmapped GGUF file, the model config and weight views, and one Stage per device
// entry. A stage is (device, layer range, Ops with its KV cache, scratch). prefill() cuts the prompt into
// ubatches and moves each through the stages; the sequence (n_past tokens in every stage's KV cache)
// persists across calls until reset().
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/weights.h"
#include "pipeline/plan.h"
#include "pipeline/scheduler.h"
#include "pipeline/stage.h"

namespace tp {

struct EngineParams {
  std::string model_path;
  std::vector<std::string> devices{"cpu:0"};  // one stage per entry
  int threads = 0;                            // per stage; 0 = cores / stages
  std::vector<int> stage_threads;             // per-stage thread counts (overrides threads); empty = threads
  int64_t ubatch = 512;                       // fixed ubatch size, or the largest one when ubatch_auto
  bool ubatch_auto = false;                   // cut each prompt into equal-cost ubatches (pipeline/plan.h)
  int64_t ubatch_min = 0;                     // ubatch_auto: smallest ubatch; 0 = ubatch / 8
  UbatchCost ubatch_cost;                     // ubatch_auto: per-layer coefficients; 0 = FLOP defaults
  Schedule schedule = Schedule::Pipelined;
  int64_t n_ctx = 0;                          // 0 = model's training context
  std::vector<int64_t> layer_split;           // layers per stage; empty = even
  int ring_slots = 0;                         // 0 = default
};

class Engine {
 public:
  explicit Engine(const EngineParams& p);
  ~Engine();

  // Runs tokens after the n_past tokens already in the sequence. On failure or cancellation the sequence
  // is left as it was before the call.
  void prefill(const int32_t* tokens, int64_t n, bool all_logits, float* logits, int64_t logits_len);
  // The same with embedding rows and explicit rope positions (multimodal prompts). Entry i is the token
  // tokens[i] when >= 0, else row -1 - tokens[i] of embd (host, [n_embd_rows, n_embd] f32). pos: null, or
  // host int32 [4, n] section-major (t, h, w, e; Ops::rope), accepted only by M-RoPE models. Without pos,
  // token i's rope position is next_pos + i (t, h, w; e = 0). Afterwards next_pos advances by n, or with pos
  // becomes max(next_pos, largest t/h/w id + 1) (Qwen2-VL: text after an image continues from there).
  void prefill_mm(const int32_t* tokens, int64_t n, const float* embd, int64_t n_embd_rows, const int32_t* pos,
                  bool all_logits, float* logits, int64_t logits_len);
  void reset() {
    std::unique_lock<std::mutex> lk(busy_, std::try_to_lock);
    if (!lk.owns_lock()) fail(TP_ERR_INVALID_ARGUMENT, "reset() while a prefill is running; cancel it first");
    n_past_ = 0;
    next_pos_ = 0;
  }
  void cancel() { pipeline_->cancel(); }
  // Testing aid: compute fails when it reaches `layer` (-1: never).
  void inject_fault(int64_t layer) {
    for (auto& st : stages_) st->fail_at_layer = layer;
  }
  // Prefix cache (state.cpp): writes the sequence's KV cache of every stage plus the model's identity;
  // load_state replaces the sequence with a saved one after checking model, layer split and KV type.
  void save_state(const std::string& path);
  void load_state(const std::string& path);
  // FNV-1a hash of every stage's KV cache over the positions in the sequence (for schedule tests).
  uint64_t kv_digest() const;

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  const GgufFile& file() const { return *file_; }
  int64_t n_ctx() const { return n_ctx_; }
  int64_t n_past() const { return n_past_; }
  // Rope position of the next plain token: n_past, except after explicit M-RoPE positions (prefill_mm).
  int64_t next_pos() const { return next_pos_; }
  const std::vector<std::unique_ptr<Stage>>& stages() const { return stages_; }
  const std::vector<TraceEvent>& trace() const { return trace_; }
  double last_seconds() const { return last_seconds_; }
  // Routing of the last prefill over all stages (Ops::RouterStats; {-1, -1} when a backend cannot count).
  Ops::RouterStats router_stats() const { return router_stats_; }

 private:
  void place_stages(const EngineParams& p);

  EngineParams params_;
  std::unique_ptr<GgufFile> file_;
  ModelConfig cfg_;
  ModelWeights w_;
  std::vector<std::unique_ptr<Stage>> stages_;
  int64_t n_ctx_ = 0;
  int64_t n_past_ = 0;
  int64_t next_pos_ = 0;
  std::unique_ptr<Pipeline> pipeline_;
  std::mutex busy_;  // one prefill at a time
  std::vector<TraceEvent> trace_;
  double last_seconds_ = 0;
  Ops::RouterStats router_stats_;
};

// "cpu" -> {"cpu:0"}; "cpu:0,cpu:1" -> two entries; whitespace ignored. Throws on an empty or bad entry.
std::vector<std::string> parse_devices(const std::string& spec);

}  // namespace tp
