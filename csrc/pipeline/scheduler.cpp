// scheduler.cpp — the stage threads, the job queue and the ring hand-offs (see scheduler.h, DESIGN §5, §8).
#include "pipeline/scheduler.h"

#include <algorithm>
#include <chrono>

#include "common.h"
#include "pipeline/plan.h"

namespace tp {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void* mark(Ops& ops) {
  void* t = ops.timer_create();
  ops.timer_record(t);
  return t;
}

// Stage s's message for the error being handled (call inside catch): status and "stage s (device, layers
// a-b), layer l: what", or "stage s (device): what" outside the layers.
std::pair<tp_status, std::string> stage_error(const Stage& st) {
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
  if (st.current_layer >= 0)
    return {status, fmt("stage %d (%s, layers %lld-%lld), layer %lld: %s", st.index, st.device.c_str(),
                        (long long)st.layer_begin, (long long)st.layer_end - 1, (long long)st.current_layer,
                        msg.c_str())};
  return {status, fmt("stage %d (%s): %s", st.index, st.device.c_str(), msg.c_str())};
}

}  // namespace

Pipeline::Pipeline(std::vector<std::unique_ptr<Stage>>& stages, const ModelConfig& c, const ModelWeights& w,
                   int64_t ubatch, int ring_slots, Schedule schedule)
    : stages_(stages), cfg_(c), w_(w), ubatch_(ubatch),
      sequential_(schedule == Schedule::Sequential && stages.size() > 1),
      in_stage_(new std::atomic<int>[stages.size()]) {
  for (size_t s = 0; s < stages.size(); ++s) in_stage_[s].store(0);
  const int R = ring_slots > 0 ? ring_slots : kDefaultRingSlots;
  rings_.resize(stages.size());
  for (size_t s = 1; s < stages.size(); ++s) {
    rings_[s] = std::make_unique<SpscRing>(R, &shutdown_);
    for (int i = 0; i < R; ++i) {
      RingSlot& slot = rings_[s]->slot(i);
      slot.data = stages[s]->ops->alloc(ubatch * c.n_embd);
      slot.ev_filled = stages[s]->ops->event_create();
      slot.ev_free = stages[s]->ops->event_create();
    }
  }
  credit_ = std::make_unique<SpscRing>(1, &shutdown_);
  credit_->slot(0).ev_filled = stages.back()->ops->event_create();
  // The first ubatch needs no finished predecessor: one credit to start with (its event is never recorded,
  // so waiting on it waits for nothing).
  credit_->acquire_free();
  credit_->publish();
  threads_.emplace_back([this] { first_loop(); });
  for (size_t s = 1; s < stages.size(); ++s) threads_.emplace_back([this, s] { stage_loop(int(s)); });
}

Pipeline::~Pipeline() {
  {
    std::lock_guard<std::mutex> lk(qmu_);
    shutdown_.store(true);
  }
  qcv_.notify_all();
  for (auto& r : rings_)
    if (r) r->wake_all();
  credit_->wake_all();
  for (auto& t : threads_) t.join();
  stages_.back()->ops->event_destroy(credit_->slot(0).ev_filled);
  for (size_t s = 1; s < rings_.size(); ++s) {
    for (int i = 0; i < rings_[s]->capacity(); ++i) {
      stages_[s]->ops->event_destroy(rings_[s]->slot(i).ev_filled);
      stages_[s]->ops->event_destroy(rings_[s]->slot(i).ev_free);
    }
  }
}

void Pipeline::cancel() { cancel_where([](const Job&) { return true; }); }

void Pipeline::cancel_seq(int32_t seq) {
  cancel_where([seq](const Job& job) { return !job.is_decode() && job.seq == seq; });
}

template <class Pred>
void Pipeline::cancel_where(Pred pred) {
  {
    std::lock_guard<std::mutex> lk(qmu_);
    for (Job* job : active_) {
      if (!pred(*job)) continue;
      std::lock_guard<std::mutex> jl(job->mu);
      if (job->status == TP_OK) {
        job->status = TP_ERR_CANCELLED;
        job->message = job->is_decode() ? "decode cancelled" : "prefill cancelled";
      }
      job->stop.store(true);
    }
  }
  qcv_.notify_all();
}

