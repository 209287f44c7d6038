// matmul_mmq_kquant.cu — MMQ instantiations (dense and grouped) for the 256-element K-quant block types
// (Q4_K, Q5_K, Q6_K). The kernels live in matmul_mmq.cuh; see matmul_mmq_legacy.cu for the 32-element types.
#include "backend/cuda/matmul_mmq.cuh"

namespace tp {
namespace cuda_mm {

#define TP_MMQ_INSTANTIATE(B)                                                                          \
  template cudaError_t mmq_launch<B>(float*, const void*, int64_t, int64_t, int64_t, QuantAct, int64_t, \
                                     cudaStream_t);                                                     \
  template cudaError_t mmq_moe_launch<B>(float*, const void*, int64_t, int64_t, int64_t, QuantAct, MoeRoute, \
                                         int64_t, const float*, cudaStream_t);
TP_MMQ_INSTANTIATE(block_q4_K)
TP_MMQ_INSTANTIATE(block_q5_K)
TP_MMQ_INSTANTIATE(block_q6_K)
#undef TP_MMQ_INSTANTIATE

}  // namespace cuda_mm
}  // namespace tp
