// scheduler.h — the persistent pipeline: a queue of jobs whose ubatches flow through the stages.
//
// One worker thread per stage lives as long as the Pipeline. Callers submit jobs (a prefill of one
// sequence, cut into ubatches, or a decode batch of one token per sequence) and wait for their own;
// stage 0 takes ubatches from the queue, decode jobs first, then the oldest prefill job's next ubatch, so
// the ubatches of different requests enter stage 0 back to back: request B's first ubatch starts while
// request A's last one is still in a later stage, and a decode waits at stage 0 for at most the ubatch
// being computed there. Between stage s-1 and s a SpscRing of activation slots lives on stage s's device;
// each slot names its job and ubatch. Pipelined: stage s starts a ubatch as soon as it has handed the
// previous one on and the next has arrived. Sequential: the same code plus a one-slot credit ring from the
// last stage back to stage 0, so a ubatch enters stage 0 only after the previous one left the last stage.
// Both schedules run the same kernels in the same order per ubatch, so their logits and KV caches are
// bit-identical, and a ubatch's rows compute the same whatever other jobs run around it.
//
// Failure and cancellation are per job: a stage that fails a ubatch records the error in its job and
// stops it; the job's remaining ubatches pass through the stages as "skip" slots (no data, no compute),
// so every stage keeps its place in the stream and other jobs are untouched. cancel() stops every job
// submitted so far, cancel_seq() one sequence's prefills.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "pipeline/ring.h"
#include "pipeline/stage.h"

namespace tp {

enum class Schedule { Pipelined = 0, Sequential = 1 };

struct TraceEvent {
  int stage = 0;
  int ubatch = 0;
  int64_t n_tokens = 0;
  double t_start = 0, t_end = 0;  // seconds since the job was submitted
};

// One call's work. The submitter fills the inputs; the Pipeline owns the rest until run() returns.
struct Job {
  // --- inputs
  const int32_t* tokens = nullptr;  // [n]; entries < 0 name rows of embd (UbatchInput)
  const float* embd = nullptr;      // host [*, n_embd] f32 embedding rows, or null
  const int32_t* pos = nullptr;     // host [4, n] section-major rope position ids, or null (pos0 + i)
  int64_t n = 0;
  int32_t seq = 0;                  // prefill: the sequence slot
  int64_t pos0 = 0;                 // prefill: KV index of tokens[0] (tokens already in the sequence)
  std::vector<KvRow> rows;          // decode: [n] row i's slot and KV index; empty for a prefill
  bool all_logits = false;          // logits of every row (always for a decode)
  float* logits = nullptr;          // host: [n_vocab] or [n, n_vocab]; may be null
  // The planned cuts: rows [bounds[k], bounds[k+1]); bounds[0] = 0, bounds.back() = n, none larger than the
  // Pipeline's ubatch capacity. Empty: fixed ubatches of that capacity. Stage 0 may cut a planned ubatch
  // further when the Pipeline's ubatch limit is set (set_ubatch_limit), so the ubatches actually run are
  // decided as they are issued.
  std::vector<int64_t> bounds;

  // --- outputs (valid when run() returns)
  Ops::RouterStats router{0, 0};    // summed over stages; {-1, -1} when a backend cannot count

  // --- the Pipeline's bookkeeping
  struct Step {
    int64_t ubatch, n_tok;
    void* start;
    void* end;
  };
  struct StageSteps {               // written by one stage's thread only
    void* origin = nullptr;         // backend timer marked at the job's first ubatch on the stage
    double origin_host = 0;         // the host clock then, seconds since t0
    std::vector<Step> steps;        // timers not yet read
    std::vector<TraceEvent> trace;  // read ones
    Ops::RouterStats router{0, 0};
  };
  std::vector<StageSteps> stages;
  std::vector<int32_t> ub_pos;      // pos regrouped per ubatch (the one of rows [b, b+nt) as [4, nt] at 4 · b)
  double t0 = 0;
  int64_t next_ub = 0;              // stage 0: index of the next ubatch to issue (under the queue lock)
  int64_t next_row = 0;             // its first row (under the queue lock)
  size_t next_plan = 0;             // the planned ubatch holding next_row: [bounds[k], bounds[k+1]) (queue lock)
  std::atomic<bool> stop{false};    // failed or cancelled: stages skip the job's ubatches
  std::mutex mu;                    // guards the fields below
  std::condition_variable cv;
  int64_t issued = 0, retired = 0;  // ubatches that entered stage 0 / left the last stage
  bool closed = false;              // stage 0 issues no more ubatches
  bool done = false;                // closed and every issued ubatch retired
  tp_status status = TP_OK;
  std::string message;