void Pipeline::close_locked(Job& job) {
  job.closed = true;
  if (job.retired == job.issued && !job.done) {
    job.done = true;
    job.cv.notify_all();
  }
}

void Pipeline::drop_stopped_locked() {
  for (std::deque<Job*>* q : {&decode_q_, &prefill_q_}) {
    for (auto it = q->begin(); it != q->end();) {
      if (!(*it)->stop.load()) {
        ++it;
        continue;
      }
      std::lock_guard<std::mutex> jl((*it)->mu);
      close_locked(**it);
      it = q->erase(it);
    }
  }
}

UbatchRef Pipeline::issue_locked(Job& job) {
  UbatchRef u;
  u.m = job.next_ub++;
  u.row0 = job.next_row;
  int64_t end = job.bounds[job.next_plan + 1];
  const int64_t lim = limit_.load(std::memory_order_relaxed);
  if (lim > 0 && !job.is_decode() && end - u.row0 > lim) end = u.row0 + lim;
  if (end == job.bounds[job.next_plan + 1]) ++job.next_plan;
  job.next_row = end;
  u.n_tok = end - u.row0;
  u.last = end == job.n;
  return u;
}

void Pipeline::regroup_pos(Job& job, const UbatchRef& u) {
  if (job.ub_pos.empty()) return;
  for (int64_t sec = 0; sec < 4; ++sec)
    std::copy_n(job.pos + sec * job.n + u.row0, u.n_tok, job.ub_pos.begin() + 4 * u.row0 + sec * u.n_tok);
}

void Pipeline::first_loop() {
  Stage& st = *stages_[0];
  bool have_credit = !sequential_;  // pipelined: never waits for one
  for (;;) {
    Job* job = nullptr;
    UbatchRef u;
    {
      std::unique_lock<std::mutex> lk(qmu_);
      for (;;) {
        if (shutdown_.load()) return;
        drop_stopped_locked();
        if (!decode_q_.empty() || !prefill_q_.empty()) break;
        qcv_.wait(lk);
      }
      // Picked only once the credit is held, so that a decode queued while we waited for it goes first.
      if (have_credit) {
        std::deque<Job*>& q = decode_q_.empty() ? prefill_q_ : decode_q_;
        job = q.front();
        u = issue_locked(*job);
        std::lock_guard<std::mutex> jl(job->mu);
        ++job->issued;
        if (u.last) {
          q.pop_front();
          close_locked(*job);
        }
      }
    }
    if (!job) {  // sequential: wait until the previous ubatch has left the last stage
      const int c = credit_->acquire_filled();
      if (c < 0) return;
      st.ops->event_wait(credit_->slot(c).ev_filled);  // on a GPU: after the last stage's kernels, not its host
      credit_->release();
      have_credit = true;
      continue;
    }
    if (sequential_) have_credit = false;
    regroup_pos(*job, u);  // only this thread writes ub_pos; later stages see it through the ring hand-off
    in_stage_[0].fetch_add(1, std::memory_order_relaxed);
    if (!process(0, *job, u, false)) return;
  }
}

void Pipeline::stage_loop(int s) {
  Stage& st = *stages_[size_t(s)];
  SpscRing& in = *rings_[size_t(s)];
  for (;;) {
    const int i = in.acquire_filled();
    if (i < 0) return;
    RingSlot& slot = in.slot(i);
    Job& job = *static_cast<Job*>(slot.job);
    UbatchRef u;
    u.m = slot.ubatch;
    u.row0 = slot.row0;
    u.n_tok = slot.n_tok;
    u.last = slot.last;
    const bool skip = slot.skip || job.stop.load();
    if (!skip) {
      st.ops->event_wait(slot.ev_filled);
      st.ops->copy(st.x, slot.data, slot.n_tok * cfg_.n_embd);
      st.ops->event_record(slot.ev_free);
    }
    in.release();
    if (!process(s, job, u, skip)) return;
  }
}

