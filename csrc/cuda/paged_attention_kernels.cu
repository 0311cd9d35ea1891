// The paged attention instantiations the adapters use; torch-free, so nvcc never parses torch headers.
#include "arpg/paged_attention.cuh"

namespace arpg {

template cudaError_t PagedAttention<half, 64>(const PagedAttentionParams<half>&, cudaStream_t);
template cudaError_t PagedAttention<half, 128>(const PagedAttentionParams<half>&, cudaStream_t);
template cudaError_t PagedAttention<__nv_bfloat16, 64>(const PagedAttentionParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t PagedAttention<__nv_bfloat16, 128>(const PagedAttentionParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace arpg
