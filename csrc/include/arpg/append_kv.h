// append_kv: scatter new K/V rows into their cache slots (host-side declarations).
#pragma once

#include "arpg/common.h"

namespace arpg {

// All strides are in elements; the head_dim axis is contiguous. k/v already have the cache dtype.
template <typename T>
struct AppendKVParams {
  const T* k;                   // [num_tokens, num_kv_heads, head_dim]
  const T* v;                   // [num_tokens, num_kv_heads, head_dim]
  T* k_cache;                   // [num_pages, page_size, num_kv_heads, head_dim]
  T* v_cache;                   // [num_pages, page_size, num_kv_heads, head_dim]
  const int64_t* slot_mapping;  // [num_tokens], slot = page * page_size + offset; -1 skips the row
  int64_t k_stride_token, k_stride_head;
  int64_t v_stride_token, v_stride_head;
  int64_t k_cache_stride_page, k_cache_stride_token, k_cache_stride_head;
  int64_t v_cache_stride_page, v_cache_stride_token, v_cache_stride_head;
  int num_tokens, num_kv_heads, head_dim;
  int num_pages, page_size;
};

// Writes row t of k/v to slot slot_mapping[t]; slots < 0 or past the cache are dropped.
// Instantiated for T in {half, __nv_bfloat16, float} (csrc/cuda/append_kv_kernels.cu).
template <typename T>
cudaError_t AppendKV(const AppendKVParams<T>& p, cudaStream_t stream);

}  // namespace arpg
