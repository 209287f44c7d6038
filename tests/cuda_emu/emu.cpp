// emu.cpp — the CUDA emulation's scheduler and runtime (see emu.h for what is modelled and checked).
//
// Structure:
//   fibers   — a CTA's threads as fibers on the calling worker thread (a register-saving stack switch on
//              x86-64, ucontext elsewhere), switched round-robin
//              whenever one waits at a barrier (__syncthreads, or a warp exchange for shuffles and mma);
//   streams  — a worker thread per stream running queued operations in order (kernels, copies, event
//              records and waits); the host thread only enqueues, as with the real runtime;
//   runtime  — the cuda* functions the backend calls, over host memory, with per-device accounting.
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace tp_emu {

thread_local ThreadCtx* t_ctx = nullptr;

void die(const char* fmt, ...) {
  std::fprintf(stderr, "tp cuda emulation: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

namespace {

int env_int(const char* name, int def) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : def;
}

// ---- fibers ----------------------------------------------------------------------------------------------

constexpr size_t kStackBytes = 256 * 1024;

// A suspended execution context. On x86-64 a fiber switch saves the callee-saved registers and the
// MXCSR/x87 control words on the old stack and swaps stack pointers: no system call, unlike swapcontext
// (which saves the signal mask), and fiber switches are most of the emulation's cost.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

extern "C" void tp_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl tp_emu_switch
  .hidden tp_emu_switch
  .type tp_emu_switch, @function
tp_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tp_emu_switch, .-tp_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

void switch_context(Context& from, Context& to) { tp_emu_switch(&from.sp, to.sp); }

// A context that starts `entry` (which must never return) on the stack ending at `top`.
void make_context(Context& c, void* top, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  *--sp = 0;                              // entry is "called" with rsp ≡ 8 (mod 16), as after a call
  *--sp = reinterpret_cast<uint64_t>(entry);  // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  *--sp = uint64_t(mxcsr) | (uint64_t(fpcw) << 32);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void make_context(Context& c, void* top, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = static_cast<char*>(top) - kStackBytes;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context uc;
  ThreadCtx ctx;
  bool done = false;
  uint64_t warp_phase = 0;  // warp exchanges this thread has made (selects the double buffer)
};

struct WarpState {
  int live = 0, arrived = 0;
  uint64_t gen = 0;
  uint64_t slots[2][32];
  uint32_t regs[2][32][6];  // mma fragments: A registers then B registers, per lane
};

// The CTA running on this worker thread.
struct Cta {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  Context sched;
  const std::function<void()>* body = nullptr;
  int cur = 0, live = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  bool progress = false;
  unsigned char* smem = nullptr;
  const char* kernel = "";
};

// Stacks for the fibers of this worker thread (mmap'd with a guard page below each, reused across CTAs).
struct StackPool {
  std::vector<void*> stacks;
  ~StackPool() {
    for (void* s : stacks) munmap(s, kStackBytes + size_t(getpagesize()));
  }
  void* get(size_t i) {
    while (stacks.size() <= i) {
      const size_t page = size_t(getpagesize());
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (m == MAP_FAILED) die("cannot map a fiber stack");
      mprotect(m, page, PROT_NONE);
      stacks.push_back(m);
    }
    return static_cast<char*>(stacks[i]) + getpagesize();
  }
};

thread_local Cta* t_cta = nullptr;
thread_local StackPool t_stacks;
thread_local std::vector<unsigned char> t_smem;

Fiber& me() { return t_cta->fibers[size_t(t_cta->cur)]; }

void yield() {
  Cta& c = *t_cta;
  switch_context(c.fibers[size_t(c.cur)].uc, c.sched);
  t_ctx = &c.fibers[size_t(c.cur)].ctx;
}

// Arrive at a barrier of `expected` participants; returns once all have arrived.
void barrier(int& arrived, uint64_t& gen, int expected) {
  if (++arrived >= expected) {
    arrived = 0;
    ++gen;
    t_cta->progress = true;
    return;
  }
  const uint64_t my = gen;
  while (gen == my) yield();
  t_cta->progress = true;
}

WarpState& my_warp_state() { return t_cta->warps[size_t(t_cta->cur / 32)]; }

void fiber_main() {
  Cta& c = *t_cta;
  (*c.body)();
  Fiber& f = c.fibers[size_t(c.cur)];
  f.done = true;
  --c.live;
  WarpState& w = c.warps[size_t(c.cur / 32)];
  --w.live;
  // Threads that have exited no longer count at barriers (as on the hardware); release waiting ones.
  if (c.bar_arrived > 0 && c.bar_arrived >= c.live) {
    c.bar_arrived = 0;
    ++c.bar_gen;
  }
  if (w.arrived > 0 && w.arrived >= w.live) die("%s: a thread exited while its warp waits in a shuffle", c.kernel);
  c.progress = true;
  switch_context(f.uc, c.sched);  // never resumed
  __builtin_unreachable();
}

void run_cta(Cta& c, dim3 grid, dim3 block, uint3 bidx) {
  const int n = int(block.x * block.y * block.z);
  c.fibers.assign(size_t(n), Fiber());
  c.warps.assign(size_t((n + 31) / 32), WarpState());
  for (int i = 0; i < n; ++i) {
    Fiber& f = c.fibers[size_t(i)];
    f.ctx.thread_idx = make_uint3(unsigned(i) % block.x, (unsigned(i) / block.x) % block.y,
                                  unsigned(i) / (block.x * block.y));
    f.ctx.block_idx = bidx;
    f.ctx.block_dim = block;
    f.ctx.grid_dim = grid;
    make_context(f.uc, static_cast<char*>(t_stacks.get(size_t(i))) + kStackBytes, fiber_main);
    ++c.warps[size_t(i / 32)].live;
  }
  c.live = n;
  c.bar_arrived = 0;
  while (c.live > 0) {
    c.progress = false;
    for (int i = 0; i < n; ++i) {
      if (c.fibers[size_t(i)].done) continue;
      c.cur = i;
      t_ctx = &c.fibers[size_t(i)].ctx;
      switch_context(c.sched, c.fibers[size_t(i)].uc);
    }
    if (!c.progress && c.live > 0)
      die("%s: deadlock in block (%u,%u,%u): %d of %d threads wait at a barrier the others never reach", c.kernel,
          bidx.x, bidx.y, bidx.z, c.live, n);
  }
  t_ctx = nullptr;
}

}  // namespace

void syncthreads() {
  Cta& c = *t_cta;
  barrier(c.bar_arrived, c.bar_gen, c.live);
}

void syncwarp() {
  WarpState& w = my_warp_state();
  barrier(w.arrived, w.gen, w.live);
}

uint64_t exchange(uint64_t v, int src) {
  WarpState& w = my_warp_state();
  if (w.live != 32) die("%s: a warp shuffle with %d of 32 lanes alive", t_cta->kernel, w.live);
  const int buf = int(me().warp_phase++ & 1), lane = t_cta->cur % 32;
  w.slots[buf][lane] = v;
  barrier(w.arrived, w.gen, w.live);
  return w.slots[buf][src];
}

unsigned char* dynamic_smem() { return t_cta->smem; }

namespace {

// Publishes this lane's fragment registers and returns the warp's, after a warp barrier.
const uint32_t (*gather(const uint32_t* regs, int n))[6] {
  WarpState& w = my_warp_state();
  if (w.live != 32) die("%s: mma.sync with %d of 32 lanes alive", t_cta->kernel, w.live);
  const int buf = int(me().warp_phase++ & 1), lane = t_cta->cur % 32;
  for (int i = 0; i < n; ++i) w.regs[buf][lane][i] = regs[i];
  barrier(w.arrived, w.gen, w.live);
  return w.regs[buf];
}

float f16(uint32_t reg, int half) {
  return __half2float(__ushort_as_half((unsigned short)(half ? reg >> 16 : reg & 0xffffu)));
}

}  // namespace

// PTX ISA, "Matrix fragments for mma.m16n8k32" (.s8), with lane = 4·g + t. A (16×32, row major): registers
// a0..a3 hold 4 consecutive k each, the lowest k in the lowest byte: a0 (row g, k 4t..4t+3), a1 (row g+8,
// same k), a2 (row g, k 16+4t..), a3 (row g+8, k 16+4t..). B (32×8, column major): b0 (k 4t..4t+3, col g),
// b1 (k 16+4t.., col g). C/D (16×8 s32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
// So element (row, col) of C sums, over the four lanes u = 0..3 of each quad, A's register of lane
// 4·(row mod 8) + u (a0/a2 for row < 8, a1/a3 otherwise) against B's register of lane 4·col + u.
void mma_s8_m16n8k32(int (&c)[4], const int (&a)[4], int b0, int b1) {
  const uint32_t mine[6] = {uint32_t(a[0]), uint32_t(a[1]), uint32_t(a[2]), uint32_t(a[3]), uint32_t(b0),
                            uint32_t(b1)};
  const uint32_t(*r)[6] = gather(mine, 6);
  const int lane = t_cta->cur % 32, g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int hi = e >> 1, col = 2 * t + (e & 1);
    int acc = 0;
    for (int u = 0; u < 4; ++u) {
      acc = __dp4a(int(r[4 * g + u][hi]), int(r[4 * col + u][4]), acc);          // k = 4u..4u+3
      acc = __dp4a(int(r[4 * g + u][2 + hi]), int(r[4 * col + u][5]), acc);      // k = 16+4u..
    }
    c[e] += acc;
  }
}

// m16n8k16 .s8: A a0 (row g, k 4t..4t+3), a1 (row g+8, same k); B b0 (k 4t..4t+3, col g); C as above.
void mma_s8_m16n8k16(int (&c)[4], int a0, int a1, int b0) {
  const uint32_t mine[3] = {uint32_t(a0), uint32_t(a1), uint32_t(b0)};
  const uint32_t(*r)[6] = gather(mine, 3);
  const int lane = t_cta->cur % 32, g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int hi = e >> 1, col = 2 * t + (e & 1);
    int acc = 0;
    for (int u = 0; u < 4; ++u) acc = __dp4a(int(r[4 * g + u][hi]), int(r[4 * col + u][2]), acc);
    c[e] += acc;
  }
}

