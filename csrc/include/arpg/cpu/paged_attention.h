// Paged attention on the CPU: torch-free kernel code. One call of PagedAttentionBlock serves one work
// item: the queries [q_begin, q_end) of one sequence, for all heads of one KV head's group, against
// that sequence's pages, read in place (no gather, no allocation proportional to the cache). Online
// softmax over one page of keys at a time; float accumulation for any storage type T (float,
// c10::Half, c10::BFloat16: anything with static_cast<float> and construction from float).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace arpg {
namespace cpu {

template <typename T>
struct PagedAttentionArgs {
  const T* q;            // [num_tokens, num_heads, head_dim], last dim contiguous
  const T* k_cache;      // [num_pages, page_size, num_kv_heads, head_dim]
  const T* v_cache;
  const int32_t* block_table;  // [num_seqs, max_pages]
  const int32_t* kv_lens;      // [num_seqs]
  const int32_t* cu_q_lens;    // [num_seqs + 1]
  T* out;                // [num_tokens, num_heads, head_dim], zero where no key is visible
  float* lse;            // [num_tokens, num_heads] natural-log LSE, or nullptr
  int64_t q_stride_token, q_stride_head;
  int64_t out_stride_token, out_stride_head;
  int64_t k_stride_page, k_stride_token, k_stride_head;
  int64_t v_stride_page, v_stride_token, v_stride_head;
  int64_t block_table_stride;
  int64_t lse_stride_token;
  int num_heads, num_kv_heads, head_dim, num_pages, page_size, max_pages;
  bool causal;
  float scale;
};

// Scratch of one thread, reused across work items.
struct PagedAttentionScratch {
  std::vector<float> q, acc, m, l, kt, v, s;
};

#if defined(__GNUC__) || defined(__clang__)
#define ARPG_CPU_INLINE inline __attribute__((always_inline))
#else
#define ARPG_CPU_INLINE inline
#endif

// exp(x) for x <= 0 in float, to about 1 ulp (Cephes' expf polynomial), written without calls or
// branches so that a loop of it vectorizes (std::exp does not): 2^n * exp(r), n = round(x log2 e).
ARPG_CPU_INLINE float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const int n = static_cast<int>(x * 1.44269504088896341f - 0.5f);  // x <= 0: truncation rounds to nearest
  const float fn = static_cast<float>(n);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  union {
    int32_t i;
    float f;
  } scale;
  scale.i = (n + 127) << 23;
  return y * scale.f;
}

