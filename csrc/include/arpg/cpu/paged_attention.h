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
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9))
#include <immintrin.h>  // the AVX-512 path below; its functions carry their own target attribute
#endif

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
  std::vector<float> l;        // [rows][8] (eight partial sums; the AVX-512 path: [rows])
  std::vector<float> k, v;  // [kKeyTile][dv]: one tile of keys and values, gathered across pages
                            // (the AVX-512 path: k transposed [dw][kWideTile], v [kWideTile][dw])
  std::vector<float> s;     // [rows][kKeyTile]: scores, then probabilities
};

#if defined(__GNUC__) || defined(__clang__)
#define ARPG_CPU_INLINE inline __attribute__((always_inline))
#else
#error "arpg/cpu/paged_attention.h needs GCC or Clang (vector extensions)"
#endif

constexpr int kKeyTile = 16;  // keys per online-softmax step, whatever the page size

// Specialised to std::true_type for a storage type that holds bfloat16 bits (the adapters do it for theirs):
// the AVX-512 BF16 path then multiplies the raw bits, q by k, with vdpbf16ps.
template <typename T>
struct IsBFloat16 : std::false_type {};

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
// A broadcast: GCC builds Vec8{x, x, ...} lane by lane (eight inserts) where registers run short, a shuffle
// compiles to one vbroadcastss.
ARPG_CPU_INLINE Vec8 Splat8(float x) {
  const Vec8 v = {x};
  return ARPG_SHUFFLE(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
}
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

// One work item of the few-row path in three parts, so that a caller can also run the items of several KV
// heads tile by tile (PagedAttentionHeadsImpl): Begin (false: nothing to compute), Tile for each start of
// [0, span) in steps of kKeyTile, then End.
template <typename T>
struct NarrowItem {
  const PagedAttentionArgs<T>* a;
  PagedAttentionScratch* w;
  int seq, kv_head, q_begin, q_end, q_len, kv_len, group, dim, dv, ps, rows, span;
  int64_t q0;
  bool in_place;
  bool prefetch = true;  // software prefetch of the next tile (PagedAttentionHeadsImpl: the hardware's)
  const int32_t* pages;

  // Keys visible to query i: j < Limit(i) = kv_len - q_len + i + 1 (causal, bottom-right) or kv_len.
  ARPG_CPU_INLINE int Limit(int i) const {
    return a->causal ? std::min(kv_len, std::max(kv_len - q_len + i + 1, 0)) : kv_len;
  }

  ARPG_CPU_INLINE bool Begin(const PagedAttentionArgs<T>& args, int seq_, int kv_head_, int q_begin_, int q_end_,
                             PagedAttentionScratch& scratch) {
    a = &args;
    w = &scratch;
    seq = seq_;
    kv_head = kv_head_;
    q_begin = q_begin_;
    q0 = args.cu_q_lens[seq];
    q_len = static_cast<int>(args.cu_q_lens[seq + 1] - q0);
    q_end = std::min(q_end_, q_len);
    if (q_begin >= q_end) return false;
    const int max_kv = args.max_pages * args.page_size;
    kv_len = std::min(std::max(args.kv_lens[seq], 0), max_kv);
    group = args.num_heads / args.num_kv_heads;
    dim = args.head_dim;
    dv = (dim + 7) / 8 * 8;
    ps = args.page_size;
    rows = (q_end - q_begin) * group;  // row r: query q_begin + r / group, head kv_head * group + r % group
    span = Limit(q_end - 1);
    if (span <= 0) return false;  // the caller's output is already 0 and its LSE -inf

    const float neg_inf = -std::numeric_limits<float>::infinity();
    w->q.assign(static_cast<size_t>(rows) * dv, 0.0f);
    w->acc.assign(static_cast<size_t>(rows) * dv, 0.0f);
    w->m.assign(rows, neg_inf);
    w->l.assign(static_cast<size_t>(rows) * 8, 0.0f);  // per row, eight partial sums: reduced once at the end
    w->corr.resize(rows);
    // fp32 pages whose head dim needs no padding and whose size is a multiple of the tile are read in place:
    // a full tile then lies in one page, kKeyTile rows at the cache's token stride. Other tiles are gathered
    // (converted, zero-padded; the last one zero-filled past the span, where a page may hold stale values).
    in_place = std::is_same<T, float>::value && dv == dim && ps % kKeyTile == 0;
    if (in_place) {  // only a last, partial tile is gathered, and it writes or zero-fills every row it uses
      w->k.resize(static_cast<size_t>(kKeyTile) * dv);
      w->v.resize(static_cast<size_t>(kKeyTile) * dv);
    } else {  // gathered rows leave their padding past the head dim as it is: zero
      w->k.assign(static_cast<size_t>(kKeyTile) * dv, 0.0f);
      w->v.assign(static_cast<size_t>(kKeyTile) * dv, 0.0f);
    }
    w->s.resize(static_cast<size_t>(rows) * kKeyTile);
    for (int r = 0; r < rows; ++r) {
      ToFloat(args.q + (q0 + q_begin + r / group) * args.q_stride_token + (kv_head * group + r % group) * args.q_stride_head,
              args.scale, dim, &w->q[static_cast<size_t>(r) * dv]);
    }
    pages = args.block_table + static_cast<int64_t>(seq) * args.block_table_stride;
    if (prefetch) Prefetch(0);
    return true;
  }

  // The rows of the tile at `start`, asked of the memory system ahead of their use: pages are scattered, so the
  // hardware prefetcher cannot guess them.
  ARPG_CPU_INLINE void Prefetch(int start) const {
    const int end = std::min(start + kKeyTile, span);
    for (int key = start; key < end; ++key) {
      const int64_t page = std::min(std::max(pages[key / ps], 0), a->num_pages - 1);
      const T* kr = a->k_cache + page * a->k_stride_page + (key % ps) * a->k_stride_token + kv_head * a->k_stride_head;
      const T* vr = a->v_cache + page * a->v_stride_page + (key % ps) * a->v_stride_token + kv_head * a->v_stride_head;
      for (int64_t off = 0; off < static_cast<int64_t>(dim * sizeof(T)); off += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(kr) + off);
        __builtin_prefetch(reinterpret_cast<const char*>(vr) + off);
      }
    }
  }

  // The keys [start, start + kKeyTile) (past the span: none) folded into the online softmax of every row.
  ARPG_CPU_INLINE void Tile(int start) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    float* kt = w->k.data();
    float* vt = w->v.data();
    float* s = w->s.data();
    float* corr = w->corr.data();
    const int nk = std::min(kKeyTile, span - start);
    if (prefetch && start + kKeyTile < span) Prefetch(start + kKeyTile);
    const float* kp = kt;
    const float* vp = vt;
    int64_t ks = dv, vs = dv;
    if (in_place && nk == kKeyTile) {
      const int64_t page = std::min(std::max(pages[start / ps], 0), a->num_pages - 1);
      const int64_t slot = start % ps;
      kp = reinterpret_cast<const float*>(a->k_cache + page * a->k_stride_page + slot * a->k_stride_token +
                                          kv_head * a->k_stride_head);
      vp = reinterpret_cast<const float*>(a->v_cache + page * a->v_stride_page + slot * a->v_stride_token +
                                          kv_head * a->v_stride_head);
      ks = a->k_stride_token;
      vs = a->v_stride_token;
    } else {
      for (int j = 0; j < nk; ++j) {
        const int key = start + j;
        const int64_t page = std::min(std::max(pages[key / ps], 0), a->num_pages - 1);
        const int64_t slot = key % ps;
        ToFloat(a->k_cache + page * a->k_stride_page + slot * a->k_stride_token + kv_head * a->k_stride_head, dim,
                kt + static_cast<size_t>(j) * dv);
        ToFloat(a->v_cache + page * a->v_stride_page + slot * a->v_stride_token + kv_head * a->v_stride_head, dim,
                vt + static_cast<size_t>(j) * dv);
      }
    }
    if (nk < kKeyTile) {  // the last tile: zero keys and values past the span (always gathered)
      std::fill(kt + static_cast<size_t>(nk) * dv, kt + static_cast<size_t>(kKeyTile) * dv, 0.0f);
      std::fill(vt + static_cast<size_t>(nk) * dv, vt + static_cast<size_t>(kKeyTile) * dv, 0.0f);
    }
    ScoreTile(w->q.data(), kp, ks, rows, dv, s);
    for (int r = 0; r < rows; ++r) {
      float* sr = s + static_cast<size_t>(r) * kKeyTile;
      const int visible = std::min(nk, Limit(q_begin + r / group) - start);
      if (visible <= 0) {  // past this query's causal limit: nothing changes
        std::fill(sr, sr + kKeyTile, 0.0f);
        corr[r] = 1.0f;
        continue;
      }
      float mx = w->m[r];
      for (int j = 0; j < visible; ++j) mx = std::max(mx, sr[j]);
      corr[r] = w->m[r] == neg_inf ? 0.0f : ExpNonPositive(w->m[r] - mx);
      const Int8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
      Vec8 sum = {};
      for (int j = 0; j < kKeyTile; j += 8) {
        const Vec8 p = Select8(lane + j < visible, ExpNonPositive8(Load8(sr + j) - mx), Vec8{});
        Store8(sr + j, p);
        sum += p;
      }
      float* lr = &w->l[static_cast<size_t>(r) * 8];
      Store8(lr, Load8(lr) * corr[r] + sum);
      w->m[r] = mx;
    }
    PvTile(w->acc.data(), s, corr, vp, vs, rows, dv);
  }

  ARPG_CPU_INLINE void End() const {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < rows; ++r) {
      const int64_t token = q0 + q_begin + r / group;
      const int head = kv_head * group + r % group;
      T* dst = a->out + token * a->out_stride_token + head * a->out_stride_head;
      float l = 0.0f;
      for (int i = 0; i < 8; ++i) l += w->l[static_cast<size_t>(r) * 8 + i];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const float* acc = &w->acc[static_cast<size_t>(r) * dv];
      for (int d = 0; d < dim; ++d) dst[d] = T(acc[d] * inv);
      if (a->lse != nullptr) a->lse[token * a->lse_stride_token + head] = l > 0.0f ? w->m[r] + std::log(l) : neg_inf;
    }
  }
};