// m16n8k16 .f16 → .f32: each register holds two f16, the lower k in the low half. A a0 (row g, k 2t, 2t+1),
// a1 (row g+8, k 2t, 2t+1), a2 (row g, k 2t+8, 2t+9), a3 (row g+8, k 2t+8, 2t+9); B b0 (k 2t, 2t+1, col g),
// b1 (k 2t+8, 2t+9, col g); C as above, f32. The products are exact in f32 (11-bit significands); they are
// summed in float in k order — the hardware's internal accumulation order is not modelled.
void mma_f16_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const uint32_t(*r)[6] = gather(mine, 6);
  const int lane = t_cta->cur % 32, g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int hi = e >> 1, col = 2 * t + (e & 1);
    float acc = 0.f;
    for (int kh = 0; kh < 2; ++kh)  // k 0..7, then k 8..15
      for (int u = 0; u < 4; ++u)
        for (int h = 0; h < 2; ++h)
          acc += f16(r[4 * g + u][2 * kh + hi], h) * f16(r[4 * col + u][4 + kh], h);
    c[e] += acc;
  }
}

}  // namespace tp_emu

// ---- runtime state ---------------------------------------------------------------------------------------

using tp_emu::die;
using tp_emu::env_int;

struct CUevent_st;

// Host calls that had to wait for GPU work still pending (tp_emu_host_waits; see test_cuda_engine.py).
static std::atomic<long long> g_host_waits{0};

