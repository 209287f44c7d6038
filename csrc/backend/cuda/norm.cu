// norm.cu — RMSNorm on the GPU, one warp per row.
//
// Numerics follow the CPU backend (cpu_ops.cpp): Σx² in double, then scale = 1 / sqrtf(mean + eps) with
// IEEE sqrt and division, then y = (x · scale) · w as two rounded products. Only the summation order
// differs (lane-strided partial sums and a butterfly instead of a left-to-right loop); each square is exact
// in double and the sum's relative error is below 2^-40 for any dim this engine sees, so float(Σ / dim)
// matches the CPU's except when the double lands within that distance of a float rounding boundary.
#include "backend/cuda/kernels.cuh"

namespace {

constexpr int kRowsPerBlock = 4;  // one warp per row

// in and out may alias: each lane rewrites only the elements it read, after the row's sum is known.
__global__ void rms_norm_kernel(float* out, const float* in, const float* w, int64_t rows, int dim, float eps) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together: the shuffles below see full warps
  const int lane = threadIdx.x % 32;
  const float* x = in + row * dim;
  float* y = out + row * dim;
  double ss = 0.0;
  for (int j = lane; j < dim; j += 32) {
    const double v = x[j];
    ss += v * v;
  }
  ss = tp_warp_sum(ss);
  const float scale = 1.0f / sqrtf(float(ss / double(dim)) + eps);
  for (int j = lane; j < dim; j += 32) y[j] = __fmul_rn(__fmul_rn(x[j], scale), w[j]);
}

}  // namespace

cudaError_t tp_rms_norm_cuda(float* out, const float* in, const float* w, int64_t rows, int64_t dim, float eps,
                             cudaStream_t stream) {
  if (rows < 0 || dim <= 0 || dim > INT32_MAX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  TP_LAUNCH(rms_norm_kernel, unsigned(blocks), kRowsPerBlock * 32, 0, stream, out, in, w, rows, int(dim), eps);
  return cudaGetLastError();
}
