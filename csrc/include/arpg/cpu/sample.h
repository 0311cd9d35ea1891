// Token sampling on the CPU: torch-free kernel code. SampleRow draws one token from one row of logits with
// the semantics of arpg_kernels.reference.sample_tokens: classifier-free guidance u + (c - u) * scale,
// temperature, top-k then top-p filtering, and an inverse-CDF draw in float64 against the given uniform,
// in one pass over the row's memory per stage and no sort:
//   - top-k: the k-th largest logit by selection (std::nth_element), keeping every logit >= it (ties kept,
//     as torch.topk's threshold does);
//   - top-p: a weighted quickselect finds the smallest probability that is kept: token j stays when the mass
//     of the tokens strictly more likely than j is <= top_p (the reference's sorted exclusive cumsum; tied
//     tokens at the boundary all stay, where the reference keeps them in its sort's order);
//   - the draw: the first token (in vocabulary order) whose running float64 sum of kept probabilities
//     exceeds uniform * total, as torch.searchsorted on the reference's cumulative sum.
// Greedy (temperature <= 0): the first index of the largest guided logit, a NaN counting as the largest
// (torch.argmax).
// A row whose guided (tempered) logits hold a NaN or +inf, or are all -inf, gives V - 1 (the reference's
// clamp of a NaN cumulative sum).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "arpg/cpu/paged_attention.h"  // Vec8, ExpNonPositive8