template <typename T>
ARPG_CPU_INLINE void PagedAttentionBlockImpl(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin,
                                             int q_end, PagedAttentionScratch& w) {
  NarrowItem<T> it;
  if (!it.Begin(a, seq, kv_head, q_begin, q_end, w)) return;
  for (int start = 0; start < it.span; start += kKeyTile) it.Tile(start);
  it.End();
}

constexpr int kMaxHeadsPerItem = 16;

// The KV heads [head_begin, head_end) (at most kMaxHeadsPerItem) of one sequence's queries [q_begin, q_end), each
// with its own scratch ws[i], tile by tile: every head's rows of a tile are read before the next tile's, and
// prefetched together, one run per token (a token's heads lie next to each other in a page), where one head
// alone asks for a few hundred bytes of every token's row. Measured on a cold cache, one core, 16 heads,
// fp32, one query, 16-64 sequences: 1.26-1.37x over one item per head. Each head's arithmetic is PagedAttentionBlockImpl's, in
// the same order.
template <typename T>
ARPG_CPU_INLINE void PagedAttentionHeadsImpl(const PagedAttentionArgs<T>& a, int seq, int head_begin, int head_end,
                                             int q_begin, int q_end, PagedAttentionScratch* ws) {
  NarrowItem<T> items[kMaxHeadsPerItem];
  const int n = std::min(head_end - head_begin, kMaxHeadsPerItem);
  for (int i = 0; i < n; ++i) {
    items[i].prefetch = false;  // prefetched below, every head's rows of a token in one run
    if (!items[i].Begin(a, seq, head_begin + i, q_begin, q_end, ws[i])) return;  // the same span for every head
  }
  const NarrowItem<T>& f = items[0];
  // K's and V's rows of all n heads, per token one run (the heads lie next to each other in a page), side by side
  // (measured faster than one run after the other); a prefetch past a run's end is harmless. Inline here: through
  // NarrowItem::Prefetch with a byte count this measured 5-10% slower at 16 sequences (GCC 12).
  const int64_t bytes = static_cast<int64_t>(n) * std::max(a.k_stride_head, a.v_stride_head) * sizeof(T);
  for (int start = 0; start < f.span; start += kKeyTile) {
    const int end = std::min(start + 2 * kKeyTile, f.span);
    for (int key = start + kKeyTile; key < end; ++key) {  // the next tile's rows
      const int64_t page = std::min(std::max(f.pages[key / f.ps], 0), a.num_pages - 1);
      const char* kr = reinterpret_cast<const char*>(a.k_cache + page * a.k_stride_page +
                                                     (key % f.ps) * a.k_stride_token + head_begin * a.k_stride_head);
      const char* vr = reinterpret_cast<const char*>(a.v_cache + page * a.v_stride_page +
                                                     (key % f.ps) * a.v_stride_token + head_begin * a.v_stride_head);
      for (int64_t off = 0; off < bytes; off += 64) {
        __builtin_prefetch(kr + off);
        __builtin_prefetch(vr + off);
      }
    }
    for (int i = 0; i < n; ++i) items[i].Tile(start);
  }
  for (int i = 0; i < n; ++i) items[i].End();
}

