// kernels.h — CPU kernels behind CpuOps, one function per op family, each parallel over a ThreadPool.
//
// SIMD: the float loops (f32 matmul, attention, GLU) use GCC/Clang generic vectors compiled once per
// instruction set with target_clones, so the dynamic loader picks AVX-512, AVX2+FMA or baseline x86-64 on
// the machine that runs the wheel (no -march at build time); the int8 matmul kernels (matmul.cpp) are
// intrinsics under __attribute__((target)) chosen at run time with __builtin_cpu_supports (AVX-512 VNNI,
// AVX2, scalar). Non-x86 builds compile the portable versions only.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/threadpool.h"
#include "backend/ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TP_TSAN_BUILD)
#define TP_CPU_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define TP_CPU_CLONES
#endif

namespace tp {

// ---- generic-vector math shared by the kernels (compiled into each target_clones variant) -------------

// vexp returns a 64-byte vector: always inlined, so the ABI note GCC gives for non-AVX-512 callers is moot.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16fu __attribute__((vector_size(64), aligned(4), may_alias));

// Unaligned 16-float load/store as plain vector moves (memcpy loops can be turned into library calls).
__attribute__((always_inline)) inline v16f ld16(const float* p) { return *reinterpret_cast<const v16fu*>(p); }
__attribute__((always_inline)) inline void st16(float* p, v16f v) { *reinterpret_cast<v16fu*>(p) = v; }

// e^x, 16 lanes: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by a degree-6 polynomial, 2^n through the
// exponent bits (Cephes' expf polynomial, ~2 ulp); attention and GLU results that use it are checked
// against f64 in tests/test_cpu_kernels.py and tests/test_engine.py. Inputs below -87.3 give 0; above
// 88.7 they are clamped (no inf).
__attribute__((always_inline)) inline v16f vexp(v16f x) {
  const v16f hi_c = v16f{} + 88.7f, lo_c = v16f{} - 87.3f;
  v16f xc = x > hi_c ? hi_c : x;
  xc = xc < lo_c ? lo_c : xc;
  const v16f shifter = v16f{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const v16f n = (xc * 1.44269504088896341f + shifter) - shifter;
  const v16f r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  v16f poly = v16f{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const v16i ni = __builtin_convertvector(n, v16i);
  const v16i bits = (ni + 127) << 23;
  v16f scale;
  memcpy(&scale, &bits, sizeof(scale));
  v16f res = poly * scale;
  const v16i under = x < -87.3f;
  v16i rb;
  memcpy(&rb, &res, sizeof(rb));
  rb &= ~under;
  memcpy(&res, &rb, sizeof(res));
  return res;
}

// out[t][r] = sum_k W[r][k] * in[t][k]: two-stage int8 activations × int8 weight tiles for the quantized
// types, f32 for F32/F16/BF16 (matmul.cpp); each (row, token) in a fixed order.
void cpu_matmul(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok);
// The f32 path of cpu_matmul (matmul_f32.cpp).
void cpu_matmul_f32(ThreadPool& pool, float* out, const Tensor& w, const float* in, int64_t n_tok);
// Grouped product of a 3-D expert tensor: y[s] = w.mat(e) · in[src[s]] for s in [start[e], start[e+1]),
// every expert e < w.mats (in: [n_in, w.cols], y: [start[w.mats], w.mat_rows()]). Each row's result equals
// cpu_matmul's for that row. Returns false, computing nothing, for weight types without the int8 path.
bool cpu_matmul_grouped(ThreadPool& pool, float* y, const Tensor& w, const float* in, int64_t n_in, const int64_t* src,
                        const int64_t* start);

// Causal (optionally sliding-window) attention, flash style: query blocks of one KV head against key
// tiles with an online softmax; never materializes the score matrix. K and V hold kv_dim floats per
// position for positions 0 .. pos0 + n_tok - 1.
void cpu_attention(ThreadPool& pool, float* out, const float* q, const float* K, const float* V, int64_t pos0,
                   int64_t n_tok, const AttnParams& p);

// ---- mixture of experts (moe.cpp; contracts in backend/ops.h) ----------------------------------------------

// Reusable buffers of cpu_moe_matmul (one per Ops: the stage's worker calls it from one thread).
struct MoeBuffers {
  std::vector<int64_t> start, fill, order;  // slots sorted by expert: order[start[e] .. start[e+1])
  std::vector<int64_t> src;                 // input row of each sorted slot
  std::vector<float> x, y;                  // gathered float input rows (float experts) / sorted products
};

// Returns the number of distinct experts chosen.
int64_t cpu_router_topk(ThreadPool& pool, int32_t* ids, float* weights, const float* logits, int64_t n_tok,
                        int64_t n_expert, int64_t k);
void cpu_moe_matmul(ThreadPool& pool, MoeBuffers& buf, float* out, const Tensor& w, const Tensor& b, const float* in,
                    bool in_per_slot, const int32_t* ids, int64_t n_tok, int64_t k);
void cpu_moe_combine(ThreadPool& pool, float* out, const float* y, const float* weights, int64_t n_tok, int64_t k,
                     int64_t dim);

// The instruction sets the kernels use on this machine, e.g. "int8:avx512-vnni f32:avx512f".
const char* cpu_simd_level();

// Tests: cap the int8 kernels' ISA at `level` (0 scalar, 1 AVX2, 2 AVX-512 VNNI; -1 = what the CPU has).
void cpu_set_isa_override(int level);

}  // namespace tp