namespace arpg {
namespace cpu {

struct SampleArgs {
  int64_t vocab;
  float temperature;  // <= 0: greedy
  int64_t top_k;      // 0: off
  double top_p;       // >= 1: off
};

constexpr int kSampleBlock = 64;  // tokens per partial sum of the draw's search (a multiple of 8)

// Scratch of one thread, reused across rows.
struct SampleScratch {
  std::vector<float> x;     // [V] guided, tempered logits
  std::vector<float> sel;   // [V] selection buffer
  std::vector<float> p;     // [V] unnormalised probabilities of the kept tokens
  std::vector<double> kept; // the nonzero ones, reordered by the top-p selection
  std::vector<double> block;  // [V / kSampleBlock] partial sums
};

// x[j] = u[j] + (c[j] - u[j]) * scale, without contraction into an FMA: the reference rounds the product
// before the sum. Not inlined (a function of its own optimisation options).
#if defined(__clang__)
inline void GuideRow(const float* c, const float* u, float scale, int64_t n, float* x) {
#pragma clang fp contract(off)
  for (int64_t j = 0; j < n; ++j) x[j] = u[j] + (c[j] - u[j]) * scale;
}
#elif defined(__GNUC__)
__attribute__((optimize("fp-contract=off"), noinline)) inline void GuideRow(const float* c, const float* u, float scale,
                                                                            int64_t n, float* x) {
  for (int64_t j = 0; j < n; ++j) x[j] = u[j] + (c[j] - u[j]) * scale;
}
#else
inline void GuideRow(const float* c, const float* u, float scale, int64_t n, float* x) {
  for (int64_t j = 0; j < n; ++j) x[j] = u[j] + (c[j] - u[j]) * scale;
}
#endif

typedef float Float4 __attribute__((vector_size(16)));
typedef double Double4 __attribute__((vector_size(32)));

// Smallest kept probability of top-p over p[0:n) (a copy the function reorders), total mass `total`.
inline double TopPThreshold(double* a, int64_t n, double total, double top_p) {
  const double budget = top_p * total;  // the reference compares normalised mass with top_p
  double before = 0.0;  // mass of the elements known to be larger than everything in a[lo:hi)
  int64_t lo = 0, hi = n;
  uint64_t state = 0x9e3779b97f4a7c15ull;  // pivot choice: a fixed sequence, so the result is deterministic
  while (hi - lo > 0) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const double pivot = a[lo + static_cast<int64_t>((state >> 33) % static_cast<uint64_t>(hi - lo))];
    // Three-way partition of a[lo:hi): greater, equal, less.
    int64_t g = lo, i = lo, l = hi;
    while (i < l) {
      if (a[i] > pivot) {
        std::swap(a[i++], a[g++]);
      } else if (a[i] < pivot) {
        std::swap(a[i], a[--l]);
      } else {
        ++i;
      }
    }
    double mass_g = 0.0, mass_e = 0.0;
    for (int64_t j = lo; j < g; ++j) mass_g += a[j];
    for (int64_t j = g; j < l; ++j) mass_e += a[j];
    if (before + mass_g > budget) {  // the first token past the budget is among the greater ones
      hi = g;
      continue;
    }
    if (before + mass_g + mass_e > budget || l == hi) return pivot;  // the equal ones are kept, nothing after
    before += mass_g + mass_e;
    lo = l;
  }
  return 0.0;  // not reached: a[lo] always has before <= budget
}

// One row: cond [V] (and uncond [V] with scale, or nullptr), uniform in [0, 1). Returns the token.
ARPG_CPU_INLINE int64_t SampleRowImpl(const SampleArgs& a, const float* cond, const float* uncond, float scale,
                                      double uniform, SampleScratch& w) {
  const int64_t n = a.vocab;
  const int64_t padded = (n + 7) / 8 * 8;
  const float ninf = -std::numeric_limits<float>::infinity();
  w.x.resize(padded);
  float* x = w.x.data();
  if (uncond != nullptr) {
    GuideRow(cond, uncond, scale, n, x);
  } else {
    std::copy(cond, cond + n, x);
  }
  std::fill(x + n, x + padded, ninf);
  // The largest logit, and whether there is a NaN (v != v), eight lanes at a time.
  Vec8 vmax = Splat8(ninf);
  Int8 nan = {};
  for (int64_t j = 0; j < padded; j += 8) {
    const Vec8 v = Load8(x + j);
    nan |= v != v;
    vmax = Select8(v > vmax, v, vmax);
  }
  float mx = ninf;
  bool any_nan = false;
  for (int i = 0; i < 8; ++i) {
    mx = std::max(mx, vmax[i]);
    any_nan = any_nan || nan[i] != 0;
  }
  if (a.temperature <= 0.0f) {  // the first largest, a NaN counting as largest (torch.argmax)
    if (any_nan) return std::find_if(x, x + n, [](float v) { return v != v; }) - x;
    return std::find(x, x + n, mx) - x;
  }
  if (any_nan) return n - 1;
  if (a.temperature != 1.0f) {  // x / 1 is x: skip the pass
    const Vec8 t = Splat8(a.temperature);
    for (int64_t j = 0; j < padded; j += 8) Store8(x + j, Load8(x + j) / t);
    mx = mx / a.temperature;
  }
  if (!std::isfinite(mx)) return n - 1;  // all -inf, or an inf: the reference's softmax is NaN

  float kth = ninf;
  if (a.top_k > 0 && a.top_k < n) {
    w.sel.assign(x, x + n);
    std::nth_element(w.sel.begin(), w.sel.begin() + (a.top_k - 1), w.sel.end(), std::greater<float>());
    kth = w.sel[a.top_k - 1];
  }
  // Probabilities of the tokens top-k keeps, unnormalised (the largest is 1), in float as the reference's
  // softmax; every sum over them in double.
  w.p.resize(padded);
  float* p = w.p.data();
  const Vec8 vmx = Splat8(mx), vkth = Splat8(kth), zero = {};
  for (int64_t j = 0; j < padded; j += 8) {
    const Vec8 v = Load8(x + j);
    const Vec8 d = v - vmx;  // below -87 the polynomial's clamp would give exp(-87), not ~0: those are 0
    Store8(p + j, Select8((v >= vkth) & (d >= Splat8(-87.0f)), ExpNonPositive8(d), zero));
  }
  if (a.top_p < 1.0) {
    double total = 0.0;
    w.kept.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] > 0.0f) {
        w.kept.push_back(p[j]);
        total += p[j];
      }
    }
    const double tau = TopPThreshold(w.kept.data(), static_cast<int64_t>(w.kept.size()), total, a.top_p);
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] < tau) p[j] = 0.0f;
    }
  }
  // The draw: block sums (four-lane double accumulators), then the block that holds uniform * total,
  // then its tokens one by one.
  const int64_t blocks = (n + kSampleBlock - 1) / kSampleBlock;
  w.block.resize(blocks);
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kSampleBlock, end = std::min(padded, begin + kSampleBlock);
    Double4 acc0 = {}, acc1 = {};
    for (int64_t j = begin; j < end; j += 8) {
      Float4 lo, hi;
      __builtin_memcpy(&lo, p + j, sizeof(lo));
      __builtin_memcpy(&hi, p + j + 4, sizeof(hi));
      acc0 += __builtin_convertvector(lo, Double4);
      acc1 += __builtin_convertvector(hi, Double4);
    }
    const Double4 acc = acc0 + acc1;
    w.block[b] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    total += w.block[b];
  }
  const double target = uniform * total;
  double run = 0.0;
  int64_t last = -1;
  for (int64_t b = 0; b < blocks; ++b) {
    if (w.block[b] == 0.0) continue;
    const int64_t begin = b * kSampleBlock, end = std::min(n, begin + kSampleBlock);
    if (run + w.block[b] <= target) {
      run += w.block[b];
      for (int64_t j = end - 1; j >= begin; --j) {
        if (p[j] > 0.0f) {
          last = j;
          break;
        }
      }
      continue;
    }
    for (int64_t j = begin; j < end; ++j) {
      if (p[j] == 0.0f) continue;
      run += p[j];
      last = j;
      if (run > target) return j;
    }
  }
  return last < 0 ? n - 1 : last;  // rounding: uniform * total reached the sum's end; the last kept token
}

inline int64_t SampleRowBaseline(const SampleArgs& a, const float* cond, const float* uncond, float scale,
                                 double uniform, SampleScratch& w) {
  return SampleRowImpl(a, cond, uncond, scale, uniform, w);
}

#ifdef ARPG_CPU_HAS_AVX2_PATH
__attribute__((target("avx2,fma"))) inline int64_t SampleRowAvx2(const SampleArgs& a, const float* cond,
                                                                  const float* uncond, float scale, double uniform,
                                                                  SampleScratch& w) {
  return SampleRowImpl(a, cond, uncond, scale, uniform, w);
}
#endif

// The same code for the baseline ISA and, on x86-64, AVX2 + FMA, picked at run time.
inline int64_t SampleRow(const SampleArgs& a, const float* cond, const float* uncond, float scale, double uniform,
                         SampleScratch& w) {
#ifdef ARPG_CPU_HAS_AVX2_PATH
  if (CpuHasAvx2Fma()) return SampleRowAvx2(a, cond, uncond, scale, uniform, w);
#endif
  return SampleRowBaseline(a, cond, uncond, scale, uniform, w);
}

}  // namespace cpu
}  // namespace arpg