// The same code compiled for the baseline ISA and, on x86-64, for AVX2 + FMA; PagedAttentionBlock picks
// at run time (never -march=native at build time, so one binary runs on every x86-64 CPU).
template <typename T>
void PagedAttentionBlockBaseline(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin, int q_end,
                                 PagedAttentionScratch& w) {
  PagedAttentionBlockImpl(a, seq, kv_head, q_begin, q_end, w);
}

template <typename T>
void PagedAttentionHeadsBaseline(const PagedAttentionArgs<T>& a, int seq, int head_begin, int head_end, int q_begin,
                                 int q_end, PagedAttentionScratch* ws) {
  PagedAttentionHeadsImpl(a, seq, head_begin, head_end, q_begin, q_end, ws);
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ARPG_CPU_HAS_AVX2_PATH 1
template <typename T>
__attribute__((target("avx2,fma"))) void PagedAttentionBlockAvx2(const PagedAttentionArgs<T>& a, int seq,
                                                                  int kv_head, int q_begin, int q_end,
                                                                  PagedAttentionScratch& w) {
  PagedAttentionBlockImpl(a, seq, kv_head, q_begin, q_end, w);
}

template <typename T>
__attribute__((target("avx2,fma"))) void PagedAttentionHeadsAvx2(const PagedAttentionArgs<T>& a, int seq,
                                                                  int head_begin, int head_end, int q_begin,
                                                                  int q_end, PagedAttentionScratch* ws) {
  PagedAttentionHeadsImpl(a, seq, head_begin, head_end, q_begin, q_end, ws);
}

inline bool CpuHasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9))
#define ARPG_CPU_HAS_AVX512_PATH 1

