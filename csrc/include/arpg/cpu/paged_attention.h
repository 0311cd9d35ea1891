// Paged attention on the CPU: torch-free kernel code. One call of PagedAttentionBlock serves one work
// item: the queries [q_begin, q_end) of one sequence, for all heads of one KV head's group, against
// that sequence's pages, read in place (no gather, no allocation proportional to the cache). Online
// softmax over tiles of kKeyTile keys (a tile may span pages of any size), each tile converted once
// to float and shared by every row of the item; float accumulation for any storage type T (float,
// c10::Half, c10::BFloat16: anything with static_cast<float> and construction from float).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
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

// Scratch of one thread, reused across work items. dv = head_dim rounded up to 8 (zero padded).
struct PagedAttentionScratch {
  std::vector<float> q;     // [rows][dv], scaled
  std::vector<float> acc;   // [rows][dv]
  std::vector<float> m, corr;  // [rows]
  std::vector<float> l;        // [rows][8]
  std::vector<float> k, v;  // [kKeyTile][dv]: one tile of keys and values, gathered across pages
  std::vector<float> s;     // [rows][kKeyTile]: scores, then probabilities
};

#if defined(__GNUC__) || defined(__clang__)
#define ARPG_CPU_INLINE inline __attribute__((always_inline))
#else
#error "arpg/cpu/paged_attention.h needs GCC or Clang (vector extensions)"
#endif

constexpr int kKeyTile = 16;  // keys per online-softmax step, whatever the page size

// Eight floats. GCC/Clang vector extensions compile to the widest registers of the function's target:
// two SSE or NEON registers in the baseline build, one AVX register in the AVX2 clone below.
typedef float Vec8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ARPG_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define ARPG_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, Int8{__VA_ARGS__})
#endif