void Pipeline::compute(int s, Job& job, const UbatchRef& u) {
  Stage& st = *stages_[size_t(s)];
  const bool first = s == 0, last = s + 1 == int(stages_.size());
  const int64_t m = u.m, b = u.row0, nt = u.n_tok;
  Job::StageSteps& ss = job.stages[size_t(s)];
  if (m == 0) {
    // The job's slots grow here, on the stage's own thread, so that a stage's Ops is only ever driven by it.
    auto reserve = [&](int32_t seq, int64_t n_pos) {
      try {
        st.ops->kv_reserve(seq, st.n_layers(), cfg_.kv_dim(), n_pos);
      } catch (const std::bad_alloc&) {
        fail(TP_ERR_OUT_OF_MEMORY, "out of memory growing the KV cache to %lld positions (%.1f MiB)",
             (long long)n_pos, double(2 * st.n_layers() * cfg_.kv_dim() * n_pos * 4) / (1 << 20));
      }
    };
    if (job.is_decode())
      for (const KvRow& r : job.rows) reserve(r.seq, r.pos + 1);
    else
      reserve(job.seq, job.pos0 + job.n);
  }
  // Step times come from the backend's timers (GPU events on cuda), placed on the host clock through an
  // origin mark taken at the job's first step here; they are read at the job's last step (read_timers).
  if (!ss.origin) {
    ss.origin = mark(*st.ops);
    ss.origin_host = now_seconds() - job.t0;
  }
  ss.steps.push_back({m, nt, mark(*st.ops), nullptr});
  UbatchInput ub;
  ub.tokens = job.tokens + b;
  ub.embd = job.embd;
  ub.pos = job.ub_pos.empty() ? nullptr : job.ub_pos.data() + 4 * b;
  if (job.is_decode()) {
    ub.kv.rows = job.rows.data() + b;
  } else {
    ub.kv.seq = job.seq;
    ub.kv.pos0 = job.pos0 + b;
  }
  ub.n_tok = nt;
  st.compute(cfg_, w_, first, last, ub, job.all_logits, u.last, job.stop);
  if (last && job.logits && (job.all_logits || u.last)) {
    const int64_t rows = job.all_logits ? nt : 1;
    st.ops->to_host(job.logits + (job.all_logits ? b * cfg_.n_vocab : 0), st.logits, rows * cfg_.n_vocab);
  }
  ss.steps.back().end = mark(*st.ops);
  const Ops::RouterStats r = st.ops->take_router_stats();
  ss.router = r.calls < 0 || ss.router.calls < 0 ? Ops::RouterStats{-1, -1}
                                                 : Ops::RouterStats{ss.router.calls + r.calls,
                                                                    ss.router.experts + r.experts};
}

void Pipeline::read_timers(int s, Job& job) {
  Ops& ops = *stages_[size_t(s)]->ops;
  Job::StageSteps& ss = job.stages[size_t(s)];
  // Wait once, for the last finished step, so reading the others never waits again.
  for (auto it = ss.steps.rbegin(); it != ss.steps.rend(); ++it)
    if (it->end) {
      ops.timer_seconds(ss.origin, it->end);
      break;
    }
  for (const Job::Step& step : ss.steps) {
    if (step.end) {
      TraceEvent ev;
      ev.stage = s;
      ev.ubatch = int(step.ubatch);
      ev.n_tokens = step.n_tok;
      ev.t_start = ss.origin_host + ops.timer_seconds(ss.origin, step.start);
      ev.t_end = ss.origin_host + ops.timer_seconds(ss.origin, step.end);
      ss.trace.push_back(ev);
    }
    ops.timer_destroy(step.start);
    ops.timer_destroy(step.end);
  }
  ss.steps.clear();
  ops.timer_destroy(ss.origin);
  ss.origin = nullptr;
}

