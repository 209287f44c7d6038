// kernels.h — CPU kernels behind CpuOps, one function per op family, each parallel over a ThreadPool.
//
// SIMD: the float loops (f32 matmul, attention, GLU) use GCC/Clang generic vectors of the machine's width,
// instantiated per instruction set and picked at run time (see "vectors of the machine's width" below); the
// int8 matmul kernels (matmul.cpp) are intrinsics under __attribute__((target)) chosen at run time with
// __builtin_cpu_supports (AVX-512 VNNI, AVX2, scalar). The library is built for baseline x86-64 (no -march),
// so one wheel runs everywhere. Non-x86 builds compile the portable versions only.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/threadpool.h"
#include "backend/ops.h"

namespace tp {

// ---- vectors of the machine's width -----------------------------------------------------------------------
//
// The float kernels (attention, GLU, f32 matmul) are templates over the vector width W, instantiated three
// times inside functions with __attribute__((target)): W = 16 floats under AVX-512, 8 under AVX2+FMA, 4 on
// baseline x86-64 (SSE2); vec_isa() picks one per machine at run time (TP_VEC_VARIANTS below). The width has
// to match the ISA: GCC lowers a 64-byte vector on an AVX2 target through the stack, which made the former
// single 16-wide type (one target_clones body for every ISA) ~40x slower on AVX2 than on AVX-512.
// Everything is inlined into the per-ISA functions, so no weak symbol is ever compiled for a wider ISA than
// the machine has.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI
#endif
#define TP_VINLINE __attribute__((always_inline)) inline

template <int W>
struct VecT {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef float fu __attribute__((vector_size(4 * W), aligned(4), may_alias));
};

// Unaligned W-float load/store as plain vector moves (memcpy loops can be turned into library calls).
template <int W>
TP_VINLINE typename VecT<W>::f vld(const float* p) {
  return *reinterpret_cast<const typename VecT<W>::fu*>(p);
}
template <int W>
TP_VINLINE void vst(float* p, typename VecT<W>::f v) {
  *reinterpret_cast<typename VecT<W>::fu*>(p) = v;
}

// e^x, W lanes: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by a degree-6 polynomial, 2^n through the
// exponent bits (Cephes' expf polynomial, ~2 ulp); attention and GLU results that use it are checked
// against f64 in tests/test_cpu_kernels.py and tests/test_engine.py. Inputs below -87.3 give 0; above
// 88.7 they are clamped (no inf). Lane-wise, so every width gives the same value for the same input.
template <int W>
TP_VINLINE typename VecT<W>::f vexp(typename VecT<W>::f x) {
  typedef typename VecT<W>::f vf;
  typedef typename VecT<W>::i vi;
  const vf hi_c = vf{} + 88.7f, lo_c = vf{} - 87.3f;
  vf xc = x > hi_c ? hi_c : x;
  xc = xc < lo_c ? lo_c : xc;
  const vf shifter = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (xc * 1.44269504088896341f + shifter) - shifter;
  const vf r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vf poly = vf{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const vi ni = __builtin_convertvector(n, vi);
  const vi bits = (ni + 127) << 23;
  vf scale;
  memcpy(&scale, &bits, sizeof(scale));
  vf res = poly * scale;
  const vi under = x < -87.3f;
  vi rb;
  memcpy(&rb, &res, sizeof(rb));
  rb &= ~under;
  memcpy(&res, &rb, sizeof(res));
  return res;
}

// The float kernels' instruction set on this machine: 2 AVX-512 (W = 16), 1 AVX2+FMA (W = 8), 0 baseline.
int vec_isa();

#if defined(__x86_64__) && defined(__GNUC__)
#define TP_VEC_X86 1
// TP_VEC_VARIANTS(name, (params), (args)): from a template name##_impl<W>(params), defines name(params),
// which runs the instantiation for this machine's ISA.
#define TP_VEC_VARIANTS(name, params, args)                                                          \
  __attribute__((target("avx512f,avx512dq,fma"))) void name##_w16 params { name##_impl<16> args; } \
  __attribute__((target("avx2,fma,f16c"))) void name##_w8 params { name##_impl<8> args; }          \
  void name##_w4 params { name##_impl<4> args; }                                                    \
  void name params {                                                                                \
    static const int isa = vec_isa();                                                               \
    if (isa == 2)                                                                                   \
      name##_w16 args;                                                                              \
    else if (isa == 1)                                                                              \
      name##_w8 args;                                                                               \
    else                                                                                            \
      name##_w4 args;                                                                               \
  }
#else
#define TP_VEC_X86 0
#define TP_VEC_VARIANTS(name, params, args) \
  void name params { name##_impl<4> args; }
#endif

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

// ---- vision encoder (vision_ops.cpp; contracts in backend/ops.h) -------------------------------------------

// seg: host memory, n_seg + 1 bounds.
void cpu_attention_seg(ThreadPool& pool, float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                       const AttnParams& p, const int32_t* seg, int64_t n_seg);
void cpu_unary(ThreadPool& pool, float* out, const float* in, int64_t n, Activation act);

// The instruction sets the kernels use on this machine, e.g. "int8:avx512-vnni f32:avx512f".
const char* cpu_simd_level();

// Tests: cap the int8 kernels' ISA at `level` (0 scalar, 1 AVX2, 2 AVX-512 VNNI; -1 = what the CPU has).
void cpu_set_isa_override(int level);

}  // namespace tp
