// attention_mma_d256.cu — the tensor-core attention kernel for head_dim 256 (see attention_mma.cuh).
#include "backend/cuda/attention_mma.cuh"

namespace tp {
namespace cuda {
template cudaError_t attention_mma<256>(const AttnArgs&, cudaStream_t);
}  // namespace cuda
}  // namespace tp
