// matmul_mmq_legacy.cu — MMQ instantiations (dense and grouped) for the 32-element block types (Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0, MXFP4). The kernels live in matmul_mmq.cuh; the K-quants are instantiated in
// matmul_mmq_kquant.cu so the two halves compile in parallel.
#include "backend/cuda/matmul_mmq.cuh"

namespace tp {
namespace cuda_mm {

#define TP_MMQ_INSTANTIATE(B)                                                                          \
  template cudaError_t mmq_launch<B>(float*, const void*, int64_t, int64_t, int64_t, QuantAct, int64_t, \
                                     cudaStream_t);                                                     \
  template cudaError_t mmq_moe_launch<B>(float*, const void*, int64_t, int64_t, int64_t, QuantAct, MoeRoute, \
                                         int64_t, const float*, cudaStream_t);
TP_MMQ_INSTANTIATE(block_q4_0)
TP_MMQ_INSTANTIATE(block_q4_1)
TP_MMQ_INSTANTIATE(block_q5_0)
TP_MMQ_INSTANTIATE(block_q5_1)
TP_MMQ_INSTANTIATE(block_q8_0)
TP_MMQ_INSTANTIATE(block_mxfp4)
#undef TP_MMQ_INSTANTIATE

}  // namespace cuda_mm
}  // namespace tp