// The AVX-512 path, for work items of many rows (rows >= kWideMinRows): the register-blocked dot products
// above waste half their time in horizontal sums once a tile's keys serve many rows. Here a tile of
// kWideTile keys is gathered transposed (kt[d][key], converted once), so that scores are outer products
// (row scalar x 16 keys per vector, no horizontal sum) and P V is row scalar x 16 columns of V; both
// loops are FMA-bound in 32 vector registers. The softmax is the same online softmax, in the same order
// of keys, as the path above.
#define ARPG_AVX512_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define ARPG_AVX512_INLINE inline __attribute__((always_inline, target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

constexpr int kWideTile = 32;     // keys per online-softmax step: two vectors of scores per row
constexpr int kWideMinRows = 8;   // rows of a sequence (queries x group): below, the transposed gather costs more than it saves

// exp(x) for x <= 0, the polynomial of ExpNonPositive8 on sixteen lanes.
ARPG_AVX512_INLINE __m512 ExpNonPositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512i n = _mm512_cvttps_epi32(_mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)));
  const __m512 fn = _mm512_cvtepi32_ps(n);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(fn, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// kt[d][j0 + i] = rows[i][d] for i < 16 and d < dim (d < dw: zero past dim), 16 x 16 blocks transposed in
// registers; rows[i] is a float row of at least dim values.
ARPG_AVX512_INLINE void TransposeKeys16(const float* const* rows, int dim, int dw, float* kt, int j0) {
  for (int d0 = 0; d0 < dw; d0 += 16) {
    const __mmask16 cols = dim - d0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (dim - d0)) - 1);
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(cols, rows[i] + d0);
    for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of floats
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 4; ++i) {  // then 128-bit lanes, twice
      t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
      t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
      t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
      t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
      r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
      r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (d0 + i) * kWideTile + j0, r[i]);
  }
}

