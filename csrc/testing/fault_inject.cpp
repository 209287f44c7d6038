// fault_inject.cpp — the armed faults and their C entry points (see fault_inject.h).
#include "testing/fault_inject.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <new>

namespace tp {

namespace {

constexpr int kKinds = 2;  // tp_alloc_kind values
std::atomic<int64_t> g_countdown[kKinds];  // the armed allocation is the one that takes it from 1 to 0

std::atomic<bool> g_truncate_armed{false};
std::mutex g_truncate_mu;
std::string g_truncate_path;  // under g_truncate_mu
int64_t g_truncate_size = 0;

}  // namespace

void alloc_fault_point(tp_alloc_kind kind) {
  std::atomic<int64_t>& c = g_countdown[int(kind)];
  int64_t r = c.load(std::memory_order_relaxed);
  while (r > 0 && !c.compare_exchange_weak(r, r - 1, std::memory_order_relaxed)) {
  }
  if (r == 1) throw std::bad_alloc();
}

void truncate_fault_point(const std::string& path) {
  if (!g_truncate_armed.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lk(g_truncate_mu);
  if (!g_truncate_armed.load() || path != g_truncate_path) return;
  g_truncate_armed.store(false);
  if (::truncate(path.c_str(), off_t(g_truncate_size)) != 0)
    fail(TP_ERR_IO, "tp_test_truncate_after_check: cannot truncate %s: %s", path.c_str(), std::strerror(errno));
}

}  // namespace tp

extern "C" {

tp_status tp_test_fail_alloc(int32_t kind, int64_t n) {
  if (kind < 0 || kind >= tp::kKinds || n < 0) {
    tp::set_last_error(tp::fmt("tp_test_fail_alloc: kind %d (expected 0..%d) or n %lld < 0", kind, tp::kKinds - 1,
                               (long long)n));
    return TP_ERR_INVALID_ARGUMENT;
  }
  tp::g_countdown[kind].store(n);
  tp::set_last_error("");
  return TP_OK;
}

tp_status tp_test_truncate_after_check(const char* path, int64_t size) {
  if (size < 0) {
    tp::set_last_error("tp_test_truncate_after_check: size < 0");
    return TP_ERR_INVALID_ARGUMENT;
  }
  std::lock_guard<std::mutex> lk(tp::g_truncate_mu);
  tp::g_truncate_path = path ? path : "";
  tp::g_truncate_size = size;
  tp::g_truncate_armed.store(path != nullptr);
  tp::set_last_error("");
  return TP_OK;
}

}  // extern "C"
