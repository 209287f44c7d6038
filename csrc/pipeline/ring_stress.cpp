// ring_stress.cpp — see ring_stress.h.
#include "pipeline/ring_stress.h"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "pipeline/ring.h"

namespace tp {

namespace {

struct Rng {  // xorshift64*: cheap, per thread
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
};

void random_delay(Rng& r, int64_t max_ns) {
  if (max_ns <= 0) return;
  const uint64_t x = r.next();
  if (x % 64 == 0) {
    std::this_thread::yield();
    return;
  }
  const int64_t ns = int64_t(x % uint64_t(max_ns));
  const auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(ns);
  while (std::chrono::steady_clock::now() < end) {
  }
}

}  // namespace

int64_t ring_stress(int capacity, int64_t n_items, int64_t max_delay_ns, uint64_t seed) {
  std::atomic<bool> stop{false};
  SpscRing ring(capacity, &stop);
  constexpr int kPayload = 16;
  std::vector<std::vector<int64_t>> payload(size_t(ring.capacity()), std::vector<int64_t>(kPayload));
  int64_t errors = 0;

  std::thread producer([&] {
    Rng r{seed * 2 + 1};
    for (int64_t i = 0; i < n_items; ++i) {
      const int s = ring.acquire_free();
      if (s < 0) return;
      for (int k = 0; k < kPayload; ++k) payload[size_t(s)][size_t(k)] = i * kPayload + k;
      ring.slot(s).ubatch = i;
      random_delay(r, max_delay_ns);
      ring.publish();
    }
  });
  Rng r{seed * 2 + 7};
  for (int64_t i = 0; i < n_items; ++i) {
    const int s = ring.acquire_filled();
    if (s < 0) {
      ++errors;
      break;
    }
    if (ring.slot(s).ubatch != i) ++errors;
    for (int k = 0; k < kPayload; ++k)
      if (payload[size_t(s)][size_t(k)] != i * kPayload + k) ++errors;
    random_delay(r, max_delay_ns);
    ring.release();
  }
  producer.join();
  return errors;
}

}  // namespace tp
