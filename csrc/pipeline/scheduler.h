// scheduler.h — runs a prompt's ubatches through the stages, pipelined or sequential.
//
// One worker thread per stage. Between stage s-1 and s a SpscRing of activation slots lives on stage s's
// device. Pipelined: stage s starts ubatch m+1 as soon as it has handed ubatch m on and ubatch m+1 has
// arrived. Sequential: the same code plus a one-slot credit ring from the last stage back to stage 0, so
// ubatch m+1 enters stage 0 only after ubatch m left the last stage. Both schedules run the same kernels
// in the same order per ubatch, so their logits and KV caches are bit-identical.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "pipeline/ring.h"
#include "pipeline/stage.h"

namespace tp {

enum class Schedule { Pipelined = 0, Sequential = 1 };

struct TraceEvent {
  int stage = 0;
  int ubatch = 0;
  int64_t n_tokens = 0;
  double t_start = 0, t_end = 0;  // seconds since the prefill started
};

struct PrefillJob {
  const int32_t* tokens = nullptr;  // [n]; entries < 0 name rows of embd (UbatchInput)
  const float* embd = nullptr;      // host [*, n_embd] f32 embedding rows, or null
  const int32_t* pos = nullptr;     // host [4, n] section-major rope position ids, or null (pos0 + i)
  int64_t n = 0;
  int64_t pos0 = 0;           // position of tokens[0] (tokens already in the sequence)
  bool all_logits = false;
  float* logits = nullptr;    // host: [n_vocab] or [n, n_vocab]; may be null
  Schedule schedule = Schedule::Pipelined;
  // Ubatch m is tokens [bounds[m], bounds[m+1]); bounds[0] = 0, bounds.back() = n, no ubatch larger than
  // the Pipeline's ubatch capacity. Empty: fixed ubatches of that capacity.
  std::vector<int64_t> bounds;
};

class Pipeline {
 public:
  // Allocates ring slots (on each receiving stage) and their events. Stages must outlive the Pipeline.
  // `ubatch` is the largest ubatch any job will carry (slots are sized for it).
  Pipeline(std::vector<std::unique_ptr<Stage>>& stages, const ModelConfig& c, const ModelWeights& w,
           int64_t ubatch, int ring_slots);
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Runs the job; returns the per-(stage, ubatch) trace. Throws the first stage error (naming the stage
  // and layer) or TP_ERR_CANCELLED after cancel(). Not reentrant.
  std::vector<TraceEvent> run(const PrefillJob& job);
  // Thread-safe; makes a running run() stop within one layer's compute.
  void cancel();

  static constexpr int kDefaultRingSlots = 2;

 private:
  // ub_pos: job.pos regrouped per ubatch (ubatch m's [4, nt] at 4 · bounds[m]), or null.
  void stage_loop(int s, const PrefillJob& job, const int32_t* ub_pos, double t0, std::vector<TraceEvent>& trace);

  std::vector<std::unique_ptr<Stage>>& stages_;
  const ModelConfig& cfg_;
  const ModelWeights& w_;
  int64_t ubatch_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> cancelled_{false};
  std::vector<std::unique_ptr<SpscRing>> rings_;  // rings_[s] feeds stage s (s >= 1)
  std::unique_ptr<SpscRing> credit_;              // last stage -> stage 0, sequential schedule only
};

}  // namespace tp
