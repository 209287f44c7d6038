// emu.h — a CPU emulation of the CUDA execution model and runtime, enough to run csrc/backend/cuda.
//
// Test infrastructure only (CMake: TP_CUDA_EMULATE=ON builds a separate libturboprefill with it; it is never
// installed). Every CUDA source of the backend is compiled as C++ with this header force-included, and
// emu.cpp provides the CUDA runtime functions the backend calls. What it models:
//   - kernels: each CTA runs on the CPU, one fiber per CUDA thread (CTAs of a grid one after another);
//     __syncthreads is a CTA barrier, warp shuffles and mma.sync exchange registers among the 32 lanes of a
//     warp (the mma instructions computed from the PTX ISA fragment layouts, written here independently of
//     the kernels); static __shared__ variables are per-worker thread_local, i.e. per running CTA;
//   - streams: one worker thread each, running its operations in order, asynchronously to the host;
//     events, cudaStreamWaitEvent across devices, cudaEventSynchronize, timing;
//   - devices: TP_EMU_GPUS (default 2) GPUs of compute capability TP_EMU_CC (default 8.6) with
//     TP_EMU_GPU_MEM_MIB (default 2048) MiB each, peer access between them unless TP_EMU_PEER=0;
//   - memory: host allocations, tracked per device; new allocations are filled with 0xff bytes (NaN for
//     f32 and f16) so reads of never-written memory show up.
// What it checks on top of running the code (each a CUDA error or an abort with a message on stderr):
// launch configurations (block size, grid size, dynamic shared memory against the opt-in attribute),
// kernel pointer arguments (device memory of the launching GPU or of a peer it enabled), copy ranges (inside
// one allocation), copies' directions, events recorded on another GPU's stream, barriers some threads never
// reach (deadlock), and shuffles with partial masks.
// What it cannot: timing, memory-model races inside a kernel, out-of-bounds accesses inside a kernel
// (CMake TP_ASAN=ON builds the emulated library with ASan), and the tensor cores' exact f32 accumulation order.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#if !defined(TP_EMU_ARCH)
#define TP_EMU_ARCH 800
#endif

// ---- language -------------------------------------------------------------------------------------------

#undef __shared__
#define __shared__ thread_local  // block scope: static per worker thread, which runs one CTA at a time
#if !defined(__launch_bounds__)
#define __launch_bounds__(...)
#endif

namespace tp_emu {

struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local ThreadCtx* t_ctx;  // the running fiber's indices

void syncthreads();
void syncwarp();
// The 32 lanes of the calling warp exchange 64-bit values: returns the value of lane src.
uint64_t exchange(uint64_t v, int src);
unsigned char* dynamic_smem();
[[noreturn]] void die(const char* fmt, ...);

template <class T>
T shfl(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register-sized value");
  if (mask != 0xffffffffu) die("__shfl_*_sync with mask 0x%08x: the emulation supports full warps only", mask);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = exchange(bits, src & 31);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, m16n8k16 (s8) and m16n8k16.f32.f16.f16.f32, from the
// PTX ISA fragment layouts (emu.cpp).
void mma_s8_m16n8k32(int (&c)[4], const int (&a)[4], int b0, int b1);
void mma_s8_m16n8k16(int (&c)[4], int a0, int a1, int b0);
void mma_f16_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

// ---- launches -------------------------------------------------------------------------------------------

// Validates the configuration and pointer arguments, then enqueues `body` (run once per CUDA thread) on
// the stream. Returns the launch status (also kept for cudaGetLastError).
cudaError_t enqueue_kernel(const void* func, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           const void* const* pointers, int n_pointers, std::function<void()> body);

template <class T>
void collect_pointer(const T& v, const void** out, int& n) {
  if constexpr (std::is_pointer<T>::value) out[n++] = static_cast<const void*>(v);
}

template <class... P, class... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  // CUDA copies the arguments at launch: so does this (converted to the parameter types).
  auto params = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
  const void* ptrs[sizeof...(P) + 1] = {nullptr};
  int n = 0;
  std::apply([&](const auto&... p) { (collect_pointer(p, ptrs, n), ...); }, *params);
  return enqueue_kernel(reinterpret_cast<const void*>(kernel), grid, block, smem, stream, ptrs, n,
                        [kernel, params] { std::apply(kernel, *params); });
}

}  // namespace tp_emu

#define threadIdx (::tp_emu::t_ctx->thread_idx)
#define blockIdx (::tp_emu::t_ctx->block_idx)
#define blockDim (::tp_emu::t_ctx->block_dim)
#define gridDim (::tp_emu::t_ctx->grid_dim)

// ---- intrinsics -------------------------------------------------------------------------------------------

inline void __syncthreads() { tp_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { tp_emu::syncwarp(); }
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int = 32) {
  return tp_emu::shfl(mask, v, src);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
  return tp_emu::shfl(mask, v, int(tp_emu::t_ctx->thread_idx.x % 32) ^ lane_mask);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
  const int lane = int(tp_emu::t_ctx->thread_idx.x % 32), src = lane + int(delta);
  const T r = tp_emu::shfl(mask, v, src < 32 ? src : lane);
  return r;
}

// Bit l = lane l's predicate, gathered by a butterfly of shuffles (full warps only, like the shuffles).
inline unsigned __ballot_sync(unsigned mask, int pred) {
  unsigned b = pred ? 1u << (tp_emu::t_ctx->thread_idx.x % 32) : 0u;
  for (int o = 1; o < 32; o <<= 1) b |= __shfl_xor_sync(mask, b, o);
  return b;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(uint32_t(a) >> (8 * i))) * int(int8_t(uint32_t(b) >> (8 * i)));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return c;
}

// IEEE round-to-nearest operations (the library is built with -ffp-contract=off, so nothing fuses them).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// The typed overload nvcc's cuda_runtime.h has for kernels (host compilers see only the const void* one).
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