// s[r][0 : 16NV] = q[r][0:dim] . kt[0:dim][0 : 16NV] for R rows (q rows dw apart, s rows kWideTile apart).
template <int R, int NV>
ARPG_AVX512_INLINE void WideScores(const float* q, int dw, const float* kt, int dim, float* s) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int d = 0; d < dim; ++d) {
    __m512 k[NV];
    for (int v = 0; v < NV; ++v) k[v] = _mm512_loadu_ps(kt + d * kWideTile + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 qv = _mm512_set1_ps(q[r * dw + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(qv, k[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + r * kWideTile + 16 * v, acc[r][v]);
  }
}

// Scores of all rows; a tile of at most 16 keys (the span's last) computes one vector per row.
template <int NV>
ARPG_AVX512_INLINE void WideScoreTile(const float* q, int rows, int dw, const float* kt, int dim, float* s) {
  int r = 0;
  for (; r + 8 <= rows; r += 8) WideScores<8, NV>(q + r * dw, dw, kt, dim, s + r * kWideTile);
  q += r * dw;
  s += r * kWideTile;
  switch (rows - r) {
    case 7: WideScores<7, NV>(q, dw, kt, dim, s); break;
    case 6: WideScores<6, NV>(q, dw, kt, dim, s); break;
    case 5: WideScores<5, NV>(q, dw, kt, dim, s); break;
    case 4: WideScores<4, NV>(q, dw, kt, dim, s); break;
    case 3: WideScores<3, NV>(q, dw, kt, dim, s); break;
    case 2: WideScores<2, NV>(q, dw, kt, dim, s); break;
    case 1: WideScores<1, NV>(q, dw, kt, dim, s); break;
    default: break;
  }
}

#define ARPG_AVX512BF16_INLINE \
  inline __attribute__((always_inline, target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx512bf16")))
#define ARPG_AVX512BF16_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,avx512bf16")))

// The scores from bfloat16 bits: q2[r][i] and kt2[i][key] hold the pair of dims (2i, 2i + 1) in 32 bits; the
// products are exact in float, so this differs from WideScores on converted values only in summation order.
template <int R, int NV>
ARPG_AVX512BF16_INLINE void WideScoresBf16(const uint32_t* q2, int dw, const uint32_t* kt2, int pairs, float scale,
                                           float* s) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int i = 0; i < pairs; ++i) {
    __m512bh k[NV];
    for (int v = 0; v < NV; ++v) k[v] = (__m512bh)_mm512_loadu_si512(kt2 + i * kWideTile + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(q2[r * dw + i]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], qv, k[v]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + r * kWideTile + 16 * v, _mm512_mul_ps(acc[r][v], sc));
  }
}

// Called once per tile, not inlined: only this function (and WideScoresBf16) needs AVX512_BF16.
template <int NV>
ARPG_AVX512BF16_FN __attribute__((noinline)) void WideScoreTileBf16(const uint32_t* q2, int rows, int dw, const uint32_t* kt2, int pairs,
                                              float scale, float* s) {
  int r = 0;
  for (; r + 8 <= rows; r += 8) WideScoresBf16<8, NV>(q2 + r * dw, dw, kt2, pairs, scale, s + r * kWideTile);
  q2 += r * dw;
  s += r * kWideTile;
  switch (rows - r) {
    case 7: WideScoresBf16<7, NV>(q2, dw, kt2, pairs, scale, s); break;
    case 6: WideScoresBf16<6, NV>(q2, dw, kt2, pairs, scale, s); break;
    case 5: WideScoresBf16<5, NV>(q2, dw, kt2, pairs, scale, s); break;
    case 4: WideScoresBf16<4, NV>(q2, dw, kt2, pairs, scale, s); break;
    case 3: WideScoresBf16<3, NV>(q2, dw, kt2, pairs, scale, s); break;
    case 2: WideScoresBf16<2, NV>(q2, dw, kt2, pairs, scale, s); break;
    case 1: WideScoresBf16<1, NV>(q2, dw, kt2, pairs, scale, s); break;
    default: break;
  }
}

// acc[r][c0 : c0 + 16C] = acc * corr[r] + sum_{j < nk} p[r][j] v[j][c0 : c0 + 16C] for R rows; v[j] points at
// value j's column c0, whose columns past `cols` (c0 + 16C > dim) are not read.
template <int R, int C>
ARPG_AVX512_INLINE void WidePv(float* acc, int dw, const float* p, const float* corr, const float* const* v, int c0,
                               int cols, int nk) {
  __m512 o[R][C];
  __mmask16 mask[C];
  for (int c = 0; c < C; ++c) {
    const int left = cols - 16 * c;
    mask[c] = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << std::max(left, 0)) - 1);
  }
  for (int r = 0; r < R; ++r) {
    const __m512 cr = _mm512_set1_ps(corr[r]);
    for (int c = 0; c < C; ++c) o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * dw + 16 * c), cr);
  }
  for (int j = 0; j < nk; ++j) {
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm512_maskz_loadu_ps(mask[c], v[j] + c0 + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * kWideTile + j]);
      for (int c = 0; c < C; ++c) o[r][c] = _mm512_fmadd_ps(pr, vv[c], o[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * dw + 16 * c, o[r][c]);
  }
}

template <int R>
ARPG_AVX512_INLINE void WidePvRows(float* acc, int dw, int dim, const float* p, const float* corr,
                                   const float* const* v, int nk) {
  int c = 0;
  for (; c + 64 <= dw; c += 64) WidePv<R, 4>(acc + c, dw, p, corr, v, c, dim - c, nk);
  switch ((dw - c) / 16) {
    case 3: WidePv<R, 3>(acc + c, dw, p, corr, v, c, dim - c, nk); break;
    case 2: WidePv<R, 2>(acc + c, dw, p, corr, v, c, dim - c, nk); break;
    case 1: WidePv<R, 1>(acc + c, dw, p, corr, v, c, dim - c, nk); break;
    default: break;
  }
}

