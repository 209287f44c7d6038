// scheduler.cpp — stage worker threads and the ring hand-offs (see scheduler.h, DESIGN §5).
#include "pipeline/scheduler.h"

#include <algorithm>
#include <chrono>
#include <mutex>
#include <thread>

#include "common.h"
#include "pipeline/plan.h"

namespace tp {

namespace {

// The timers of one stage's steps, released on every path (including a stage error).
struct StepTimers {
  Ops& ops;
  void* origin = nullptr;
  struct Step {
    int64_t ubatch, n_tok;
    void* start;
    void* end;
  };
  std::vector<Step> steps;

  explicit StepTimers(Ops& o) : ops(o) {}
  ~StepTimers() {
    for (Step& s : steps) {
      ops.timer_destroy(s.start);
      ops.timer_destroy(s.end);
    }
    ops.timer_destroy(origin);
  }
  void* make() {
    void* t = ops.timer_create();
    ops.timer_record(t);
    return t;
  }
};

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

Pipeline::Pipeline(std::vector<std::unique_ptr<Stage>>& stages, const ModelConfig& c, const ModelWeights& w,
                   int64_t ubatch, int ring_slots)
    : stages_(stages), cfg_(c), w_(w), ubatch_(ubatch) {
  const int R = ring_slots > 0 ? ring_slots : kDefaultRingSlots;
  rings_.resize(stages.size());
  for (size_t s = 1; s < stages.size(); ++s) {
    rings_[s] = std::make_unique<SpscRing>(R, &stop_);
    for (int i = 0; i < R; ++i) {
      RingSlot& slot = rings_[s]->slot(i);
      slot.data = stages[s]->ops->alloc(ubatch * c.n_embd);
      slot.ev_filled = stages[s]->ops->event_create();
      slot.ev_free = stages[s]->ops->event_create();
    }
  }
  credit_ = std::make_unique<SpscRing>(1, &stop_);
  credit_->slot(0).ev_filled = stages.back()->ops->event_create();
}

Pipeline::~Pipeline() {
  stages_.back()->ops->event_destroy(credit_->slot(0).ev_filled);
  for (size_t s = 1; s < rings_.size(); ++s) {
    for (int i = 0; i < rings_[s]->capacity(); ++i) {
      stages_[s]->ops->event_destroy(rings_[s]->slot(i).ev_filled);
      stages_[s]->ops->event_destroy(rings_[s]->slot(i).ev_free);
    }
  }
}

void Pipeline::cancel() {
  cancelled_.store(true, std::memory_order_relaxed);
  stop_.store(true, std::memory_order_relaxed);
  for (auto& r : rings_)
    if (r) r->wake_all();
  credit_->wake_all();
}

void Pipeline::stage_loop(int s, const PrefillJob& job, const int32_t* ub_pos, double t0,
                          std::vector<TraceEvent>& trace) {
  Stage& st = *stages_[size_t(s)];
  const int P = int(stages_.size());
  const bool first = s == 0, last = s == P - 1;
  const bool sequential = job.schedule == Schedule::Sequential && P > 1;
  const int64_t M = int64_t(job.bounds.size()) - 1;
  const int64_t E = cfg_.n_embd;
  SpscRing* in = first ? nullptr : rings_[size_t(s)].get();
  SpscRing* out = last ? nullptr : rings_[size_t(s + 1)].get();
  // Step times come from the backend's timers (GPU events on cuda), placed on the host clock through an
  // origin mark taken now; they are read after the loop, so the loop itself never waits for them.
  StepTimers timers(*st.ops);
  timers.origin = timers.make();
  const double origin = now_seconds() - t0;

  for (int64_t m = 0; m < M; ++m) {
    const int64_t b = job.bounds[size_t(m)], nt = job.bounds[size_t(m) + 1] - b;
    const bool last_ub = m == M - 1;

    // Sequential schedule: wait until the previous ubatch has left the last stage.
    if (first && sequential && m > 0) {
      const int c = credit_->acquire_filled();
      if (c < 0) return;
      st.ops->event_wait(credit_->slot(c).ev_filled);  // on a GPU: after the last stage's kernels, not its host
      credit_->release();
    }
    // Receive the ubatch's activations from the previous stage.
    if (in) {
      const int i = in->acquire_filled();
      if (i < 0) return;
      RingSlot& slot = in->slot(i);
      st.ops->event_wait(slot.ev_filled);
      st.ops->copy(st.x, slot.data, nt * E);
      st.ops->event_record(slot.ev_free);
      in->release();
    }

    void* t_start = timers.make();
    timers.steps.push_back({m, nt, t_start, nullptr});
    UbatchInput ub;
    ub.tokens = job.tokens + b;
    ub.embd = job.embd;
    ub.pos = ub_pos ? ub_pos + 4 * b : nullptr;
    ub.pos0 = job.pos0 + b;
    ub.n_tok = nt;
    st.compute(cfg_, w_, first, last, ub, job.all_logits, last_ub, stop_);
    if (last && job.logits && (job.all_logits || last_ub)) {
      const int64_t rows = job.all_logits ? nt : 1;
      st.ops->to_host(job.logits + (job.all_logits ? b * cfg_.n_vocab : 0), st.logits, rows * cfg_.n_vocab);
    }
    timers.steps.back().end = timers.make();

    // Hand the activations on to the next stage's slot.
    if (out) {
      const int j = out->acquire_free();
      if (j < 0) return;
      RingSlot& slot = out->slot(j);
      Ops& dst = *stages_[size_t(s + 1)]->ops;
      st.ops->event_wait(slot.ev_free);  // our copy must not overwrite data the consumer still reads
      st.ops->send(slot.data, dst, st.x, nt * E);
      st.ops->event_record(slot.ev_filled);
      slot.ubatch = m;
      slot.n_tok = nt;
      out->publish();
    }
    if (last && sequential && !last_ub) {
      const int c = credit_->acquire_free();
      if (c < 0) return;
      st.ops->event_record(credit_->slot(c).ev_filled);
      credit_->publish();
    }
  }
  // The loop is over: wait once, for this stage's last timer, so reading the others never waits again.
  if (!timers.steps.empty()) st.ops->timer_seconds(timers.origin, timers.steps.back().end);
  for (const StepTimers::Step& step : timers.steps) {
    TraceEvent ev;
    ev.stage = s;
    ev.ubatch = int(step.ubatch);
    ev.n_tokens = step.n_tok;
    ev.t_start = origin + st.ops->timer_seconds(timers.origin, step.start);
    ev.t_end = origin + st.ops->timer_seconds(timers.origin, step.end);
    trace.push_back(ev);
  }
}

std::vector<TraceEvent> Pipeline::run(const PrefillJob& job_in) {
  PrefillJob job = job_in;
  if (job.bounds.empty()) job.bounds = fixed_ubatches(job.n, ubatch_);
  if (job.bounds.size() < 2 || job.bounds.front() != 0 || job.bounds.back() != job.n)
    fail(TP_ERR_INTERNAL, "ubatch plan does not cover the %lld tokens", (long long)job.n);
  for (size_t m = 0; m + 1 < job.bounds.size(); ++m)
    if (job.bounds[m + 1] <= job.bounds[m] || job.bounds[m + 1] - job.bounds[m] > ubatch_)
      fail(TP_ERR_INTERNAL, "ubatch %d of the plan has %lld tokens; buffers hold 1..%lld", int(m),
           (long long)(job.bounds[m + 1] - job.bounds[m]), (long long)ubatch_);
  // Position ids regrouped so that each ubatch's are one contiguous [4, nt] block: one copy per stage and ubatch.
  std::vector<int32_t> ub_pos;
  if (job.pos) {
    ub_pos.resize(size_t(4 * job.n));
    for (size_t m = 0; m + 1 < job.bounds.size(); ++m) {
      const int64_t b = job.bounds[m], nt = job.bounds[m + 1] - b;
      for (int64_t sec = 0; sec < 4; ++sec)
        std::copy_n(job.pos + sec * job.n + b, nt, ub_pos.begin() + 4 * b + sec * nt);
    }
  }
  stop_.store(false);
  cancelled_.store(false);
  for (auto& r : rings_)
    if (r) r->clear();
  credit_->clear();

  const int P = int(stages_.size());
  std::vector<std::vector<TraceEvent>> traces(static_cast<size_t>(P));
  std::mutex err_mu;
  bool have_error = false;
  tp_status err_status = TP_OK;
  std::string err_msg;
  const double t0 = now_seconds();

  auto body = [&](int s) {
    try {
      stage_loop(s, job, ub_pos.empty() ? nullptr : ub_pos.data(), t0, traces[size_t(s)]);
    } catch (...) {
      tp_status status = TP_ERR_INTERNAL;
      std::string msg;
      try {
        throw;
      } catch (const Error& e) {
        status = e.status();
        msg = e.what();
      } catch (const std::bad_alloc&) {
        status = TP_ERR_OUT_OF_MEMORY;
        msg = "out of memory";
      } catch (const std::exception& e) {
        msg = std::string("internal error: ") + e.what();
      }
      const Stage& st = *stages_[size_t(s)];
      {
        std::lock_guard<std::mutex> lk(err_mu);
        // Stages stopped by another stage's failure report TP_ERR_CANCELLED; keep the root cause.
        if (!have_error || (err_status == TP_ERR_CANCELLED && status != TP_ERR_CANCELLED)) {
          have_error = true;
          err_status = status;
          err_msg = st.current_layer >= 0
                        ? fmt("stage %d (%s, layers %lld-%lld), layer %lld: %s", s, st.device.c_str(),
                              (long long)st.layer_begin, (long long)st.layer_end - 1, (long long)st.current_layer,
                              msg.c_str())
                        : fmt("stage %d (%s): %s", s, st.device.c_str(), msg.c_str());
        }
      }
      stop_.store(true);
      for (auto& r : rings_)
        if (r) r->wake_all();
      credit_->wake_all();
    }
  };

  if (P == 1) {
    body(0);
  } else {
    std::vector<std::thread> threads;
    threads.reserve(size_t(P));
    for (int s = 0; s < P; ++s) threads.emplace_back(body, s);
    for (auto& t : threads) t.join();
  }
  if (cancelled_.load()) fail(TP_ERR_CANCELLED, "prefill cancelled");
  if (have_error) throw Error(err_status, err_msg);
  if (stop_.load()) fail(TP_ERR_INTERNAL, "pipeline stopped without an error");

  std::vector<TraceEvent> all;
  for (auto& t : traces) all.insert(all.end(), t.begin(), t.end());
  std::sort(all.begin(), all.end(), [](const TraceEvent& a, const TraceEvent& b) {
    return a.ubatch != b.ubatch ? a.ubatch < b.ubatch : a.stage < b.stage;
  });
  return all;
}

}  // namespace tp
