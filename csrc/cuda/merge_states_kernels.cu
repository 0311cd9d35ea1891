// The merge_attention_states instantiations the adapters use; torch-free, so nvcc never parses torch headers.
#include "arpg/merge_states.cuh"

namespace arpg {

template cudaError_t MergeStates<half>(const MergeStatesParams<half>&, cudaStream_t);
template cudaError_t MergeStates<__nv_bfloat16>(const MergeStatesParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t MergeStates<float>(const MergeStatesParams<float>&, cudaStream_t);

}  // namespace arpg