// kBf16Dot: T holds bfloat16 bits and the head dim is even, and the CPU has AVX512_BF16 (scores by
// WideScoresBf16 on the raw bits).
template <typename T>
ARPG_AVX512_INLINE void PagedAttentionBlockAvx512Impl(const PagedAttentionArgs<T>& a, int seq, int kv_head,
                                                      int q_begin, int q_end, PagedAttentionScratch& w,
                                                      const bool kBf16Dot) {
  const int64_t q0 = a.cu_q_lens[seq];
  const int q_len = static_cast<int>(a.cu_q_lens[seq + 1] - q0);
  q_end = std::min(q_end, q_len);
  if (q_begin >= q_end) return;
  const int max_kv = a.max_pages * a.page_size;
  const int kv_len = std::min(std::max(a.kv_lens[seq], 0), max_kv);
  const int group = a.num_heads / a.num_kv_heads;
  const int dim = a.head_dim;
  const int dw = (dim + 15) / 16 * 16;
  const int ps = a.page_size;
  const int rows = (q_end - q_begin) * group;  // row r: query q_begin + r / group, head kv_head * group + r % group
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto limit = [&](int i) { return a.causal ? std::min(kv_len, std::max(kv_len - q_len + i + 1, 0)) : kv_len; };
  const int span = limit(q_end - 1);
  if (span <= 0) return;

  w.q.assign(static_cast<size_t>(rows) * dw, 0.0f);
  w.acc.assign(static_cast<size_t>(rows) * dw, 0.0f);
  w.m.assign(rows, neg_inf);
  w.l.assign(rows, 0.0f);
  w.corr.resize(rows);
  // k: the transposed tile [dw][kWideTile], then (16-bit storage) the keys converted [kWideTile][dw], then a
  // zero row; v: (16-bit storage) the values converted [kWideTile][dw].
  // Not cleared per work item (a tile reads only what it wrote: the transposes and conversions write the
  // rows they read back, loads past the head dim are masked), except the zero row.
  w.k.resize(static_cast<size_t>(dw) * kWideTile * 2 + dw);
  std::fill(w.k.end() - dw, w.k.end(), 0.0f);
  w.v.resize(std::is_same<T, float>::value ? 0 : static_cast<size_t>(kWideTile) * dw);
  w.s.resize(static_cast<size_t>(rows) * kWideTile);
  for (int r = 0; r < rows; ++r) {
    const T* src = a.q + (q0 + q_begin + r / group) * a.q_stride_token + (kv_head * group + r % group) * a.q_stride_head;
    if (kBf16Dot) {  // the raw bits, dim pairs per 32-bit slot, unscaled (the scores are scaled)
      std::memcpy(&w.q[static_cast<size_t>(r) * dw], src, dim * sizeof(T));
    } else {
      ToFloat(src, a.scale, dim, &w.q[static_cast<size_t>(r) * dw]);
    }
  }
  const int pairs = dim / 2;
  const int32_t* pages = a.block_table + static_cast<int64_t>(seq) * a.block_table_stride;
  float* kt = w.k.data();
  float* kconv = kt + static_cast<size_t>(dw) * kWideTile;
  const float* zero = kconv + static_cast<size_t>(dw) * kWideTile;
  float* vt = w.v.data();
  float* s = w.s.data();
  float* corr = w.corr.data();
  auto key_row = [&](const T* cache, int64_t stride_page, int64_t stride_token, int64_t stride_head, int key) {
    const int64_t page = std::min(std::max(pages[key / ps], 0), a.num_pages - 1);
    return cache + page * stride_page + (key % ps) * stride_token + kv_head * stride_head;
  };
  auto prefetch = [&](int start) {
    const int end = std::min(start + kWideTile, span);
    for (int key = start; key < end; ++key) {
      const char* kr = reinterpret_cast<const char*>(key_row(a.k_cache, a.k_stride_page, a.k_stride_token, a.k_stride_head, key));
      const char* vr = reinterpret_cast<const char*>(key_row(a.v_cache, a.v_stride_page, a.v_stride_token, a.v_stride_head, key));
      for (int64_t off = 0; off < static_cast<int64_t>(dim * sizeof(T)); off += 64) {
        __builtin_prefetch(kr + off);
        __builtin_prefetch(vr + off);
      }
    }
  };
  prefetch(0);
  for (int start = 0; start < span; start += kWideTile) {
    const int nk = std::min(kWideTile, span - start);
    if (start + kWideTile < span) prefetch(start + kWideTile);
    // Row pointers of the tile's keys and values: into the cache for fp32 storage, else into rows converted
    // to float here; keys past the span read a zero row.
    const float* krow[kWideTile];
    const float* vrow[kWideTile];
    for (int j = 0; j < kWideTile; ++j) {
      if (j >= nk) {
        krow[j] = vrow[j] = zero;
        continue;
      }
      const T* kr = key_row(a.k_cache, a.k_stride_page, a.k_stride_token, a.k_stride_head, start + j);
      const T* vr = key_row(a.v_cache, a.v_stride_page, a.v_stride_token, a.v_stride_head, start + j);
      if (std::is_same<T, float>::value) {
        krow[j] = reinterpret_cast<const float*>(kr);
        vrow[j] = reinterpret_cast<const float*>(vr);
      } else if (kBf16Dot) {  // keys as raw pairs (32 bits each); values converted
        krow[j] = reinterpret_cast<const float*>(kr);
        ToFloat(vr, dim, vt + static_cast<size_t>(j) * dw);
        vrow[j] = vt + static_cast<size_t>(j) * dw;
      } else {
        ToFloat(kr, dim, kconv + static_cast<size_t>(j) * dw);
        ToFloat(vr, dim, vt + static_cast<size_t>(j) * dw);
        krow[j] = kconv + static_cast<size_t>(j) * dw;
        vrow[j] = vt + static_cast<size_t>(j) * dw;
      }
    }
    const int cols = kBf16Dot ? pairs : dim;  // 32-bit columns of a key row
    TransposeKeys16(krow, cols, (cols + 15) / 16 * 16, kt, 0);
    if (nk > 16) TransposeKeys16(krow + 16, cols, (cols + 15) / 16 * 16, kt, 16);
    const uint32_t* q2 = reinterpret_cast<const uint32_t*>(w.q.data());
    const uint32_t* kt2 = reinterpret_cast<const uint32_t*>(kt);
    if (kBf16Dot && nk > 16) {
      WideScoreTileBf16<2>(q2, rows, dw, kt2, pairs, a.scale, s);
    } else if (kBf16Dot) {
      WideScoreTileBf16<1>(q2, rows, dw, kt2, pairs, a.scale, s);
    } else if (nk > 16) {
      WideScoreTile<2>(w.q.data(), rows, dw, kt, dim, s);
    } else {
      WideScoreTile<1>(w.q.data(), rows, dw, kt, dim, s);
    }
    int r = 0;
    for (; r < rows; ++r) {
      float* sr = s + static_cast<size_t>(r) * kWideTile;
      const int visible = std::min(nk, limit(q_begin + r / group) - start);
      if (visible <= 0) {  // past this query's causal limit: nothing changes
        std::fill(sr, sr + kWideTile, 0.0f);
        corr[r] = 1.0f;
        continue;
      }
      const __mmask16 m0 = visible >= 16 ? __mmask16(0xffff) : __mmask16((1u << visible) - 1);
      const __mmask16 m1 = visible >= 32 ? __mmask16(0xffff) : visible > 16 ? __mmask16((1u << (visible - 16)) - 1) : __mmask16(0);
      const __m512 s0 = _mm512_loadu_ps(sr), s1 = _mm512_loadu_ps(sr + 16);
      const __m512 ninf = _mm512_set1_ps(neg_inf);
      const float mx = std::max(w.m[r], _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(ninf, m0, s0),
                                                                             _mm512_mask_mov_ps(ninf, m1, s1))));
      corr[r] = w.m[r] == neg_inf ? 0.0f : ExpNonPositive(w.m[r] - mx);
      const __m512 vmx = _mm512_set1_ps(mx);
      const __m512 p0 = _mm512_maskz_mov_ps(m0, ExpNonPositive16(_mm512_sub_ps(s0, vmx)));
      const __m512 p1 = _mm512_maskz_mov_ps(m1, ExpNonPositive16(_mm512_sub_ps(s1, vmx)));
      _mm512_storeu_ps(sr, p0);
      _mm512_storeu_ps(sr + 16, p1);
      w.l[r] = w.l[r] * corr[r] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
      w.m[r] = mx;
    }
    float* acc = w.acc.data();
    for (r = 0; r + 4 <= rows; r += 4) WidePvRows<4>(acc + r * dw, dw, dim, s + r * kWideTile, corr + r, vrow, nk);
    switch (rows - r) {
      case 3: WidePvRows<3>(acc + r * dw, dw, dim, s + r * kWideTile, corr + r, vrow, nk); break;
      case 2: WidePvRows<2>(acc + r * dw, dw, dim, s + r * kWideTile, corr + r, vrow, nk); break;
      case 1: WidePvRows<1>(acc + r * dw, dw, dim, s + r * kWideTile, corr + r, vrow, nk); break;
      default: break;
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t token = q0 + q_begin + r / group;
    const int head = kv_head * group + r % group;
    T* dst = a.out + token * a.out_stride_token + head * a.out_stride_head;
    const float l = w.l[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float* acc = &w.acc[static_cast<size_t>(r) * dw];
    for (int d = 0; d < dim; ++d) dst[d] = T(acc[d] * inv);
    if (a.lse != nullptr) a.lse[token * a.lse_stride_token + head] = l > 0.0f ? w.m[r] + std::log(l) : neg_inf;
  }
}

