// The append_kv instantiations the adapters use; torch-free, so nvcc never parses torch headers.
#include "arpg/append_kv.cuh"

namespace arpg {

template cudaError_t AppendKV<half>(const AppendKVParams<half>&, cudaStream_t);
template cudaError_t AppendKV<__nv_bfloat16>(const AppendKVParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t AppendKV<float>(const AppendKVParams<float>&, cudaStream_t);

}  // namespace arpg
