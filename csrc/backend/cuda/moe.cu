// moe.cu — the mixture-of-experts ops around the grouped expert matmul (matmul_moe.cu): top-k routing and
// the weighted combination of the experts' outputs (Ops contract in backend/ops.h).
//
// router_topk: one thread per token runs the CPU backend's selection (cpu/moe.cpp) literally — k passes over
// the token's logits, each taking the largest logit not yet taken, the lower expert on ties (strict >) — so
// the ids equal the CPU's for the same logits. The weights are the softmax over the k chosen logits,
// e^(l_j - l_0) / Σ, summed in j order with explicitly rounded operations; expf differs from the CPU's
// std::exp by <= 2 ulp, so the weights agree to a few ulp. A thread per token (not a warp) because k and
// n_expert are small (4 of 32..128) and the selection must be the CPU's sequential one to keep its ties.
// moe_combine: out[t][c] = Σ_j w[t·k + j] · y[t·k + j][c], each product rounded before it is added, j in order
// (__fmul_rn/__fadd_rn, which nvcc never fuses): the CPU's bits exactly.
#include "backend/cuda/kernels.cuh"

namespace {

constexpr int kMaxTopK = 64;  // chosen ids a thread keeps in registers/local memory

__global__ void router_topk_kernel(int32_t* __restrict__ ids, float* __restrict__ weights,
                                   const float* __restrict__ logits, int64_t n_tok, int n_expert, int k) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_tok) return;
  const float* l = logits + t * n_expert;
  int id[kMaxTopK];
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int x = 0; x < n_expert; ++x) {
      bool taken = false;
      for (int u = 0; u < j; ++u) taken = taken || id[u] == x;
      if (!taken && (best < 0 || l[x] > l[best])) best = x;
    }
    id[j] = best;
  }
  float* w = weights + t * k;
  const float l0 = l[id[0]];
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    w[j] = expf(__fsub_rn(l[id[j]], l0));
    sum = __fadd_rn(sum, w[j]);
  }
  for (int j = 0; j < k; ++j) {
    w[j] = __fdiv_rn(w[j], sum);
    ids[t * k + j] = id[j];
  }
}

__global__ void moe_combine_kernel(float* __restrict__ out, const float* __restrict__ y, const float* __restrict__ w,
                                   int64_t n_tok, int64_t k, int64_t dim) {
  const int64_t n = n_tok * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / dim, c = i % dim;
    const float* yt = y + t * k * dim + c;
    const float* wt = w + t * k;
    float acc = __fmul_rn(wt[0], yt[0]);
    for (int64_t j = 1; j < k; ++j) acc = __fadd_rn(acc, __fmul_rn(wt[j], yt[j * dim]));
    out[i] = acc;
  }
}

}  // namespace

cudaError_t tp_router_topk_cuda(int32_t* ids, float* weights, const float* logits, int64_t n_tok, int64_t n_expert,
                                int64_t k, cudaStream_t stream) {
  if (n_tok < 0 || k < 1 || k > n_expert || k > kMaxTopK || n_expert > INT32_MAX) return cudaErrorInvalidValue;
  if (n_tok == 0) return cudaSuccess;
  if (!ids || !weights || !logits) return cudaErrorInvalidValue;
  const int64_t blocks = (n_tok + 127) / 128;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TP_LAUNCH(router_topk_kernel, unsigned(blocks), 128, 0, stream, ids, weights, logits, n_tok, int(n_expert), int(k));
  return cudaGetLastError();
}

cudaError_t tp_moe_combine_cuda(float* out, const float* y, const float* weights, int64_t n_tok, int64_t k,
                                int64_t dim, cudaStream_t stream) {
  if (n_tok < 0 || k < 1 || dim < 0) return cudaErrorInvalidValue;
  if (n_tok == 0 || dim == 0) return cudaSuccess;
  if (!out || !y || !weights) return cudaErrorInvalidValue;
  TP_LAUNCH(moe_combine_kernel, tp_grid_blocks(n_tok * dim, 256), 256, 0, stream, out, y, weights, n_tok, k, dim);
  return cudaGetLastError();
}