template <typename T>
ARPG_AVX512_FN void PagedAttentionBlockAvx512(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin,
                                              int q_end, PagedAttentionScratch& w) {
  PagedAttentionBlockAvx512Impl<T>(a, seq, kv_head, q_begin, q_end, w, false);
}

// The same with the scores from bfloat16 bits where T holds them and the head dim is even (else as above).
// Only on a CPU with AVX512_BF16 (CpuHasAvx512Bf16).
template <typename T>
ARPG_AVX512_FN void PagedAttentionBlockAvx512Bf16(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin,
                                                  int q_end, PagedAttentionScratch& w) {
  PagedAttentionBlockAvx512Impl<T>(a, seq, kv_head, q_begin, q_end, w, IsBFloat16<T>::value && a.head_dim % 2 == 0);
}

inline bool CpuHasAvx512Bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

inline bool CpuHasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}
#endif

template <typename T>
void PagedAttentionBlock(const PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin, int q_end,
                         PagedAttentionScratch& w) {
#ifdef ARPG_CPU_HAS_AVX512_PATH
  if (CpuHasAvx512()) {
    // Chosen per sequence, not per work item: a row's result then does not depend on how the sequence's
    // queries are split into items (which follows the thread count).
    const int q_len = a.cu_q_lens[seq + 1] - a.cu_q_lens[seq];
    if (q_len * (a.num_heads / a.num_kv_heads) >= kWideMinRows) {
      if (IsBFloat16<T>::value && CpuHasAvx512Bf16()) {
        return PagedAttentionBlockAvx512Bf16(a, seq, kv_head, q_begin, q_end, w);
      }
      return PagedAttentionBlockAvx512(a, seq, kv_head, q_begin, q_end, w);
    }
  }
#endif
#ifdef ARPG_CPU_HAS_AVX2_PATH
  if (CpuHasAvx2Fma()) return PagedAttentionBlockAvx2(a, seq, kv_head, q_begin, q_end, w);
#endif
  PagedAttentionBlockBaseline(a, seq, kv_head, q_begin, q_end, w);
}

