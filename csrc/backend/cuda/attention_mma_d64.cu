// attention_mma_d64.cu — the tensor-core attention kernel for head_dim 64 (see attention_mma.cuh).
#include "backend/cuda/attention_mma.cuh"

namespace tp {
namespace cuda {
template cudaError_t attention_mma<64>(const AttnArgs&, cudaStream_t);
}  // namespace cuda
}  // namespace tp
