// vision.cuh — launchers of the vision encoder's CUDA ops (backend/ops.h "vision encoder"; vision.cu).
//
// Same conventions as kernels.cuh: enqueue on `stream`, never synchronize, return the launch's cudaError_t
// (cudaErrorInvalidValue for sizes the kernel cannot handle); pointers are device memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_ops.h"  // kTpAttnSegMaxHeadDim
#include "model/config.h"            // Activation

// Non-causal attention inside segments: token i in [seg[s], seg[s+1]) attends to keys seg[s] .. seg[s+1] - 1
// of its head; softmax(q·k · kq_scale) · v with an online softmax over key tiles, all f32.
// q, k, v, out: [n_tok, n_head * head_dim]; seg: n_seg + 1 increasing int32 bounds from 0 to n_tok.
// head_dim <= tp::kTpAttnSegMaxHeadDim.
cudaError_t tp_attention_seg_cuda(float* out, const float* q, const float* k, const float* v, int64_t n_tok,
                                  int64_t n_head, int64_t head_dim, float kq_scale, const int32_t* seg, int64_t n_seg,
                                  cudaStream_t stream);

// out = act(in), Silu or GeluTanh, the CPU's expressions (vision_ops.cpp)     all: [n] (may alias)
cudaError_t tp_unary_cuda(float* out, const float* in, int64_t n, tp::Activation act, cudaStream_t stream);