  bool is_decode() const { return !rows.empty(); }
};

// One issued ubatch: the job's rows [row0, row0 + n_tok), its index m in the job, and whether it is the last.
struct UbatchRef {
  int64_t m = 0, row0 = 0, n_tok = 0;
  bool last = false;
};

class Pipeline {
 public:
  // Allocates ring slots (on each receiving stage) and their events and starts the stage threads. Stages
  // must outlive the Pipeline. `ubatch` is the largest ubatch any job will carry (slots are sized for it).
  Pipeline(std::vector<std::unique_ptr<Stage>>& stages, const ModelConfig& c, const ModelWeights& w,
           int64_t ubatch, int ring_slots, Schedule schedule);
  // Stops the stage threads; no run() may be waiting.
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Queues the job and waits until its ubatches have left the last stage; returns its per-(stage, ubatch)
  // trace. Throws the job's first stage error (naming the stage and layer) or TP_ERR_CANCELLED after
  // cancel(). Thread-safe: concurrent calls interleave their ubatches. Each stage reserves the KV of the
  // job's slots (Ops::kv_reserve) before the job's first ubatch.
  std::vector<TraceEvent> run(Job& job);
  // Thread-safe; stops every job submitted so far within one layer's compute.
  void cancel();
  // Thread-safe; stops the prefill jobs of sequence slot `seq` submitted so far, as cancel() does, and no
  // other job (a decode batch is one step and finishes).
  void cancel_seq(int32_t seq);

  // Ubatches at stage s now: handed to it (waiting in its input ring, or taken from the queue at stage 0) and
  // not yet handed on or retired. A snapshot; any thread.
  int in_flight(int s) const { return in_stage_[size_t(s)].load(std::memory_order_relaxed); }

  // Thread-safe: from now on no prefill ubatch issued at stage 0 has more than `limit` tokens (0: no limit
  // beyond the plan), including the remaining ubatches of prefills already running. A server lowers it while
  // answers stream, so that a decode step waits behind a short ubatch, and raises it when none does. Results
  // do not depend on it where the kernels give the same rows whatever the ubatch (the CPU backend).
  void set_ubatch_limit(int64_t limit) { limit_.store(limit < 0 ? 0 : limit, std::memory_order_relaxed); }
  int64_t ubatch_limit() const { return limit_.load(std::memory_order_relaxed); }

  static constexpr int kDefaultRingSlots = 2;

 private:
  void first_loop();
  void stage_loop(int s);
  // One ubatch of `job` at stage s, then its hand-off to stage s+1 (or its retirement at the last stage).
  // Returns false when the pipeline shuts down.
  bool process(int s, Job& job, const UbatchRef& u, bool skip);
  void compute(int s, Job& job, const UbatchRef& u);
  // Under qmu_: the next ubatch of `job` (the rest of its planned ubatch, cut to the limit for a prefill).
  UbatchRef issue_locked(Job& job);
  // Stage 0, before compute: the ubatch's position ids regrouped into job.ub_pos.
  static void regroup_pos(Job& job, const UbatchRef& u);
  void read_timers(int s, Job& job);
  // Stops the submitted jobs for which pred(job) holds.
  template <class Pred>
  void cancel_where(Pred pred);
  // Under qmu_: closes and drops queued jobs that were stopped.
  void drop_stopped_locked();
  static void close_locked(Job& job);  // under job.mu

  std::vector<std::unique_ptr<Stage>>& stages_;
  const ModelConfig& cfg_;
  const ModelWeights& w_;
  int64_t ubatch_;
  bool sequential_;
  std::atomic<bool> shutdown_{false};
  std::vector<std::unique_ptr<SpscRing>> rings_;  // rings_[s] feeds stage s (s >= 1)
  std::unique_ptr<SpscRing> credit_;              // last stage -> stage 0, sequential schedule only
  std::mutex qmu_;                                // guards the queues, active_ and Job::next_*
  std::condition_variable qcv_;
  std::deque<Job*> decode_q_, prefill_q_;         // jobs with ubatches left to issue
  std::list<Job*> active_;                        // every job in run()
  std::vector<std::thread> threads_;
  std::unique_ptr<std::atomic<int>[]> in_stage_;  // in_flight()
  std::atomic<int64_t> limit_{0};                 // set_ubatch_limit()
};

}  // namespace tp
