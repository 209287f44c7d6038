// engine.h — Engine: loads a model, places its layers on stages, runs prefills and decodes of its sequences.
//
// The engine owns the mmapped GGUF file, the model config and weight views, one Stage per device entry
// (device, layer range, Ops with its KV cache, scratch) and the Pipeline whose stage threads run every
// call's ubatches. It holds n_seq sequence slots; each has its own n_past tokens in every stage's KV cache
// (grown as the slot is used), rope position and n_ctx limit, and persists across calls until freed.
// Calls on different slots may run concurrently from several threads: their ubatches interleave in the
// pipeline (scheduler.h) and each slot's results are what it gets alone. The single-sequence calls
// (prefill, prefill_mm, reset, save_state, load_state, kv_digest) act on slot 0.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
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
  int n_seq = 1;                              // sequence slots (>= 1)
};

class Engine {
 public:
  explicit Engine(const EngineParams& p);
  ~Engine();

  // Runs tokens after the n_past tokens already in slot 0. On failure or cancellation the slot is left as it
  // was before the call.
  void prefill(const int32_t* tokens, int64_t n, bool all_logits, float* logits, int64_t logits_len);
  // The same with embedding rows and explicit rope positions (multimodal prompts). Entry i is the token
  // tokens[i] when >= 0, else row -1 - tokens[i] of embd (host, [n_embd_rows, n_embd] f32). pos: null, or
  // host int32 [4, n] section-major (t, h, w, e; Ops::rope), accepted only by M-RoPE models. Without pos,
  // token i's rope position is next_pos + i (t, h, w; e = 0). Afterwards next_pos advances by n, or with pos
  // becomes max(next_pos, largest t/h/w id + 1) (Qwen2-VL: text after an image continues from there).
  void prefill_mm(const int32_t* tokens, int64_t n, const float* embd, int64_t n_embd_rows, const int32_t* pos,
                  bool all_logits, float* logits, int64_t logits_len) {
    prefill_seq(0, tokens, n, embd, n_embd_rows, pos, all_logits, logits, logits_len);
  }
  // prefill_mm on slot `seq`.
  void prefill_seq(int seq, const int32_t* tokens, int64_t n, const float* embd, int64_t n_embd_rows,
                   const int32_t* pos, bool all_logits, float* logits, int64_t logits_len);
  // One token per listed slot (distinct), appended to each, as one batch through the stages: row i is
  // tokens[i] at slot seqs[i]'s next position (and rope position next_pos), attending to that slot only.
  // logits: null or [n, n_vocab]. On failure or cancellation every slot is left as it was.
  void decode(int64_t n, const int32_t* seqs, const int32_t* tokens, float* logits, int64_t logits_len);
  // Forget slot `seq` (O(1): its memory stays for reuse); an error while a call runs on it.
  void seq_free(int seq);
  // Slot `seq`'s tokens and rope position of its next plain token.
  void seq_info(int seq, int64_t* n_past, int64_t* next_pos) const;
  int n_seq() const { return int(seqs_.size()); }
  // Forget slot 0 (seq_free(0)); an error while a call runs on it.
  void reset();
  // Stops every running call (each returns TP_ERR_CANCELLED; its slots stay as they were).
  void cancel() { pipeline_->cancel(); }
  // Ubatches at each stage now (Pipeline::in_flight): counts[s] for s < min(cap, n_stages); returns n_stages.
  int in_flight(int32_t* counts, int cap) const {
    const int n = int(stages_.size());
    for (int s = 0; s < n && s < cap; ++s) counts[s] = pipeline_->in_flight(s);
    return n;
  }
  // Stops the running prefills of slot `seq` only (as cancel() does); decode batches are not stopped.
  void cancel_seq(int seq) {
    check_seq(seq);
    pipeline_->cancel_seq(seq);
  }
  // Caps the prefill ubatches issued from now on (Pipeline::set_ubatch_limit); 0: the planned ones.
  void set_ubatch_limit(int64_t limit) {
    if (limit < 0) fail(TP_ERR_INVALID_ARGUMENT, "ubatch limit must be >= 0 (0: none), got %lld", (long long)limit);
    pipeline_->set_ubatch_limit(limit);
  }
  // Testing aid: compute fails when it reaches `layer` (-1: never).
  void inject_fault(int64_t layer) {
    for (auto& st : stages_) st->fail_at_layer.store(layer);
  }
  // Prefix cache (state.cpp): writes slot 0's KV cache of every stage plus the model's identity;
  // load_state replaces slot 0 with a saved one after checking model, layer split and KV type. Both wait
  // for running calls and hold new ones back while they work.
  void save_state(const std::string& path);
  void load_state(const std::string& path);
  // FNV-1a hash of every stage's KV cache over the positions in slot `seq` (for schedule tests).
  uint64_t kv_digest(int seq = 0) const;

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  const GgufFile& file() const { return *file_; }
  int64_t n_ctx() const { return n_ctx_; }
  int64_t n_past() const { return slot(0).n_past; }
  // Rope position of the next plain token of slot 0: n_past, except after explicit M-RoPE positions.
  int64_t next_pos() const { return slot(0).next_pos; }
  const std::vector<std::unique_ptr<Stage>>& stages() const { return stages_; }
  // The last finished call on slot `seq`: its ubatches' trace (times since its submission; in interleaved
  // runs they overlap other calls' steps), its wall seconds, and its routing over all stages
  // (Ops::RouterStats; {-1, -1} when a backend cannot count). A decode counts as a call of each of its slots.
  std::vector<TraceEvent> trace(int seq = 0) const { return slot(seq).trace; }
  double last_seconds(int seq = 0) const { return slot(seq).seconds; }
  Ops::RouterStats router_stats(int seq = 0) const { return slot(seq).router; }

 private:
  struct Slot {
    int64_t n_past = 0, next_pos = 0;
    bool busy = false;  // a call runs on it
    std::vector<TraceEvent> trace;
    double seconds = 0;
    Ops::RouterStats router{0, 0};
  };
  // Marks the listed slots busy for its lifetime (all or none; an error names a busy one).
  class Claim;

  void place_stages(const EngineParams& p);
  void check_seq(int seq) const;
  Slot slot(int seq) const;  // a copy, under seq_mu_
  // pipeline_->run, plus the model file's truncation check (GgufFile::check_reads) after it.
  std::vector<TraceEvent> run_job(Job& job);

  EngineParams params_;
  std::unique_ptr<GgufFile> file_;
  ModelConfig cfg_;
  ModelWeights w_;
  std::vector<std::unique_ptr<Stage>> stages_;
  int64_t n_ctx_ = 0;
  std::unique_ptr<Pipeline> pipeline_;
  mutable std::mutex seq_mu_;  // guards seqs_
  std::vector<Slot> seqs_;
  // Shared by calls on slots; exclusive for what drives the Ops from the caller's thread (state, digest).
  mutable std::shared_mutex state_mu_;
};

// "cpu" -> {"cpu:0"}; "cpu:0,cpu:1" -> two entries; whitespace ignored. Throws on an empty or bad entry.
std::vector<std::string> parse_devices(const std::string& spec);

}  // namespace tp