struct EventState {
  int device = 0;
  bool timing = true;
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0, completed = 0;
  std::chrono::steady_clock::time_point when{};
};

struct CUevent_st {
  std::shared_ptr<EventState> s;
};

struct CUstream_st {
  int device = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  uint64_t enqueued = 0, finished = 0;
  bool stop = false;
  std::thread worker;

  explicit CUstream_st(int dev) : device(dev) {
    worker = std::thread([this] { run(); });
  }
  ~CUstream_st() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    cv.notify_all();
    worker.join();
  }
  uint64_t push(std::function<void()> op) {
    std::lock_guard<std::mutex> lk(mu);
    queue.push_back(std::move(op));
    cv.notify_all();
    return ++enqueued;
  }
  void wait_for(uint64_t n) {
    std::unique_lock<std::mutex> lk(mu);
    if (finished < n) ++g_host_waits;
    cv.wait(lk, [&] { return finished >= n; });
  }
  void sync() {
    uint64_t n;
    {
      std::lock_guard<std::mutex> lk(mu);
      n = enqueued;
    }
    wait_for(n);
  }
  void run() {
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return stop || !queue.empty(); });
        if (queue.empty()) return;
        op = std::move(queue.front());
        queue.pop_front();
      }
      op();
      {
        std::lock_guard<std::mutex> lk(mu);
        ++finished;
      }
      cv.notify_all();
    }
  }
};

