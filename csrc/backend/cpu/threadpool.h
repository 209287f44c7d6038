// threadpool.h — a fixed set of worker threads that run one parallel loop at a time.
//
// Each CPU stage owns one pool; ops call parallel_for many times per ubatch, so dispatch must be cheap:
// workers spin briefly on a generation counter before parking on a condition variable, and work items
// are claimed with an atomic counter (dynamic scheduling evens out uneven rows).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tp {

class ThreadPool {
 public:
  // n_threads >= 1; the calling thread works too, so n_threads - 1 workers are started.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(begin, end, thread_index) over [0, n) in chunks of `grain` items; returns when all are done.
  // The first exception thrown by fn is rethrown here (remaining chunks are skipped).
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn);

 private:
  void worker(int index);
  void run_chunks(int index);

  int n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0};  // workers still inside the current loop
  std::atomic<bool> stop_{false};

  // The current loop (valid while active_ > 0 or the caller is inside parallel_for).
  const std::function<void(int64_t, int64_t, int)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  std::mutex error_mu_;
};

}  // namespace tp
