// attention_mma_d128.cu — the tensor-core attention kernel for head_dim 128 (see attention_mma.cuh).
#include "backend/cuda/attention_mma.cuh"

namespace tp {
namespace cuda {
template cudaError_t attention_mma<128>(const AttnArgs&, cudaStream_t);
}  // namespace cuda
}  // namespace tp