namespace {

struct Alloc {
  size_t bytes;    // as requested: copies and kernel pointers are checked against exactly this range
  size_t charged;  // counted against the device (rounded up to 256 like the real allocator)
  int device;      // -1: pinned host memory
};

struct DeviceState {
  size_t used = 0;
  int kernel_delay_us = 0;
  std::set<int> peers_enabled;  // devices whose memory this one may access
  CUstream_st* null_stream = nullptr;
  std::set<CUstream_st*> streams;
};

struct Runtime {
  std::mutex mu;
  int n_devices, cc_major, cc_minor;
  size_t capacity;
  bool peer;
  std::vector<DeviceState> dev;
  std::map<uintptr_t, Alloc> allocs;
  std::map<const void*, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

  Runtime() {
    n_devices = std::max(0, env_int("TP_EMU_GPUS", 2));
    const char* cc = std::getenv("TP_EMU_CC");
    cc_major = 8, cc_minor = 6;
    if (cc && *cc) std::sscanf(cc, "%d.%d", &cc_major, &cc_minor);
    capacity = size_t(std::max(1, env_int("TP_EMU_GPU_MEM_MIB", 2048))) << 20;
    peer = env_int("TP_EMU_PEER", 1) != 0;
    dev.resize(size_t(n_devices));
    // TP_EMU_SLOW="1:2000": every kernel on cuda:1 takes 2000 µs longer. Unequal stage speeds let a fast
    // producer run ahead of its consumer on the GPU timeline, where a missing "slot free" wait shows.
    if (const char* slow = std::getenv("TP_EMU_SLOW")) {
      for (const char* p = slow; *p;) {
        int d = 0, us = 0, used = 0;
        if (std::sscanf(p, "%d:%d%n", &d, &us, &used) != 2) die("TP_EMU_SLOW: expected device:microseconds[,...]");
        if (d >= 0 && d < n_devices) dev[size_t(d)].kernel_delay_us = us;
        p += used;
        if (*p == ',') ++p;
      }
    }
  }
  size_t smem_optin() const {  // per-block opt-in shared memory of the emulated architecture
    if (cc_major >= 9) return 227 * 1024;
    if (cc_major == 8 && cc_minor == 0) return 163 * 1024;
    if (cc_major == 8) return 99 * 1024;
    return 64 * 1024;
  }
  // The allocation containing [p, p + n), or null.
  const Alloc* find(const void* p, size_t n, uintptr_t* base = nullptr) {
    const uintptr_t a = uintptr_t(p);
    auto it = allocs.upper_bound(a);
    if (it == allocs.begin()) return nullptr;
    --it;
    if (a < it->first || a + n > it->first + it->second.bytes) return nullptr;
    if (base) *base = it->first;
    return &it->second;
  }
};

Runtime& rt() {
  static Runtime* r = new Runtime();  // never destroyed: streams may outlive static destruction order
  return *r;
}

thread_local int t_device = 0;
thread_local cudaError_t t_last_error = cudaSuccess;

cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) t_last_error = e;
  return e;
}

