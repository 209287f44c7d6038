// rope.cu — rotary position embedding in place, one block per token.
//
// The angles are computed as the CPU backend does (cpu_ops.cpp rope / rope_theta), in double:
// θ_e = pos · base^(−2k / n_rot) [/ freq_factors[k]], θ = freq_scale · θ_e, or with YaRN (model/config.h)
// θ = freq_scale·θ_e·(1 − r_k) + θ_e·r_k with the ramp r_k evaluated in float like the CPU; then cos/sin
// rounded to float and scaled by yarn.mscale (exactly 1 without YaRN); each thread
// owns one pair index k and rotates that pair in every head of its token, so each (cos, sin) is evaluated
// once per token. The rotation a·c − b·s, a·s + b·c uses explicitly rounded products (no FMA), the CPU's
// arithmetic. Device pow/sin/cos are within 2 ulp of glibc in double, so the floats almost always agree.
// Multi-section modes (Mrope, Vision) pick each pair's position id and frequency index with the CPU's
// rope_section (model/config.h); positions are read from the section-major id array when one is given.
#include "backend/cuda/kernels.cuh"

namespace {

__global__ void rope_kernel(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0,
                            const int32_t* ids, tp::RopeMode mode, TpRopeSections sec, int half, int n_rot, float base,
                            float freq_scale, const float* freq_factors, tp::YarnParams yarn) {
  const int64_t i = blockIdx.x;
  const bool multi = mode == tp::RopeMode::Mrope || mode == tp::RopeMode::Vision;
  for (int k = threadIdx.x; k < half; k += blockDim.x) {
    int64_t j = k;
    const int sid = multi ? tp::rope_section(mode, sec.n, k, &j) : 0;
    const double pos = double(ids ? int64_t(ids[sid * n_tok + i]) : sid == 3 ? 0 : pos0 + i);
    double theta_e = pos * pow(double(base), -2.0 * double(j) / double(n_rot));
    if (freq_factors) theta_e /= double(freq_factors[k]);
    double theta = __dmul_rn(double(freq_scale), theta_e);
    if (yarn.ext_factor != 0.0f) {
      const float span = fmaxf(0.001f, __fsub_rn(yarn.corr_high, yarn.corr_low));
      const float y = __fdiv_rn(__fsub_rn(float(k), yarn.corr_low), span);
      const double ramp = double(__fmul_rn(__fsub_rn(1.0f, fminf(1.0f, fmaxf(0.0f, y))), yarn.ext_factor));
      theta = __dadd_rn(__dmul_rn(theta, __dadd_rn(1.0, -ramp)), __dmul_rn(theta_e, ramp));  // no FMA: the CPU's
    }
    const float c = __fmul_rn(float(cos(theta)), yarn.mscale), s = __fmul_rn(float(sin(theta)), yarn.mscale);
    const bool norm = mode == tp::RopeMode::Norm;
    const int ia = norm ? 2 * k : k, ib = norm ? 2 * k + 1 : k + half;
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + (i * n_heads + h) * head_dim;
      const float a = v[ia], b = v[ib];
      v[ia] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
      v[ib] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    }
  }
}

}  // namespace

cudaError_t tp_rope_cuda(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t pos0,
                         const int32_t* pos, tp::RopeMode mode, TpRopeSections sections, int64_t n_rot, float base,
                         float freq_scale, const float* freq_factors, tp::YarnParams yarn, cudaStream_t stream) {
  const bool vision = mode == tp::RopeMode::Vision;
  if (n_tok < 0 || n_heads < 0 || n_rot < 0 || n_rot > head_dim || n_rot % 2 || n_tok > INT32_MAX ||
      (vision && 2 * n_rot != head_dim))
    return cudaErrorInvalidValue;
  if ((vision || mode == tp::RopeMode::Mrope) &&
      sections.n[0] + sections.n[1] + sections.n[2] + sections.n[3] <= 0)
    return cudaErrorInvalidValue;
  const int half = int(vision ? n_rot : n_rot / 2);
  if (n_tok == 0 || n_heads == 0 || half == 0) return cudaSuccess;
  const int threads = half >= 128 ? 128 : (half + 31) / 32 * 32;
  TP_LAUNCH(rope_kernel, unsigned(n_tok), threads, 0, stream, x, n_tok, n_heads, head_dim, pos0, pos, mode, sections,
            half, int(n_rot), base, freq_scale, freq_factors, yarn);
  return cudaGetLastError();
}
