// kernels.h — CPU kernels behind CpuOps, one function per op family, each parallel over a ThreadPool.
//
// SIMD: the inner loops use GCC/Clang generic vectors and are compiled once per instruction set with
// target_clones, so the dynamic loader picks AVX-512, AVX2+FMA or baseline x86-64 on the machine that
// runs the wheel (no -march at build time). Non-x86 builds compile the portable version only.
#pragma once

#include <cstdint>

#include "backend/cpu/threadpool.h"
#include "backend/ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TP_TSAN_BUILD)
#define TP_CPU_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define TP_CPU_CLONES
#endif

namespace tp {

// out[t][r] = sum_k W[r][k] * in[t][k]; weights decoded block by block into a per-thread row tile.
void cpu_matmul(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok);

// Causal (optionally sliding-window) attention with an online softmax over key tiles; never materializes
// the score matrix. K and V hold kv_dim floats per position for positions 0 .. pos0 + n_tok - 1.
void cpu_attention(ThreadPool& pool, float* out, const float* q, const float* K, const float* V, int64_t pos0,
                   int64_t n_tok, const AttnParams& p);

// The instruction sets the kernels use on this machine, e.g. "int8:avx512-vnni f32:avx512f".
const char* cpu_simd_level();

// Tests: cap the int8 kernels' ISA at `level` (0 scalar, 1 AVX2, 2 AVX-512 VNNI; -1 = what the CPU has).
void cpu_set_isa_override(int level);

}  // namespace tp
