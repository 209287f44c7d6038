// elementwise.cu — glu, add, add_bias and the embedding gather.
//
// glu evaluates the CPU backend's expressions (cpu_ops.cpp) in the same order with explicitly rounded
// operations: silu(g)·u = (g / (1 + e^−g))·u and gelu_tanh(g)·u =
// ((0.5·g)·(1 + tanh(0.7978845608·(g + ((0.044715·g)·g)·g))))·u and swiglu_oai (gpt-oss) with g = min(g, 7),
// u = clamp(u, -7, 7): (g / (1 + e^(−1.702·g)))·(u + 1); only expf/tanhf differ (<= 2 ulp).
// The embedding gather decodes each table row with the TP_HD block decoders of csrc/quant/blocks.h, the
// code the CPU backend and the reference dequantizer run. (nvcc may fuse a decoder's d·q − m into an FMA,
// so a decoded value can differ from the CPU's by 1 ulp of d·q.)
#include "backend/cuda/kernels.cuh"
#include "quant/blocks.h"

namespace {

__global__ void glu_kernel(float* out, const float* gate, const float* up, int64_t n, tp::Activation act) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float g = gate[i];
    float a;
    if (act == tp::Activation::SwigluOai) {
      // The CPU's std::min / std::max forms (a NaN gate passes through min like there).
      const float lim = tp::kSwigluOaiLimit;
      g = lim < g ? lim : g;
      float u = up[i];
      u = lim < u ? lim : u;
      u = -lim < u ? u : -lim;
      a = __fdiv_rn(g, __fadd_rn(1.0f, expf(__fmul_rn(-tp::kSwigluOaiAlpha, g))));
      out[i] = __fmul_rn(a, __fadd_rn(u, 1.0f));
      continue;
    }
    if (act == tp::Activation::GeluTanh) {
      const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, g), g), g);
      const float t = tanhf(__fmul_rn(0.7978845608028654f, __fadd_rn(g, cube)));
      a = __fmul_rn(__fmul_rn(0.5f, g), __fadd_rn(1.0f, t));
    } else {
      a = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
    }
    out[i] = __fmul_rn(a, up[i]);
  }
}

__global__ void add_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __fadd_rn(a[i], b[i]);
}

__global__ void add_bias_kernel(float* x, const float* b, int64_t n, int64_t cols) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __fadd_rn(x[i], b[i % cols]);
}

// Token ids ride in the kernel parameters (2 KiB of the 4 KiB a launch may carry).
constexpr int kEmbedChunk = 512;
struct TokenChunk {
  int32_t id[kEmbedChunk];
};

// One block per token; each thread decodes whole quant blocks of the row straight into out.
__global__ void embed_kernel(float* out, const uint8_t* table, tp::GgmlType type, int64_t row_bytes, int64_t cols,
                             int64_t block_elems, int64_t block_bytes, const TokenChunk tok, float scale) {
  const uint8_t* row = table + int64_t(tok.id[blockIdx.x]) * row_bytes;
  float* o = out + int64_t(blockIdx.x) * cols;
  const int64_t nb = cols / block_elems;
  for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) {
    float* y = o + b * block_elems;
    tp::dequantize_row(type, row + b * block_bytes, y, block_elems);
    if (scale != 1.0f)
      for (int64_t j = 0; j < block_elems; ++j) y[j] = __fmul_rn(y[j], scale);
  }
}

}  // namespace

cudaError_t tp_glu_cuda(float* out, const float* gate, const float* up, int64_t n, tp::Activation act,
                        cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  TP_LAUNCH(glu_kernel, tp_grid_blocks(n, 256), 256, 0, stream, out, gate, up, n, act);
  return cudaGetLastError();
}

cudaError_t tp_add_cuda(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  TP_LAUNCH(add_kernel, tp_grid_blocks(n, 256), 256, 0, stream, out, a, b, n);
  return cudaGetLastError();
}

cudaError_t tp_add_bias_cuda(float* x, const float* b, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return cudaErrorInvalidValue;
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  TP_LAUNCH(add_bias_kernel, tp_grid_blocks(n, 256), 256, 0, stream, x, b, n, cols);
  return cudaGetLastError();
}

bool tp_embed_cuda_supports(tp::GgmlType type) {
  switch (type) {
    case tp::GgmlType::F32:
    case tp::GgmlType::F16:
    case tp::GgmlType::BF16:
    case tp::GgmlType::Q4_0:
    case tp::GgmlType::Q4_1:
    case tp::GgmlType::Q5_0:
    case tp::GgmlType::Q5_1:
    case tp::GgmlType::Q8_0:
    case tp::GgmlType::Q4_K:
    case tp::GgmlType::Q5_K:
    case tp::GgmlType::Q6_K:
    case tp::GgmlType::MXFP4:
      return true;
    default:
      return false;
  }
}

cudaError_t tp_embed_cuda(float* out, const void* table, tp::GgmlType type, int64_t row_bytes, int64_t cols,
                          const int32_t* tokens, int64_t n, float scale, cudaStream_t stream) {
  const tp::TypeTraits tt = tp::type_traits(int32_t(type));
  if (!tp_embed_cuda_supports(type) || n < 0 || cols <= 0 || cols % tt.block_elems ||
      row_bytes != cols / tt.block_elems * tt.block_bytes)
    return cudaErrorInvalidValue;
  const int64_t nb = cols / tt.block_elems;
  const int threads = nb >= 128 ? 128 : int((nb + 31) / 32 * 32);
  for (int64_t i0 = 0; i0 < n; i0 += kEmbedChunk) {
    const int64_t m = n - i0 < kEmbedChunk ? n - i0 : kEmbedChunk;
    TokenChunk chunk{};
    for (int64_t i = 0; i < m; ++i) chunk.id[i] = tokens[i0 + i];
    TP_LAUNCH(embed_kernel, unsigned(m), threads, 0, stream, out + i0 * cols, static_cast<const uint8_t*>(table), type,
              row_bytes, cols, tt.block_elems, tt.block_bytes, chunk, scale);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}
