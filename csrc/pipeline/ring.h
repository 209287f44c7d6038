// ring.h — lock-free single-producer/single-consumer ring of activation slots between two stages.
//
// head_ counts slots published by the producer, tail_ slots released by the consumer; each side writes
// only its own counter (release) and reads the other's (acquire), so the fast path takes no lock. A side
// that finds nothing to do spins briefly, then parks on a condition variable; the other side takes the
// mutex only when it sees a parked waiter (Dekker-style seq_cst flag/counter pair, so no wake-up is lost).
// A shared stop flag (error or cancellation) wakes and releases every waiter.
//
// Slots carry the ubatch's metadata and two opaque event handles for the device hand-off (DESIGN §5):
// `filled` is recorded by the producer after its copy into the slot, `free` by the consumer after its last
// read of the slot. On CPU both are null and copies are synchronous.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

namespace tp {

struct RingSlot {
  float* data = nullptr;      // activation buffer on the receiving device: [ubatch, n_embd]
  void* job = nullptr;        // the scheduler's job the ubatch belongs to (pipeline/scheduler.h)
  int64_t ubatch = -1;        // index of the ubatch held
  int64_t row0 = 0;           // its first row in the job
  int64_t n_tok = 0;
  bool last = false;          // the job's last ubatch
  bool skip = false;          // the job failed or was cancelled: no data, the consumer only passes it on
  void* ev_filled = nullptr;  // device event: copy into data complete
  void* ev_free = nullptr;    // device event: consumer done reading data
};

class SpscRing {
 public:
  explicit SpscRing(int capacity, const std::atomic<bool>* stop)
      : slots_(size_t(capacity < 1 ? 1 : capacity)), stop_(stop) {}

  int capacity() const { return int(slots_.size()); }
  RingSlot& slot(int i) { return slots_[size_t(i)]; }

  // Producer: index of a free slot, or -1 when stopped.
  int acquire_free() {
    const uint64_t h = head_.load(std::memory_order_relaxed);
    if (!wait_until([&] { return h - tail_.load(std::memory_order_acquire) < slots_.size(); }, producer_parked_))
      return -1;
    return int(h % slots_.size());
  }
  // Producer: make the slot acquired last visible to the consumer.
  void publish() {
    head_.store(head_.load(std::memory_order_relaxed) + 1, std::memory_order_seq_cst);
    wake(consumer_parked_);
  }
  // Consumer: index of the oldest filled slot, or -1 when stopped.
  int acquire_filled() {
    const uint64_t t = tail_.load(std::memory_order_relaxed);
    if (!wait_until([&] { return head_.load(std::memory_order_acquire) > t; }, consumer_parked_)) return -1;
    return int(t % slots_.size());
  }
  // Consumer: hand the slot acquired last back to the producer.
  void release() {
    tail_.store(tail_.load(std::memory_order_relaxed) + 1, std::memory_order_seq_cst);
    wake(producer_parked_);
  }
  // Wake any parked side (after the stop flag was set).
  void wake_all() {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
  // Forget all hand-offs (between prefills; no thread may be using the ring).
  void clear() {
    head_.store(0);
    tail_.store(0);
  }

 private:
  bool stopped() const { return stop_ && stop_->load(std::memory_order_relaxed); }

  template <typename Ready>
  bool wait_until(Ready ready, std::atomic<bool>& parked) {
    for (int spin = 0; spin < 4000; ++spin) {
      if (ready()) return true;
      if (stopped()) return false;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      parked.store(true, std::memory_order_seq_cst);
      std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with the fence in wake()
      if (ready()) break;
      if (stopped()) {
        parked.store(false, std::memory_order_relaxed);
        return false;
      }
      // The timeout only bounds how long a stop can go unnoticed; wake-ups come from wake().
      cv_.wait_for(lk, std::chrono::milliseconds(50));
    }
    parked.store(false, std::memory_order_relaxed);
    return true;
  }

  void wake(std::atomic<bool>& parked) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (parked.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
  }

  std::vector<RingSlot> slots_;
  const std::atomic<bool>* stop_;
  alignas(64) std::atomic<uint64_t> head_{0};
  alignas(64) std::atomic<uint64_t> tail_{0};
  std::atomic<bool> producer_parked_{false}, consumer_parked_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace tp
