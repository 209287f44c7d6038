// compat.cuh — the three places where the CUDA sources differ between nvcc and the CPU emulation.
//
// The CUDA backend is also compiled as plain C++ against tests/cuda_emu (TP_CUDA_EMULATE, a test build:
// CUDA threads run as fibers on the CPU, the runtime API is reimplemented over host memory), so that the
// whole backend — kernels, launch configuration, streams, events, peer copies — runs in CI, where no GPU
// exists. The sources stay CUDA; only these hooks change meaning:
//   TP_ARCH               the compute capability the device code is being compiled for, ×10 like
//                         __CUDA_ARCH__ (800 = sm_80); 0 in the host pass. The emulation compiles one
//                         architecture, TP_EMU_ARCH.
//   TP_LAUNCH(k, grid, block, smem, stream, args...)
//                         k<<<grid, block, smem, stream>>>(args...); emulated: enqueued on the stream.
//   TP_DYNAMIC_SMEM(name) declares `unsigned char* name`, the CTA's dynamic shared memory.
// Inline PTX is guarded by TP_ARCH and has a TP_CUDA_EMULATE branch that calls the emulated instruction.
#pragma once

#if defined(__CUDA_ARCH__)
#define TP_ARCH __CUDA_ARCH__
#elif defined(TP_CUDA_EMULATE)
#define TP_ARCH TP_EMU_ARCH
#else
#define TP_ARCH 0
#endif

#if defined(TP_CUDA_EMULATE)
#define TP_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::tp_emu::launch(kernel, dim3(grid), dim3(block), size_t(smem), stream, __VA_ARGS__)
#define TP_DYNAMIC_SMEM(name) unsigned char* name = ::tp_emu::dynamic_smem()
#else
#define TP_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define TP_DYNAMIC_SMEM(name)                          \
  extern __shared__ __align__(16) unsigned char name##_[]; \
  unsigned char* name = name##_
#endif
