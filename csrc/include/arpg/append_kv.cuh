// append_kv: scatter new K/V rows into their cache slots (slot = page * page_size + offset; -1 skips).
// One thread moves one 16/8/4/2-byte chunk of one (token, head) row.
#pragma once

#include <climits>

#include "arpg/append_kv.h"
#include "arpg/common.cuh"

namespace arpg {
namespace detail {

constexpr int kAppendThreads = 256;

template <int VEC>
struct VecType;
template <>
struct VecType<16> {
  using type = uint4;
};
template <>
struct VecType<8> {
  using type = uint2;
};
template <>
struct VecType<4> {
  using type = uint32_t;
};
template <>
struct VecType<2> {
  using type = uint16_t;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kAppendThreads) AppendKVKernel(const AppendKVParams<T> p) {
  using Vec = typename VecType<VEC>::type;
  const int64_t chunks = int64_t(p.head_dim) * sizeof(T) / VEC;
  const int64_t idx = int64_t(blockIdx.x) * kAppendThreads + threadIdx.x;
  if (idx >= int64_t(p.num_tokens) * p.num_kv_heads * chunks) return;
  const int64_t chunk = idx % chunks;
  const int64_t head = (idx / chunks) % p.num_kv_heads;
  const int64_t token = idx / chunks / p.num_kv_heads;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot >= int64_t(p.num_pages) * p.page_size) return;
  const int64_t page = slot / p.page_size;
  const int64_t offset = slot % p.page_size;
  const T* k = p.k + token * p.k_stride_token + head * p.k_stride_head;
  const T* v = p.v + token * p.v_stride_token + head * p.v_stride_head;
  T* kc = p.k_cache + page * p.k_cache_stride_page + offset * p.k_cache_stride_token + head * p.k_cache_stride_head;
  T* vc = p.v_cache + page * p.v_cache_stride_page + offset * p.v_cache_stride_token + head * p.v_cache_stride_head;
  reinterpret_cast<Vec*>(kc)[chunk] = reinterpret_cast<const Vec*>(k)[chunk];
  reinterpret_cast<Vec*>(vc)[chunk] = reinterpret_cast<const Vec*>(v)[chunk];
}

}  // namespace detail

// Widest access (16, 8, 4 bytes, else the element size) that divides the row size, every byte
// stride and every base address.
template <typename T>
int AppendKVVectorBytes(const AppendKVParams<T>& p) {
  const int64_t es = sizeof(T);
  const int64_t values[] = {int64_t(p.head_dim) * es,
                            p.k_stride_token * es,
                            p.k_stride_head * es,
                            p.v_stride_token * es,
                            p.v_stride_head * es,
                            p.k_cache_stride_page * es,
                            p.k_cache_stride_token * es,
                            p.k_cache_stride_head * es,
                            p.v_cache_stride_page * es,
                            p.v_cache_stride_token * es,
                            p.v_cache_stride_head * es,
                            int64_t(reinterpret_cast<uintptr_t>(p.k)),
                            int64_t(reinterpret_cast<uintptr_t>(p.v)),
                            int64_t(reinterpret_cast<uintptr_t>(p.k_cache)),
                            int64_t(reinterpret_cast<uintptr_t>(p.v_cache))};
  for (int vec = 16; vec > int(sizeof(T)); vec /= 2) {
    bool ok = true;
    for (int64_t x : values) ok = ok && x % vec == 0;
    if (ok) return vec;
  }
  return int(sizeof(T));
}

template <typename T>
cudaError_t AppendKV(const AppendKVParams<T>& p, cudaStream_t stream) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "append_kv moves 2- or 4-byte elements");
  if (p.num_tokens < 0 || p.num_kv_heads < 0 || p.head_dim < 0 || p.num_pages < 0 || p.page_size <= 0) {
    return cudaErrorInvalidValue;
  }
  const int vec = AppendKVVectorBytes(p);
  const int64_t total = int64_t(p.num_tokens) * p.num_kv_heads * (int64_t(p.head_dim) * int64_t(sizeof(T)) / vec);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = CeilDiv<int64_t>(total, detail::kAppendThreads);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid{unsigned(blocks)};
  const dim3 block{unsigned(detail::kAppendThreads)};
  switch (vec) {
    case 16:
      return detail::LaunchKernel(detail::AppendKVKernel<T, 16>, grid, block, 0, stream, p);
    case 8:
      return detail::LaunchKernel(detail::AppendKVKernel<T, 8>, grid, block, 0, stream, p);
    case 4:
      return detail::LaunchKernel(detail::AppendKVKernel<T, 4>, grid, block, 0, stream, p);
    default:
      return detail::LaunchKernel(detail::AppendKVKernel<T, sizeof(T) == 2 ? 2 : 4>, grid, block, 0, stream, p);
  }
}

}  // namespace arpg