bool Pipeline::process(int s, Job& job, const UbatchRef& u, bool skip) {
  Stage& st = *stages_[size_t(s)];
  const bool last = s + 1 == int(stages_.size());
  const int64_t nt = u.n_tok;
  if (!skip && job.stop.load()) skip = true;
  if (!skip) {
    try {
      compute(s, job, u);
    } catch (...) {
      const std::pair<tp_status, std::string> e = stage_error(st);
      {
        std::lock_guard<std::mutex> jl(job.mu);
        // A stage stopped by another stage's failure (or by cancel) reports TP_ERR_CANCELLED: keep the cause.
        if (job.status == TP_OK) {
          job.status = e.first;
          job.message = e.second;
        }
      }
      job.stop.store(true);
      st.current_layer = -1;
      skip = true;
    }
  }
  if (u.last || skip) read_timers(s, job);

  if (!last) {
    SpscRing& out = *rings_[size_t(s) + 1];
    const int j = out.acquire_free();
    if (j < 0) return false;
    RingSlot& slot = out.slot(j);
    if (!skip) {
      Ops& dst = *stages_[size_t(s) + 1]->ops;
      st.ops->event_wait(slot.ev_free);  // our copy must not overwrite data the consumer still reads
      st.ops->send(slot.data, dst, st.x, nt * cfg_.n_embd);
      st.ops->event_record(slot.ev_filled);
    }
    slot.job = &job;
    slot.ubatch = u.m;
    slot.row0 = u.row0;
    slot.n_tok = nt;
    slot.last = u.last;
    slot.skip = skip;
    in_stage_[size_t(s) + 1].fetch_add(1, std::memory_order_relaxed);  // before the next stage can take it
    out.publish();
    in_stage_[size_t(s)].fetch_sub(1, std::memory_order_relaxed);
    return true;
  }
  in_stage_[size_t(s)].fetch_sub(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> jl(job.mu);  // after this the caller may return: `job` is not touched again
    ++job.retired;
    if (job.closed && job.retired == job.issued && !job.done) {
      job.done = true;
      job.cv.notify_all();
    }
  }
  if (sequential_) {
    const int c = credit_->acquire_free();
    if (c < 0) return false;
    st.ops->event_record(credit_->slot(c).ev_filled);
    credit_->publish();
  }
  return true;
}

std::vector<TraceEvent> Pipeline::run(Job& job) {
  if (job.bounds.empty()) job.bounds = fixed_ubatches(job.n, ubatch_);
  if (job.bounds.size() < 2 || job.bounds.front() != 0 || job.bounds.back() != job.n)
    fail(TP_ERR_INTERNAL, "ubatch plan does not cover the %lld tokens", (long long)job.n);
  for (size_t m = 0; m + 1 < job.bounds.size(); ++m)
    if (job.bounds[m + 1] <= job.bounds[m] || job.bounds[m + 1] - job.bounds[m] > ubatch_)
      fail(TP_ERR_INTERNAL, "ubatch %d of the plan has %lld tokens; buffers hold 1..%lld", int(m),
           (long long)(job.bounds[m + 1] - job.bounds[m]), (long long)ubatch_);
  // Position ids are regrouped as each ubatch is issued (regroup_pos), into one contiguous [4, nt] block per
  // ubatch: one copy per stage and ubatch.
  if (job.pos) job.ub_pos.resize(size_t(4 * job.n));
  job.stages.assign(stages_.size(), {});
  job.t0 = now_seconds();
  {
    std::lock_guard<std::mutex> lk(qmu_);
    (job.is_decode() ? decode_q_ : prefill_q_).push_back(&job);
    active_.push_back(&job);
  }
  qcv_.notify_all();
  {
    std::unique_lock<std::mutex> lk(job.mu);
    job.cv.wait(lk, [&] { return job.done; });
  }
  {
    std::lock_guard<std::mutex> lk(qmu_);
    active_.remove(&job);
  }
  std::vector<TraceEvent> all;
  job.router = {0, 0};
  for (size_t s = 0; s < job.stages.size(); ++s) {
    Job::StageSteps& ss = job.stages[s];
    // A job stopped after a stage's last step of it leaves that stage's timers unread: drop them here.
    Ops& ops = *stages_[s]->ops;
    for (const Job::Step& step : ss.steps) {
      ops.timer_destroy(step.start);
      ops.timer_destroy(step.end);
    }
    ops.timer_destroy(ss.origin);
    all.insert(all.end(), ss.trace.begin(), ss.trace.end());
    const Ops::RouterStats r = ss.router;
    job.router = r.calls < 0 || job.router.calls < 0 ? Ops::RouterStats{-1, -1}
                                                     : Ops::RouterStats{job.router.calls + r.calls,
                                                                        job.router.experts + r.experts};
  }
  if (job.status != TP_OK) throw Error(job.status, job.message);
  std::sort(all.begin(), all.end(), [](const TraceEvent& a, const TraceEvent& b) {
    return a.ubatch != b.ubatch ? a.ubatch < b.ubatch : a.stage < b.stage;
  });
  return all;
}

}  // namespace tp