bool valid_device(int d) { return d >= 0 && d < rt().n_devices; }

CUstream_st* resolve(cudaStream_t s) {
  if (s) return s;
  DeviceState& d = rt().dev[size_t(t_device)];
  std::lock_guard<std::mutex> lk(rt().mu);
  if (!d.null_stream) d.null_stream = new CUstream_st(t_device);
  return d.null_stream;
}

bool is_device_or_pinned(const void* p, size_t n) {
  std::lock_guard<std::mutex> lk(rt().mu);
  return rt().find(p, n) != nullptr;
}

// Checks a copy's operands: device operands must lie inside one allocation.
cudaError_t check_copy(void* dst, const void* src, size_t n, cudaMemcpyKind kind, const char* what) {
  if (n == 0) return cudaSuccess;
  if (!dst || !src) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(rt().mu);
  const Alloc* d = rt().find(dst, n);
  const Alloc* s = rt().find(src, n);
  const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (dst_dev && (!d || d->device < 0))
    die("%s: destination %p (+%zu bytes) is not inside one device allocation", what, dst, n);
  if (src_dev && (!s || s->device < 0))
    die("%s: source %p (+%zu bytes) is not inside one device allocation", what, src, n);
  if (!dst_dev && d && d->device >= 0) die("%s: destination %p is device memory but the kind says host", what, dst);
  if (!src_dev && s && s->device >= 0) die("%s: source %p is device memory but the kind says host", what, src);
  return cudaSuccess;
}

}  // namespace

// ---- kernels ----------------------------------------------------------------------------------------------

namespace tp_emu {

cudaError_t enqueue_kernel(const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           const void* const* pointers, int n_pointers, std::function<void()> body) {
  Runtime& r = rt();
  if (!valid_device(t_device)) return set_error(cudaErrorInvalidDevice);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535)
    return set_error(cudaErrorInvalidConfiguration);
  {
    std::lock_guard<std::mutex> lk(r.mu);
    auto it = r.max_dyn_smem.find(func);
    const size_t limit = it != r.max_dyn_smem.end() ? size_t(it->second) : 48 * 1024;
    if (smem > limit) return set_error(cudaErrorInvalidValue);
  }
  CUstream_st* s = resolve(stream);
  if (s->device != t_device) return set_error(cudaErrorInvalidResourceHandle);  // stream of another GPU
  {
    // Pointer arguments must be memory this GPU can read: its own, a peer's it enabled, or pinned host memory.
    std::lock_guard<std::mutex> lk(r.mu);
    for (int i = 0; i < n_pointers; ++i) {
      if (!pointers[i]) continue;
      const Alloc* a = r.find(pointers[i], 1);
      if (!a) die("kernel launch on cuda:%d: pointer argument %d (%p) is not device memory", t_device, i, pointers[i]);
      if (a->device >= 0 && a->device != t_device && !r.dev[size_t(t_device)].peers_enabled.count(a->device))
        die("kernel launch on cuda:%d: pointer argument %d is memory of cuda:%d without peer access", t_device, i,
            a->device);
    }
  }
  auto fn = std::make_shared<std::function<void()>>(std::move(body));
  const int delay_us = r.dev[size_t(t_device)].kernel_delay_us;
  s->push([fn, grid, block, smem, delay_us] {
    if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    Cta c;
    c.body = fn.get();
    c.kernel = "kernel";
    if (t_smem.size() < smem) t_smem.resize(smem);
    c.smem = t_smem.data();
    Cta* saved = t_cta;
    t_cta = &c;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          if (smem) std::memset(c.smem, 0xff, smem);  // NaN: shared memory is never zeroed for a CTA
          run_cta(c, grid, block, make_uint3(x, y, z));
        }
    t_cta = saved;
  });
  return cudaSuccess;
}

}  // namespace tp_emu