ARPG_CPU_INLINE Vec8 Load8(const float* p) {
  Vec8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
ARPG_CPU_INLINE void Store8(float* p, Vec8 v) { __builtin_memcpy(p, &v, sizeof(v)); }
ARPG_CPU_INLINE Vec8 Splat8(float x) { return Vec8{x, x, x, x, x, x, x, x}; }
ARPG_CPU_INLINE Vec8 Select8(Int8 mask, Vec8 a, Vec8 b) {  // mask lanes are -1 or 0
  return reinterpret_cast<Vec8>((reinterpret_cast<Int8>(a) & mask) | (reinterpret_cast<Int8>(b) & ~mask));
}

// exp(x) for x <= 0 in float, to about 1 ulp (Cephes' expf polynomial), branch-free so that it
// vectorizes: 2^n * exp(r), n = round(x log2 e). Inputs below -87 give exp(-87), not 0.
ARPG_CPU_INLINE Vec8 ExpNonPositive8(Vec8 x) {
  const Vec8 lo = Splat8(-87.0f);
  x = Select8(x < lo, lo, x);
  const Int8 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, Int8);  // x <= 0: truncation rounds
  const Vec8 fn = __builtin_convertvector(n, Vec8);
  Vec8 r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  Vec8 y = Splat8(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * reinterpret_cast<Vec8>((n + 127) << 23);
}

ARPG_CPU_INLINE float ExpNonPositive(float x) { return ExpNonPositive8(Splat8(x))[0]; }

// Lane i of the result is the sum of the lanes of v[i]: eight horizontal sums in seven adds.
ARPG_CPU_INLINE Vec8 TransposeSum8(const Vec8* v) {
  Vec8 t[4], u[2];
  for (int i = 0; i < 4; ++i) {
    t[i] = ARPG_SHUFFLE(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           ARPG_SHUFFLE(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {
    u[i] = ARPG_SHUFFLE(t[2 * i], t[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           ARPG_SHUFFLE(t[2 * i], t[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return ARPG_SHUFFLE(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) + ARPG_SHUFFLE(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// Scores of R query rows against KB keys (R * KB <= 8): dot products over dv (a multiple of 8), all
// R * KB accumulators live in registers, one transpose-sum at the end. s: row r's scores at s[r * kKeyTile].
// k: key b's row at k + b * ks (ks: elements between keys; dv for a gathered tile, the cache's token
// stride when the tile is read in place).
template <int R, int KB>
ARPG_CPU_INLINE void ScoreBlock(const float* q, const float* k, int64_t ks, int dv, float* s) {
  static_assert(R * KB <= 8, "at most eight accumulators");
  Vec8 acc[8] = {};
  for (int d = 0; d < dv; d += 8) {
    Vec8 kv[KB];
    for (int b = 0; b < KB; ++b) kv[b] = Load8(k + b * ks + d);
    for (int r = 0; r < R; ++r) {
      const Vec8 qv = Load8(q + r * dv + d);
      for (int b = 0; b < KB; ++b) acc[r * KB + b] += qv * kv[b];
    }
  }
  const Vec8 sums = TransposeSum8(acc);
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < KB; ++b) s[r * kKeyTile + b] = sums[r * KB + b];
  }
}

// Scores of `rows` rows against the kKeyTile keys of the tile.
ARPG_CPU_INLINE void ScoreTile(const float* q, const float* k, int64_t ks, int rows, int dv, float* s) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    for (int j = 0; j < kKeyTile; j += 2) ScoreBlock<4, 2>(q + r * dv, k + j * ks, ks, dv, s + r * kKeyTile + j);
  }
  const float* qr = q + r * dv;
  float* sr = s + r * kKeyTile;
  switch (rows - r) {
    case 3:
      for (int j = 0; j < kKeyTile; j += 2) ScoreBlock<3, 2>(qr, k + j * ks, ks, dv, sr + j);
      break;
    case 2:
      for (int j = 0; j < kKeyTile; j += 4) ScoreBlock<2, 4>(qr, k + j * ks, ks, dv, sr + j);
      break;
    case 1:
      for (int j = 0; j < kKeyTile; j += 8) ScoreBlock<1, 8>(qr, k + j * ks, ks, dv, sr + j);
      break;
    default:
      break;
  }
}

// acc[r][d0 : d0 + 8C] = acc * corr[r] + sum_j p[r][j] v[j][d0 : d0 + 8C] for R rows, all kKeyTile keys;
// value j's row at v + j * vs.
template <int R, int C>
ARPG_CPU_INLINE void PvBlock(float* acc, const float* p, const float* corr, const float* v, int64_t vs, int dv) {
  Vec8 o[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) o[r][c] = Load8(acc + r * dv + 8 * c) * corr[r];
  }
  for (int j = 0; j < kKeyTile; ++j) {
    Vec8 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = Load8(v + j * vs + 8 * c);
    for (int r = 0; r < R; ++r) {
      const Vec8 pr = Splat8(p[r * kKeyTile + j]);
      for (int c = 0; c < C; ++c) o[r][c] += pr * vv[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) Store8(acc + r * dv + 8 * c, o[r][c]);
  }
}

template <int R, int C>
ARPG_CPU_INLINE void PvRows(float* acc, const float* p, const float* corr, const float* v, int64_t vs, int dv) {
  int d = 0;
  for (; d + 8 * C <= dv; d += 8 * C) PvBlock<R, C>(acc + d, p, corr, v + d, vs, dv);
  for (; d < dv; d += 8) PvBlock<R, 1>(acc + d, p, corr, v + d, vs, dv);
}

ARPG_CPU_INLINE void PvTile(float* acc, const float* p, const float* corr, const float* v, int64_t vs, int rows,
                            int dv) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) PvRows<4, 2>(acc + r * dv, p + r * kKeyTile, corr + r, v, vs, dv);
  switch (rows - r) {
    case 3:
      PvRows<3, 2>(acc + r * dv, p + r * kKeyTile, corr + r, v, vs, dv);
      break;
    case 2:
      PvRows<2, 4>(acc + r * dv, p + r * kKeyTile, corr + r, v, vs, dv);
      break;
    case 1:
      PvRows<1, 4>(acc + r * dv, p + r * kKeyTile, corr + r, v, vs, dv);
      break;
    default:
      break;
  }
}

template <typename T>
ARPG_CPU_INLINE void ToFloat(const T* src, float scale, int n, float* dst) {
  for (int d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]) * scale;
}
template <typename T>
ARPG_CPU_INLINE void ToFloat(const T* src, int n, float* dst) {
  for (int d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
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
  const int dv = (dim + 7) / 8 * 8;
  const int ps = a.page_size;
  const int rows = (q_end - q_begin) * group;  // row r: query q_begin + r / group, head kv_head * group + r % group
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // Keys visible to query i: j < limit(i) = kv_len - q_len + i + 1 (causal, bottom-right) or kv_len.
  auto limit = [&](int i) { return a.causal ? std::min(kv_len, std::max(kv_len - q_len + i + 1, 0)) : kv_len; };
  const int span = limit(q_end - 1);
  if (span <= 0) return;  // the caller's output is already 0 and its LSE -inf

  w.q.assign(static_cast<size_t>(rows) * dv, 0.0f);
  w.acc.assign(static_cast<size_t>(rows) * dv, 0.0f);
  w.m.assign(rows, neg_inf);
  w.l.assign(static_cast<size_t>(rows) * 8, 0.0f);  // per row, eight partial sums: reduced once at the end
  w.corr.resize(rows);
  w.k.assign(static_cast<size_t>(kKeyTile) * dv, 0.0f);
  w.v.assign(static_cast<size_t>(kKeyTile) * dv, 0.0f);
  w.s.resize(static_cast<size_t>(rows) * kKeyTile);
  for (int r = 0; r < rows; ++r) {
    ToFloat(a.q + (q0 + q_begin + r / group) * a.q_stride_token + (kv_head * group + r % group) * a.q_stride_head,
            a.scale, dim, &w.q[static_cast<size_t>(r) * dv]);
  }
  const int32_t* pages = a.block_table + static_cast<int64_t>(seq) * a.block_table_stride;
  float* kt = w.k.data();
  float* vt = w.v.data();
  float* s = w.s.data();
  float* corr = w.corr.data();

  // The rows of the tile after `start`, asked of the memory system while this one is computed: pages are
  // scattered, so the hardware prefetcher cannot guess them.
  auto prefetch = [&](int start) {
    const int end = std::min(start + kKeyTile, span);
    for (int key = start; key < end; ++key) {
      const int64_t page = std::min(std::max(pages[key / ps], 0), a.num_pages - 1);
      const T* kr = a.k_cache + page * a.k_stride_page + (key % ps) * a.k_stride_token + kv_head * a.k_stride_head;
      const T* vr = a.v_cache + page * a.v_stride_page + (key % ps) * a.v_stride_token + kv_head * a.v_stride_head;
      for (int64_t off = 0; off < static_cast<int64_t>(dim * sizeof(T)); off += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(kr) + off);
        __builtin_prefetch(reinterpret_cast<const char*>(vr) + off);
      }
    }
  };
  prefetch(0);
  // fp32 pages whose head dim needs no padding and whose size is a multiple of the tile are read in place:
  // a full tile then lies in one page, kKeyTile rows at the cache's token stride. Other tiles are gathered
  // (converted, zero-padded; the last one zero-filled past the span, where a page may hold stale values).
  const bool in_place = std::is_same<T, float>::value && dv == dim && ps % kKeyTile == 0;
  for (int start = 0; start < span; start += kKeyTile) {
    const int nk = std::min(kKeyTile, span - start);
    if (start + kKeyTile < span) prefetch(start + kKeyTile);
    const float* kp = kt;
    const float* vp = vt;
    int64_t ks = dv, vs = dv;
    if (in_place && nk == kKeyTile) {
      const int64_t page = std::min(std::max(pages[start / ps], 0), a.num_pages - 1);
      const int64_t slot = start % ps;
      kp = reinterpret_cast<const float*>(a.k_cache + page * a.k_stride_page + slot * a.k_stride_token +
                                          kv_head * a.k_stride_head);
      vp = reinterpret_cast<const float*>(a.v_cache + page * a.v_stride_page + slot * a.v_stride_token +
                                          kv_head * a.v_stride_head);
      ks = a.k_stride_token;
      vs = a.v_stride_token;
    } else {
      for (int j = 0; j < nk; ++j) {
        const int key = start + j;
        const int64_t page = std::min(std::max(pages[key / ps], 0), a.num_pages - 1);
        const int64_t slot = key % ps;
        ToFloat(a.k_cache + page * a.k_stride_page + slot * a.k_stride_token + kv_head * a.k_stride_head, dim,
                kt + static_cast<size_t>(j) * dv);
        ToFloat(a.v_cache + page * a.v_stride_page + slot * a.v_stride_token + kv_head * a.v_stride_head, dim,
                vt + static_cast<size_t>(j) * dv);
      }
    }
    if (nk < kKeyTile) {  // the last tile: zero keys and values past the span (always gathered)
      std::fill(kt + static_cast<size_t>(nk) * dv, kt + static_cast<size_t>(kKeyTile) * dv, 0.0f);
      std::fill(vt + static_cast<size_t>(nk) * dv, vt + static_cast<size_t>(kKeyTile) * dv, 0.0f);
    }
    ScoreTile(w.q.data(), kp, ks, rows, dv, s);
    for (int r = 0; r < rows; ++r) {
      float* sr = s + static_cast<size_t>(r) * kKeyTile;
      const int visible = std::min(nk, limit(q_begin + r / group) - start);
      if (visible <= 0) {  // past this query's causal limit: nothing changes
        std::fill(sr, sr + kKeyTile, 0.0f);
        corr[r] = 1.0f;
        continue;
      }
      float mx = w.m[r];
      for (int j = 0; j < visible; ++j) mx = std::max(mx, sr[j]);
      corr[r] = w.m[r] == neg_inf ? 0.0f : ExpNonPositive(w.m[r] - mx);
      const Int8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
      Vec8 sum = {};
      for (int j = 0; j < kKeyTile; j += 8) {
        const Vec8 p = Select8(lane + j < visible, ExpNonPositive8(Load8(sr + j) - mx), Vec8{});
        Store8(sr + j, p);
        sum += p;
      }
      float* lr = &w.l[static_cast<size_t>(r) * 8];
      Store8(lr, Load8(lr) * corr[r] + sum);
      w.m[r] = mx;
    }
    PvTile(w.acc.data(), s, corr, vp, vs, rows, dv);
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t token = q0 + q_begin + r / group;
    const int head = kv_head * group + r % group;
    T* dst = a.out + token * a.out_stride_token + head * a.out_stride_head;
    float l = 0.0f;
    for (int i = 0; i < 8; ++i) l += w.l[static_cast<size_t>(r) * 8 + i];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float* acc = &w.acc[static_cast<size_t>(r) * dv];
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
