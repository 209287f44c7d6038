// ring_stress.h — a self-checking stress run of SpscRing, shared by the C ABI (pytest) and the standalone
// ThreadSanitizer binary (tests/cpp/ring_stress_main.cpp).
#pragma once

#include <cstdint>

namespace tp {

// Hands n_items sequence numbers from a producer thread to a consumer thread through a ring of
// `capacity` slots, with random delays of up to max_delay_ns on both sides (and an occasional yield).
// Each slot carries a payload written by the producer and checked by the consumer. Returns the number of
// errors seen (out-of-order, lost or corrupted items); 0 means the hand-off is correct.
int64_t ring_stress(int capacity, int64_t n_items, int64_t max_delay_ns, uint64_t seed);

}  // namespace tp
