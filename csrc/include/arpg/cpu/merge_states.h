// Merging two attention states over disjoint key sets on the CPU: torch-free kernel code.
//   m = max(lse_a, lse_b) (0 if not finite), w_x = exp(lse_x - m), out = (out_a w_a + out_b w_b) / (w_a + w_b),
//   lse = m + log(w_a + w_b); two empty halves (w_a + w_b == 0) give out 0 and lse -inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace arpg {
namespace cpu {

template <typename T>
struct MergeStatesArgs {
  const T* out_a;  // [num_tokens, num_heads, head_dim], last dim contiguous
  const T* out_b;
  const float* lse_a;  // [num_tokens, num_heads]
  const float* lse_b;
  T* out;     // [num_tokens, num_heads, head_dim], contiguous
  float* lse; // [num_tokens, num_heads], contiguous
  int64_t a_stride_token, a_stride_head, b_stride_token, b_stride_head;
  int64_t lse_a_stride_token, lse_a_stride_head, lse_b_stride_token, lse_b_stride_head;
  int64_t num_heads, head_dim;
};

// Rows [begin, end) of the flattened (token, head) index.
template <typename T>
void MergeStatesRows(const MergeStatesArgs<T>& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = row / a.num_heads, h = row % a.num_heads;
    const float la = a.lse_a[t * a.lse_a_stride_token + h * a.lse_a_stride_head];
    const float lb = a.lse_b[t * a.lse_b_stride_token + h * a.lse_b_stride_head];
    float m = std::fmax(la, lb);
    if (!std::isfinite(m)) m = 0.0f;
    const float wa = std::exp(la - m), wb = std::exp(lb - m);
    const float denom = wa + wb;
    const bool empty = denom == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / denom;
    const float ca = wa * inv, cb = wb * inv;
    const T* xa = a.out_a + t * a.a_stride_token + h * a.a_stride_head;
    const T* xb = a.out_b + t * a.b_stride_token + h * a.b_stride_head;
    T* y = a.out + row * a.head_dim;
    if (empty) {
      for (int64_t d = 0; d < a.head_dim; ++d) y[d] = T(0.0f);
    } else if (cb == 0.0f || ca == 0.0f) {  // a side with no weight (an empty state) is not read: it may hold NaN
      const T* x = cb == 0.0f ? xa : xb;
      const float c = cb == 0.0f ? ca : cb;
      for (int64_t d = 0; d < a.head_dim; ++d) y[d] = T(static_cast<float>(x[d]) * c);
    } else {
      for (int64_t d = 0; d < a.head_dim; ++d) {
        y[d] = T(static_cast<float>(xa[d]) * ca + static_cast<float>(xb[d]) * cb);
      }
    }
    a.lse[row] = empty ? -std::numeric_limits<float>::infinity() : m + std::log(denom);
  }
}

}  // namespace cpu
}  // namespace arpg