// ---- the runtime API ----------------------------------------------------------------------------------------

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorPeerAccessAlreadyEnabled: return "cudaErrorPeerAccessAlreadyEnabled";
    case cudaErrorPeerAccessUnsupported: return "cudaErrorPeerAccessUnsupported";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error (see the name)";
}

cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = rt().n_devices;
  return rt().n_devices > 0 ? cudaSuccess : set_error(cudaErrorNoDevice);
}

cudaError_t cudaSetDevice(int d) {
  if (!valid_device(d)) return set_error(cudaErrorInvalidDevice);
  t_device = d;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = t_device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (!valid_device(d)) return set_error(cudaErrorInvalidDevice);
  std::memset(p, 0, sizeof(*p));
  std::snprintf(p->name, sizeof(p->name), "TurboPrefill emulated GPU (sm_%d%d)", rt().cc_major, rt().cc_minor);
  p->major = rt().cc_major;
  p->minor = rt().cc_minor;
  p->totalGlobalMem = rt().capacity;
  p->multiProcessorCount = 4;
  p->sharedMemPerBlock = 48 * 1024;
  p->sharedMemPerBlockOptin = rt().smem_optin();
  p->maxThreadsPerBlock = 1024;
  p->warpSize = 32;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int d) {
  if (!valid_device(d)) return set_error(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *v = rt().cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = rt().cc_minor; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 4; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(rt().smem_optin()); return cudaSuccess;
    default: return set_error(cudaErrorInvalidValue);
  }
}

cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  std::lock_guard<std::mutex> lk(rt().mu);
  *total_b = rt().capacity;
  *free_b = rt().capacity - rt().dev[size_t(t_device)].used;
  return cudaSuccess;
}

cudaError_t cudaDeviceCanAccessPeer(int* ok, int a, int b) {
  if (!valid_device(a) || !valid_device(b)) return set_error(cudaErrorInvalidDevice);
  *ok = rt().peer && a != b;
  return cudaSuccess;
}

cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned flags) {
  if (!valid_device(peer) || flags) return set_error(cudaErrorInvalidValue);
  if (!rt().peer || peer == t_device) return set_error(cudaErrorPeerAccessUnsupported);
  std::lock_guard<std::mutex> lk(rt().mu);
  if (!rt().dev[size_t(t_device)].peers_enabled.insert(peer).second)
    return set_error(cudaErrorPeerAccessAlreadyEnabled);
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  Runtime& r = rt();
  if (!valid_device(t_device)) return set_error(cudaErrorInvalidDevice);
  const size_t rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  {
    std::lock_guard<std::mutex> lk(r.mu);
    if (r.dev[size_t(t_device)].used + rounded > r.capacity) {
      *p = nullptr;
      return set_error(cudaErrorMemoryAllocation);
    }
    r.dev[size_t(t_device)].used += rounded;
  }
  // Exactly `bytes` (256-byte aligned as cudaMalloc's are), so that an ASan build of this library reports a
  // kernel reading even one byte past the end.
  void* m = nullptr;
  if (posix_memalign(&m, 256, std::max<size_t>(bytes, 1)) != 0) die("host memory exhausted emulating cudaMalloc");
  std::memset(m, 0xff, std::max<size_t>(bytes, 1));  // NaN: a kernel reading memory nobody wrote sees NaN
  std::lock_guard<std::mutex> lk(r.mu);
  r.allocs[uintptr_t(m)] = Alloc{std::max<size_t>(bytes, 1), rounded, t_device};
  *p = m;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void);

cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  Runtime& r = rt();
  int device;
  {
    std::lock_guard<std::mutex> lk(r.mu);
    auto it = r.allocs.find(uintptr_t(p));
    if (it == r.allocs.end() || it->second.device < 0) return set_error(cudaErrorInvalidDevicePointer);
    device = it->second.device;
  }
  // cudaFree waits for the device to be idle; so must the emulation, or queued kernels would read freed memory.
  const int saved = t_device;
  t_device = device;
  cudaDeviceSynchronize();
  t_device = saved;
  std::lock_guard<std::mutex> lk(r.mu);
  auto it = r.allocs.find(uintptr_t(p));
  r.dev[size_t(device)].used -= it->second.charged;
  r.allocs.erase(it);
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** p, size_t bytes) {
  void* m = nullptr;
  if (posix_memalign(&m, 256, std::max<size_t>(bytes, 1)) != 0) return set_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lk(rt().mu);
  rt().allocs[uintptr_t(m)] = Alloc{std::max<size_t>(bytes, 1), 0, -1};
  *p = m;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lk(rt().mu);
    auto it = rt().allocs.find(uintptr_t(p));
    if (it == rt().allocs.end() || it->second.device >= 0) return set_error(cudaErrorInvalidValue);
    rt().allocs.erase(it);
  }
  for (int d = 0; d < rt().n_devices; ++d) {  // pinned memory is freed after the work using it
    const int saved = t_device;
    t_device = d;
    cudaDeviceSynchronize();
    t_device = saved;
  }
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned /*flags*/) {
  if (!valid_device(t_device)) return set_error(cudaErrorInvalidDevice);
  auto* st = new CUstream_st(t_device);
  std::lock_guard<std::mutex> lk(rt().mu);
  rt().dev[size_t(t_device)].streams.insert(st);
  *s = st;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (!s) return set_error(cudaErrorInvalidResourceHandle);
  {
    std::lock_guard<std::mutex> lk(rt().mu);
    rt().dev[size_t(s->device)].streams.erase(s);
  }
  delete s;  // runs what is queued, then joins the worker
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  resolve(s)->sync();
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  std::vector<CUstream_st*> all;
  {
    std::lock_guard<std::mutex> lk(rt().mu);
    DeviceState& d = rt().dev[size_t(t_device)];
    all.assign(d.streams.begin(), d.streams.end());
    if (d.null_stream) all.push_back(d.null_stream);
  }
  for (CUstream_st* s : all) s->sync();
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t stream) {
  const cudaError_t e = check_copy(dst, src, n, kind, "cudaMemcpyAsync");
  if (e != cudaSuccess || n == 0) return set_error(e);
  CUstream_st* s = resolve(stream);
  const bool pageable_src = kind == cudaMemcpyHostToDevice && !is_device_or_pinned(src, n);
  const bool pageable_dst = kind == cudaMemcpyDeviceToHost && !is_device_or_pinned(dst, n);
  if (pageable_src) {
    // From pageable memory the runtime stages the source before returning: the caller may reuse it at once.
    auto copy = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                             static_cast<const unsigned char*>(src) + n);
    s->push([dst, copy] { std::memcpy(dst, copy->data(), copy->size()); });
    return cudaSuccess;
  }
  const uint64_t id = s->push([dst, src, n] { std::memcpy(dst, src, n); });
  if (pageable_dst) s->wait_for(id);  // to pageable memory the call returns once the copy is done
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  const cudaError_t e = cudaMemcpyAsync(dst, src, n, kind, nullptr);
  if (e != cudaSuccess) return e;
  resolve(nullptr)->sync();
  return cudaSuccess;
}

