// Host and device helpers of the arpg kernels that any C++ compiler can see.
//
// The headers under arpg/ know nothing about torch. Each op has a plain C++ header (`<op>.h`: the
// parameter struct and the launcher's declaration, for adapters compiled by the host compiler) and a
// CUDA header (`<op>.cuh`: templated __global__ kernels and the launcher's definition, which takes raw
// pointers, sizes, strides and a cudaStream_t and returns cudaError_t).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace arpg {

template <typename T>
__host__ __device__ __forceinline__ constexpr T CeilDiv(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ __forceinline__ constexpr T Min(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
__host__ __device__ __forceinline__ constexpr T Max(T a, T b) {
  return a < b ? b : a;
}

__host__ __device__ __forceinline__ bool IsPowerOfTwo(int64_t x) {
  return x > 0 && (x & (x - 1)) == 0;
}

__host__ __device__ __forceinline__ int Log2(int64_t x) {
  int n = 0;
  while ((int64_t(1) << n) < x) ++n;
  return n;
}

}  // namespace arpg
