// map_guard.cpp — the registry of guarded mappings and the SIGBUS handler (see map_guard.h).
//
// The handler may run on any thread at any instruction, so it touches only lock-free atomics, a table that
// never moves (a fixed array) and system calls: sigaction and raise are async-signal-safe by POSIX; mmap is
// not on POSIX's list, but on Linux glibc's mmap is a bare system call (no lock, no allocation, only errno,
// which the handler saves and restores), so calling it from a handler is safe there. Writers (add/remove)
// serialize on a mutex the handler never takes; a slot is published by storing its begin address last
// (release), and the handler reads begin first (acquire).
#include "gguf/map_guard.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "common.h"

namespace tp {

namespace {

struct Slot {
  std::atomic<uintptr_t> begin{0};  // 0: free
  std::atomic<uintptr_t> end{0};    // page-rounded: the last partial page's tail faults like the rest
  std::atomic<MapFaultFlag*> flag{nullptr};
};

Slot g_slots[kMaxGuardedMaps];
std::atomic<int> g_used{0};  // slots [0, g_used) have been handed out at least once
std::mutex g_mu;
bool g_installed = false;    // under g_mu
struct sigaction g_prev;     // written once, before our handler is installed
uintptr_t g_page = 4096;

// Hands a SIGBUS that is not ours to whoever would have had it without us.
void chain(int sig, siginfo_t* info, void* uctx) {
  if (g_prev.sa_flags & SA_SIGINFO) {
    g_prev.sa_sigaction(sig, info, uctx);
    return;
  }
  if (g_prev.sa_handler != SIG_DFL && g_prev.sa_handler != SIG_IGN) {
    g_prev.sa_handler(sig);
    return;
  }
  // Default action (SIG_IGN is no option for a fault: the access would fault forever). A fault re-executes
  // the access on return and dies of it, with the usual exit status and core; a sent signal is raised again.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  sigaction(sig, &dfl, nullptr);
  if (info->si_code <= 0) raise(sig);
}

void on_sigbus(int sig, siginfo_t* info, void* uctx) {
  const int saved_errno = errno;
  const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
  // BUS_ADRERR is what a read of a file page past the end of the file raises; other codes are not ours.
  if (info->si_code == BUS_ADRERR) {
    const int used = g_used.load(std::memory_order_acquire);
    for (int i = 0; i < used; ++i) {
      const uintptr_t b = g_slots[i].begin.load(std::memory_order_acquire);
      if (b == 0 || a < b) continue;
      const uintptr_t e = g_slots[i].end.load(std::memory_order_relaxed);
      if (a >= e) continue;
      // Every page from here to the end lies past the file's end too: one mapping of zeros serves all
      // the reads that would fault after this one (the run's results are discarded anyway).
      const uintptr_t page = a & ~(g_page - 1);
      void* p = mmap(reinterpret_cast<void*>(page), e - page, PROT_READ, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
      if (p == MAP_FAILED) break;  // no memory for the zeros: die as we would have without the guard
      uint64_t none = 0;
      g_slots[i].flag.load(std::memory_order_relaxed)->compare_exchange_strong(none, 1 + uint64_t(a - b));
      errno = saved_errno;
      return;
    }
  }
  errno = saved_errno;
  chain(sig, info, uctx);
}

}  // namespace

int map_guard_add(const void* base, size_t len, MapFaultFlag* flag) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (!g_installed) {
    const long page = sysconf(_SC_PAGESIZE);
    if (page > 0) g_page = uintptr_t(page);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    if (sigaction(SIGBUS, &sa, &g_prev) != 0)
      fail(TP_ERR_IO, "cannot install the SIGBUS handler that guards model mappings: %s", std::strerror(errno));
    g_installed = true;
  }
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  const uintptr_t e = (b + len + g_page - 1) & ~(g_page - 1);
  for (int i = 0; i < kMaxGuardedMaps; ++i) {
    Slot& s = g_slots[i];
    if (s.begin.load(std::memory_order_relaxed) != 0) continue;
    if (i >= g_used.load(std::memory_order_relaxed)) g_used.store(i + 1, std::memory_order_release);
    s.end.store(e, std::memory_order_relaxed);
    s.flag.store(flag, std::memory_order_relaxed);
    s.begin.store(b, std::memory_order_release);
    return i;
  }
  fail(TP_ERR_IO, "more than %d model files are mapped at once; free some engines or vision encoders",
       kMaxGuardedMaps);
}

void map_guard_remove(int slot) {
  if (slot < 0 || slot >= kMaxGuardedMaps) return;
  std::lock_guard<std::mutex> lk(g_mu);
  g_slots[slot].begin.store(0, std::memory_order_release);
}

}  // namespace tp
