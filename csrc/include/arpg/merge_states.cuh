// merge_attention_states: exact combination of two attentions over disjoint key sets.
#pragma once

#include <climits>

#include "arpg/common.cuh"
#include "arpg/merge_states.h"

namespace arpg {
namespace detail {

constexpr int kMergeStatesThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kMergeStatesThreads) MergeStatesKernel(const MergeStatesParams<T> p) {
  const int64_t idx = int64_t(blockIdx.x) * kMergeStatesThreads + threadIdx.x;
  if (idx >= p.num_rows * p.head_dim) return;
  const int64_t row = idx / p.head_dim;
  const float la = p.lse_a[row];
  const float lb = p.lse_b[row];
  const float m = fmaxf(la, lb);
  float value = 0.f;
  float lse = -INFINITY;
  if (m != -INFINITY) {
    // A side with lse -inf has weight 0 and its output is never read, so garbage there cannot leak in.
    const float wa = la == -INFINITY ? 0.f : expf(la - m);
    const float wb = lb == -INFINITY ? 0.f : expf(lb - m);
    const float sum = wa + wb;
    float acc = 0.f;
    if (wa > 0.f) acc += wa * TypeTraits<T>::ToFloat(p.out_a[idx]);
    if (wb > 0.f) acc += wb * TypeTraits<T>::ToFloat(p.out_b[idx]);
    value = acc / sum;
    lse = m + logf(sum);
  }
  p.out[idx] = TypeTraits<T>::FromFloat(value);
  if (idx % p.head_dim == 0) p.lse[row] = lse;
}

}  // namespace detail

template <typename T>
cudaError_t MergeStates(const MergeStatesParams<T>& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.head_dim <= 0) return cudaErrorInvalidValue;
  const int64_t total = p.num_rows * p.head_dim;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = CeilDiv<int64_t>(total, detail::kMergeStatesThreads);
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return detail::LaunchKernel(detail::MergeStatesKernel<T>, dim3(unsigned(blocks)), dim3(detail::kMergeStatesThreads),
                              0, stream, p);
}

}  // namespace arpg
