// The elementwise chains of a decoding step on the CPU, one pass each: RMSNorm (with the residual add
// before it), SwiGLU's silu(a) * b and RoPE. Torch-free kernel code for one row at a time; T is the storage
// type (float, c10::Half, c10::BFloat16: anything with static_cast<float> and construction from float).
// Each rounds where the torch ops it replaces round (arpg/model.py's RMSNorm, FeedForward, apply_rope), so
// only the order of a float sum differs.
#pragma once

#include <cmath>
#include <cstdint>

#include "arpg/cpu/paged_attention.h"  // Vec8 and its exp

namespace arpg {
namespace cpu {

// (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) in float for the D / 2 pairs of one row, each product rounded
// before the sum as torch's ops do (no FMA contraction). table: (cos, sin) per pair.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
inline void RotatePairs(const float* x, const float* table, int64_t pairs, float* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t i = 0; i < pairs; ++i) {
    const float c = table[2 * i], s = table[2 * i + 1], x0 = x[2 * i], x1 = x[2 * i + 1];
    out[2 * i] = x0 * c - x1 * s;
    out[2 * i + 1] = x1 * c + x0 * s;
  }
}

// Sum of squares of n floats in eight interleaved partial sums (vectorizes; torch's mean also sums in
// float, in lanes).
inline float SumOfSquares(const float* x, int64_t n) {
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += x[i + j] * x[i + j];
  }
  for (; i < n; ++i) part[i % 8] += x[i] * x[i];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// out = T(x * rsqrt(mean(x^2) + eps)) * weight, x already in float (n values); RMSNorm's roundings: the
// normalized value in T, then the product with the weight in T.
template <typename T>
inline void RmsNormRow(const float* x, const T* weight, int64_t n, float eps, T* out) {
  const float r = 1.0f / std::sqrt(SumOfSquares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = T(static_cast<float>(T(x[i] * r)) * static_cast<float>(weight[i]));
  }
}

// silu(x) = x * sigmoid(x) on eight lanes, with exp of -|x| only (ExpNonPositive8's range): sigmoid is
// 1 / (1 + e) for x >= 0 and e / (1 + e) below, e = exp(-|x|). Within a few ulp of torch's x / (1 + exp(-x));
// below -87, where the exp stops, sigmoid is 0 (so -inf gives NaN, as torch's does).
ARPG_CPU_INLINE Vec8 Silu8(Vec8 x) {
  const Int8 neg = x < Splat8(0.0f);
  const Vec8 e = ExpNonPositive8(Select8(neg, x, -x));
  const Vec8 sigmoid = Select8(neg, e, Splat8(1.0f)) / (Splat8(1.0f) + e);
  return x * Select8(x < Splat8(-87.0f), Splat8(0.0f), sigmoid);
}

// silu(a) * b for n values: silu rounded to T (torch's silu), then the product. x: scratch of n rounded up
// to 8 floats. Three flat loops (convert, silu on whole vectors, product), each vectorized.
template <typename T>
ARPG_CPU_INLINE void SiluMulRow(const T* a, const T* b, int64_t n, float* x, T* out) {
  const int64_t padded = (n + 7) / 8 * 8;
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(a[i]);
  for (int64_t i = n; i < padded; ++i) x[i] = 0.0f;
  for (int64_t i = 0; i < padded; i += 8) Store8(x + i, Silu8(Load8(x + i)));
  for (int64_t i = 0; i < n; ++i) out[i] = T(static_cast<float>(T(x[i])) * static_cast<float>(b[i]));
}

}  // namespace cpu
}  // namespace arpg