cudaError_t cudaMemcpyPeerAsync(void* dst, int dst_dev, const void* src, int src_dev, size_t n,
                                cudaStream_t stream) {
  if (!valid_device(dst_dev) || !valid_device(src_dev)) return set_error(cudaErrorInvalidDevice);
  if (n == 0) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lk(rt().mu);
    const Alloc* d = rt().find(dst, n);
    const Alloc* s = rt().find(src, n);
    if (!d || d->device != dst_dev)
      die("cudaMemcpyPeerAsync: destination %p (+%zu bytes) is not inside one allocation of cuda:%d", dst, n, dst_dev);
    if (!s || s->device != src_dev)
      die("cudaMemcpyPeerAsync: source %p (+%zu bytes) is not inside one allocation of cuda:%d", src, n, src_dev);
  }
  resolve(stream)->push([dst, src, n] { std::memcpy(dst, src, n); });
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lk(rt().mu);
    const Alloc* a = rt().find(p, n);
    if (!a || a->device < 0) die("cudaMemset: %p (+%zu bytes) is not inside one device allocation", p, n);
  }
  resolve(stream)->push([p, value, n] { std::memset(p, value, n); });
  return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int value, size_t n) {
  const cudaError_t e = cudaMemsetAsync(p, value, n, nullptr);
  if (e != cudaSuccess) return e;
  resolve(nullptr)->sync();
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  auto* ev = new CUevent_st;
  ev->s = std::make_shared<EventState>();
  ev->s->device = t_device;
  ev->s->timing = !(flags & cudaEventDisableTiming);
  *e = ev;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }

cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  delete e;  // queued records and waits hold the state
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t stream) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  CUstream_st* s = resolve(stream);
  // The event and the stream must belong to the same GPU (the real runtime fails the same way).
  if (s->device != e->s->device) return set_error(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EventState> st = e->s;
  uint64_t seq;
  {
    std::lock_guard<std::mutex> lk(st->mu);
    seq = ++st->recorded;
  }
  s->push([st, seq] {
    {
      std::lock_guard<std::mutex> lk(st->mu);
      st->completed = std::max(st->completed, seq);
      st->when = std::chrono::steady_clock::now();
    }
    st->cv.notify_all();
  });
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t e, unsigned /*flags*/) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EventState> st = e->s;
  uint64_t target;
  {
    std::lock_guard<std::mutex> lk(st->mu);
    target = st->recorded;  // the most recent record at the time of the call
  }
  if (target == 0) return cudaSuccess;
  resolve(stream)->push([st, target] {
    std::unique_lock<std::mutex> lk(st->mu);
    st->cv.wait(lk, [&] { return st->completed >= target; });
  });
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EventState> st = e->s;
  std::unique_lock<std::mutex> lk(st->mu);
  const uint64_t target = st->recorded;
  if (st->completed < target) ++g_host_waits;
  st->cv.wait(lk, [&] { return st->completed >= target; });
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::mutex> lk(e->s->mu);
  return e->s->completed >= e->s->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!a || !b || !a->s->timing || !b->s->timing) return set_error(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::mutex> la(a->s->mu);
  std::lock_guard<std::mutex> lb(b->s->mu);
  if (a->s->completed == 0 || b->s->completed == 0) return set_error(cudaErrorInvalidResourceHandle);
  if (a->s->completed < a->s->recorded || b->s->completed < b->s->recorded) return set_error(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(b->s->when - a->s->when).count();
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return set_error(cudaErrorInvalidValue);
  if (value < 0 || size_t(value) > rt().smem_optin()) return set_error(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lk(rt().mu);
  rt().max_dyn_smem[func] = value;
  return cudaSuccess;
}

// Not CUDA: how many host calls so far had to wait for pending GPU work (a test hook, exported by name).
__attribute__((visibility("default"))) long long tp_emu_host_waits(void) { return g_host_waits.load(); }

}  // extern "C"