// Whether PagedAttentionBlock takes the few-row path for this sequence (the path PagedAttentionHeads runs).
template <typename T>
bool PagedAttentionNarrow(const PagedAttentionArgs<T>& a, int seq) {
#ifdef ARPG_CPU_HAS_AVX512_PATH
  if (CpuHasAvx512()) {
    const int q_len = a.cu_q_lens[seq + 1] - a.cu_q_lens[seq];
    return q_len * (a.num_heads / a.num_kv_heads) < kWideMinRows;
  }
#endif
  (void)a;
  (void)seq;
  return true;
}

// PagedAttentionBlock for the KV heads [head_begin, head_end) of a sequence whose path is the few-row one
// (PagedAttentionNarrow), tile by tile (PagedAttentionHeadsImpl); ws: head_end - head_begin scratches, at most
// kMaxHeadsPerItem. The same results, bit for bit, as one PagedAttentionBlock call per head.
template <typename T>
void PagedAttentionHeads(const PagedAttentionArgs<T>& a, int seq, int head_begin, int head_end, int q_begin,
                         int q_end, PagedAttentionScratch* ws) {
#ifdef ARPG_CPU_HAS_AVX2_PATH
  if (CpuHasAvx2Fma()) return PagedAttentionHeadsAvx2(a, seq, head_begin, head_end, q_begin, q_end, ws);
#endif
  PagedAttentionHeadsBaseline(a, seq, head_begin, head_end, q_begin, q_end, ws);
}

}  // namespace cpu
}  // namespace arpg
