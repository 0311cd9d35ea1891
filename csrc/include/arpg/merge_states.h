// merge_attention_states: exact combination of two attentions over disjoint key sets (host-side declarations).
#pragma once

#include "arpg/common.h"

namespace arpg {

template <typename T>
struct MergeStatesParams {
  const T* out_a;      // [num_rows, head_dim], contiguous (num_rows = tokens * heads)
  const float* lse_a;  // [num_rows]
  const T* out_b;
  const float* lse_b;
  T* out;
  float* lse;
  int64_t num_rows;
  int head_dim;
};

// out = (w_a out_a + w_b out_b) / (w_a + w_b), w = exp(lse - max), lse = max + log(w_a + w_b); a side
// with lse -inf has weight 0 and its output is never read; two empty sides give 0 and -inf.
// Instantiated for T in {half, __nv_bfloat16, float} (csrc/cuda/merge_states_kernels.cu).
template <typename T>
cudaError_t MergeStates(const MergeStatesParams<T>& p, cudaStream_t stream);

}  // namespace arpg