template <typename T>
ARPG_CPU_INLINE void PagedAttentionBlockImpl(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin,
                                             int q_end, PagedAttentionScratch& w) {
  const int64_t q0 = a.cu_q_lens[seq];
  const int q_len = static_cast<int>(a.cu_q_lens[seq + 1] - q0);
  q_end = std::min(q_end, q_len);
  if (q_begin >= q_end) return;
  const int max_kv = a.max_pages * a.page_size;
  const int kv_len = std::min(std::max(a.kv_lens[seq], 0), max_kv);
  const int group = a.num_heads / a.num_kv_heads;
  const int dim = a.head_dim;
  const int ps = a.page_size;
  const int rows = (q_end - q_begin) * group;  // row r: query q_begin + r / group, head kv_head * group + r % group
  const float neg_inf = -std::numeric_limits<float>::infinity();

  w.q.resize(static_cast<size_t>(rows) * dim);
  w.acc.assign(static_cast<size_t>(rows) * dim, 0.0f);
  w.m.assign(rows, neg_inf);
  w.l.assign(rows, 0.0f);
  w.kt.resize(static_cast<size_t>(ps) * dim);  // the page's keys transposed, [dim][ps]: scores vectorize over keys
  w.v.resize(static_cast<size_t>(ps) * dim);
  w.s.resize(ps);
  for (int r = 0; r < rows; ++r) {
    const T* src = a.q + (q0 + q_begin + r / group) * a.q_stride_token + (kv_head * group + r % group) * a.q_stride_head;
    float* dst = &w.q[static_cast<size_t>(r) * dim];
    for (int d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]) * a.scale;
  }
  // Keys visible to query i: j < limit(i) = kv_len - q_len + i + 1 (causal, bottom-right) or kv_len.
  auto limit = [&](int i) { return a.causal ? std::min(kv_len, std::max(kv_len - q_len + i + 1, 0)) : kv_len; };
  const int span = limit(q_end - 1);
  const int32_t* pages = a.block_table + static_cast<int64_t>(seq) * a.block_table_stride;
  float* kt = w.kt.data();
  float* vt = w.v.data();
  float* s = w.s.data();

  for (int start = 0; start < span; start += ps) {
    const int page = std::min(std::max(pages[start / ps], 0), a.num_pages - 1);
    const int nk = std::min(ps, span - start);
    const T* kp = a.k_cache + page * a.k_stride_page + kv_head * a.k_stride_head;
    const T* vp = a.v_cache + page * a.v_stride_page + kv_head * a.v_stride_head;
    for (int j = 0; j < nk; ++j) {
      const T* krow = kp + j * a.k_stride_token;
      for (int d = 0; d < dim; ++d) kt[static_cast<size_t>(d) * ps + j] = static_cast<float>(krow[d]);
      const T* vrow = vp + j * a.v_stride_token;
      float* vdst = vt + static_cast<size_t>(j) * dim;
      for (int d = 0; d < dim; ++d) vdst[d] = static_cast<float>(vrow[d]);
    }
    for (int r = 0; r < rows; ++r) {
      const int visible = std::min(nk, limit(q_begin + r / group) - start);
      if (visible <= 0) continue;
      const float* qr = &w.q[static_cast<size_t>(r) * dim];
      for (int j = 0; j < nk; ++j) s[j] = 0.0f;
      for (int d = 0; d < dim; ++d) {
        const float qd = qr[d];
        const float* kd = kt + static_cast<size_t>(d) * ps;
        for (int j = 0; j < nk; ++j) s[j] += qd * kd[j];
      }
      float mx = w.m[r];
      for (int j = 0; j < visible; ++j) mx = std::max(mx, s[j]);
      float* acc = &w.acc[static_cast<size_t>(r) * dim];
      const float corr = w.m[r] == neg_inf ? 0.0f : ExpNonPositive(w.m[r] - mx);
      for (int j = 0; j < nk; ++j) s[j] = ExpNonPositive(s[j] - mx);
      for (int j = visible; j < nk; ++j) s[j] = 0.0f;  // keys past this query's causal limit
      float l = 0.0f;
      for (int j = 0; j < visible; ++j) l += s[j];
      w.l[r] = w.l[r] * corr + l;
      w.m[r] = mx;
      for (int d = 0; d < dim; ++d) acc[d] *= corr;
      for (int j = 0; j < visible; ++j) {
        const float p = s[j];
        const float* vr = vt + static_cast<size_t>(j) * dim;
        for (int d = 0; d < dim; ++d) acc[d] += p * vr[d];
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t token = q0 + q_begin + r / group;
    const int head = kv_head * group + r % group;
    T* dst = a.out + token * a.out_stride_token + head * a.out_stride_head;
    const float l = w.l[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float* acc = &w.acc[static_cast<size_t>(r) * dim];
    for (int d = 0; d < dim; ++d) dst[d] = T(acc[d] * inv);
    if (a.lse != nullptr) a.lse[token * a.lse_stride_token + head] = l > 0.0f ? w.m[r] + std::log(l) : neg_inf;
  }
}

// The same code compiled for the baseline ISA and, on x86-64, for AVX2 + FMA; PagedAttentionBlock picks
// at run time (never -march=native at build time, so one binary runs on every x86-64 CPU).
template <typename T>
void PagedAttentionBlockBaseline(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin, int q_end,
                                 PagedAttentionScratch& w) {
  PagedAttentionBlockImpl(a, seq, kv_head, q_begin, q_end, w);
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ARPG_CPU_HAS_AVX2_PATH 1
template <typename T>
__attribute__((target("avx2,fma"))) void PagedAttentionBlockAvx2(const PagedAttentionArgs<T>& a, int seq,
                                                                  int kv_head, int q_begin, int q_end,
                                                                  PagedAttentionScratch& w) {
  PagedAttentionBlockImpl(a, seq, kv_head, q_begin, q_end, w);
}

inline bool CpuHasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename T>
void PagedAttentionBlock(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin, int q_end,
                         PagedAttentionScratch& w) {
#ifdef ARPG_CPU_HAS_AVX2_PATH
  if (CpuHasAvx2Fma()) return PagedAttentionBlockAvx2(a, seq, kv_head, q_begin, q_end, w);
#endif
  PagedAttentionBlockBaseline(a, seq, kv_head, q_begin, q_end, w);
}

}  // namespace cpu
}  // namespace arpg
