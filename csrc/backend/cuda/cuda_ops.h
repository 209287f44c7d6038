// cuda_ops.h — the CUDA backend's factory (Ops on one GPU) and its test hooks.
//
// Compiled only when the CUDA backend is built (TP_WITH_CUDA); engine.cpp and the test entry points guard
// their calls. Activation buffers, scratch and the f16 KV cache live on the GPU; weights are uploaded once
// per stage (Ops::upload at placement, or on first use) and looked up by their host address.
#pragma once

#include <cstdint>
#include <memory>

#include "backend/ops.h"

namespace tp {

// Ops on GPU `device` with its own stream. max_tokens: the ubatch size, used to size the matmul scratch
// up front (larger calls still work; the scratch then grows). Throws TP_ERR_DEVICE when the GPU cannot be
// used (naming the CUDA error).
std::unique_ptr<Ops> make_cuda_ops(int device, int64_t max_tokens);

// Largest head_dim of the vision encoder's segmented attention kernel (Ops::attention_seg, vision.cu).
constexpr int64_t kTpAttnSegMaxHeadDim = 128;

// Testing aid: which attention kernel a CUDA Ops runs (0 auto, 1 tensor cores, 2 f32); no-op on other Ops.
void cuda_ops_set_attention_kernel(Ops& ops, int kernel);

}  // namespace tp
