// Paged attention forward: packed varlen queries against a paged KV cache, split-KV with a merge pass.
//
// One CTA owns (sequence, KV head, block of 64 rows, KV split). Its rows are the pairs
// (query i, head g of the KV head's group), query-major: row r = i * group + g. So the queries of a
// sequence and the heads sharing a KV head go through mma together and every K/V tile is read once
// per block of rows. Four warps own 16 rows each; keys stream through shared memory in tiles of 64,
// double-buffered with cp.async; S = Q K^T and O += P V run on mma.sync m16n8k16 with fp32
// accumulators and an online softmax in base 2.
//
// Everything that depends on device data (q_len, kv_len, the split's key range) is read inside the
// kernel: the grid comes from shapes only, so a launch can be captured in a CUDA graph, and CTAs
// without rows exit at once. A split CTA whose key range is empty still writes lse = -inf for its
// rows, which the merge pass skips.
#pragma once

#include <climits>

#include "arpg/common.cuh"
#include "arpg/paged_attention.h"

namespace arpg {

namespace detail {

template <int HEAD_DIM>
struct PagedAttentionTile {
  static_assert(HEAD_DIM % 16 == 0, "head_dim must be a multiple of 16");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;   // rows per CTA, 16 per warp
  static constexpr int kBlockN = 64;            // keys per tile
  static constexpr int kPitch = HEAD_DIM + 8;   // shared row pitch; the 16 B pad makes ldmatrix conflict-free
  static constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks per row
  // Q tile, then two stages of K and two of V.
  static constexpr size_t kSmemBytes = size_t(kBlockM + 4 * kBlockN) * kPitch * 2;
  static_assert(kBlockM * kChunks % kThreads == 0 && kBlockN * kChunks % kThreads == 0,
                "every thread copies the same number of chunks");
};

constexpr int kMergeThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(PagedAttentionTile<HEAD_DIM>::kThreads)
    PagedAttentionKernel(const PagedAttentionParams<T> p, const int page_shift) {
  using Tile = PagedAttentionTile<HEAD_DIM>;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kBlockM = Tile::kBlockM;
  constexpr int kBlockN = Tile::kBlockN;
  constexpr int kPitch = Tile::kPitch;
  constexpr int kChunks = Tile::kChunks;
  constexpr int kDTiles = HEAD_DIM / 8;  // n8 tiles of the output
  constexpr int kNTiles = kBlockN / 8;   // n8 tiles of the scores

  const int group = p.num_heads / p.num_kv_heads;
  const int seq = blockIdx.x / p.num_kv_heads;
  const int kv_head = blockIdx.x % p.num_kv_heads;
  const int m_block = blockIdx.y;
  const int split = blockIdx.z;

  const int q_start = p.cu_q_lens[seq];
  if (q_start < 0 || q_start >= p.num_tokens) return;
  // A q_len running past the packed tensor is cut at its end rather than read out of bounds.
  const int q_len = Min(p.cu_q_lens[seq + 1] - q_start, p.num_tokens - q_start);
  const int m_rows = q_len * group;
  const int m_begin = m_block * kBlockM;
  if (q_len <= 0 || m_begin >= m_rows) return;
  const int m_end = Min(m_begin + kBlockM, m_rows);

  // Keys [0, kv_valid) exist; page ids come from the block table, so never look past its width.
  const int kv_len = p.kv_lens[seq];
  const int64_t kv_cap = p.num_pages > 0 ? int64_t(p.max_pages) * p.page_size : 0;
  const int kv_valid = int(Max<int64_t>(0, Min<int64_t>(kv_len, kv_cap)));
  // Number of keys query i sees.
  auto visible = [&](int i) -> int {
    if (!p.causal) return kv_valid;
    const int64_t limit = int64_t(kv_len) - q_len + 1 + i;
    return int(Max<int64_t>(0, Min<int64_t>(limit, kv_valid)));
  };
  const int n_end = visible((m_end - 1) / group);  // keys any row of the block sees
  const int n_all = visible(m_begin / group);      // keys every row of the block sees

  const int num_tiles = CeilDiv(n_end, kBlockN);
  int tile_begin = 0;
  int tile_end = num_tiles;
  if (p.num_splits > 1) {
    const int per_split = CeilDiv(num_tiles, p.num_splits);
    tile_begin = Min(split * per_split, num_tiles);
    tile_end = Min(tile_begin + per_split, num_tiles);
  }

  ARPG_DYNAMIC_SMEM(smem);
  T* s_q = reinterpret_cast<T*>(smem);  // [kBlockM][kPitch]
  T* s_k = s_q + kBlockM * kPitch;      // [2][kBlockN][kPitch]
  T* s_v = s_k + 2 * kBlockN * kPitch;  // [2][kBlockN][kPitch]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const T* k_head = p.k_cache + int64_t(kv_head) * p.k_stride_head;
  const T* v_head = p.v_cache + int64_t(kv_head) * p.v_stride_head;

  auto load_q = [&]() {
#pragma unroll
    for (int i = 0; i < kBlockM * kChunks / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kChunks;
      const int chunk = c % kChunks;
      const int row = m_begin + r;
      const bool valid = row < m_end;
      const T* src = p.q;
      if (valid) {
        const int head = kv_head * group + row % group;
        src = p.q + int64_t(q_start + row / group) * p.q_stride_token + int64_t(head) * p.q_stride_head + chunk * 8;
      }
      CpAsync16(s_q + r * kPitch + chunk * 8, src, valid);
    }
  };

  // Each thread copies kKvCopies 16-byte chunks of every K and V tile, rows (tid + i * kThreads) / kChunks.
  // Their page ids are read one tile ahead (fetch_pages for tile t + 1 is issued before tile t computes),
  // so a tile's copies never wait on a block-table load; keys past n_end read a valid table entry and
  // are zero-filled by the copy (their scores are masked, and zeros keep 0 * V finite).
  constexpr int kKvCopies = kBlockN * kChunks / kThreads;
  const int32_t* table_row = p.block_table + int64_t(seq) * p.block_table_stride;
  auto fetch_pages = [&](int tile, int (&pages)[kKvCopies]) {
#pragma unroll
    for (int i = 0; i < kKvCopies; ++i) {
      const int key = Min(tile * kBlockN + (tid + i * kThreads) / kChunks, n_end - 1);
      pages[i] = table_row[key >> page_shift];
    }
  };
  auto load_kv = [&](int tile, int stage, const int (&pages)[kKvCopies]) {
    T* dst_k = s_k + stage * kBlockN * kPitch;
    T* dst_v = s_v + stage * kBlockN * kPitch;
#pragma unroll
    for (int i = 0; i < kKvCopies; ++i) {
      const int c = tid + i * kThreads;
      const int r = c / kChunks;
      const int chunk = c % kChunks;
      const int key = tile * kBlockN + r;
      const bool valid = key < n_end;
      const int64_t page = Min(Max(pages[i], 0), p.num_pages - 1);
      const int64_t offset = key & (p.page_size - 1);
      const int64_t k_off = page * p.k_stride_page + offset * p.k_stride_token + chunk * 8;
      const int64_t v_off = page * p.v_stride_page + offset * p.v_stride_token + chunk * 8;
      CpAsync16(dst_k + r * kPitch + chunk * 8, k_head + (valid ? k_off : 0), valid);
      CpAsync16(dst_v + r * kPitch + chunk * 8, v_head + (valid ? v_off : 0), valid);
    }
  };

  // This thread holds rows row0 (accumulator elements 0, 1) and row0 + 8 (elements 2, 3) of its warp.
  const bool warp_active = m_begin + warp * 16 < m_end;
  const int row0 = m_begin + warp * 16 + lane / 4;
  const int rows[2] = {row0, row0 + 8};
  const int row_visible[2] = {rows[0] < m_end ? visible(rows[0] / group) : 0,
                              rows[1] < m_end ? visible(rows[1] / group) : 0};
  const float scale_log2 = p.scale * kLog2e;
  // ldmatrix.x4 row addresses, lanes 8i..8i+7 naming the rows of matrix i. Q (A operand) and V
  // (transposed B operand): matrices (+0 rows, +0 cols), (+8, +0), (+0, +8), (+8, +8).
  // K (B operand): (+0, +0), (+0, +8), (+8, +0), (+8, +8), i.e. two n8 tiles times two k8 halves.
  const int a_row = lane % 8 + ((lane / 8) % 2) * 8;
  const int a_col = (lane / 16) * 8;
  const int b_row = lane % 8 + (lane / 16) * 8;
  const int b_col = ((lane / 8) % 2) * 8;

  uint32_t q_frag[HEAD_DIM / 16][4];
  float o_acc[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[d][e] = 0.f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the base-2 scores
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the running denominator

  if (tile_begin < tile_end) {
    int pages[kKvCopies];
    fetch_pages(tile_begin, pages);
    load_q();
    load_kv(tile_begin, 0, pages);
    CpAsyncCommit();
    if (tile_begin + 1 < tile_end) fetch_pages(tile_begin + 1, pages);
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int stage = (tile - tile_begin) & 1;
      if (tile + 1 < tile_end) {
        load_kv(tile + 1, stage ^ 1, pages);
        if (tile + 2 < tile_end) fetch_pages(tile + 2, pages);  // in flight while this tile computes
      }
      // Commit even an empty group so that "all but the newest group" is always this tile.
      CpAsyncCommit();
      CpAsyncWait<1>();
      SyncThreads();

      if (warp_active) {
        if (tile == tile_begin) {
#pragma unroll
          for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
            LdMatrixX4(q_frag[ks], s_q + (warp * 16 + a_row) * kPitch + ks * 16 + a_col);
          }
        }
        const T* k_tile = s_k + stage * kBlockN * kPitch;
        const T* v_tile = s_v + stage * kBlockN * kPitch;

        float s[kNTiles][4];
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
        }
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
#pragma unroll
          for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];  // B fragments: b[0..1] for keys np*16 + 0..7, b[2..3] for keys np*16 + 8..15
            LdMatrixX4(b, k_tile + (np * 16 + b_row) * kPitch + ks * 16 + b_col);
            Mma16816<T>(s[2 * np], q_frag[ks], b[0], b[1]);
            Mma16816<T>(s[2 * np + 1], q_frag[ks], b[2], b[3]);
          }
        }

        const bool need_mask = (tile + 1) * kBlockN > n_all;
        const int key0 = tile * kBlockN + 2 * (lane % 4);
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + n * 8 + (e & 1);
            s[n][e] = (need_mask && key >= row_visible[e / 2]) ? -INFINITY : s[n][e] * scale_log2;
          }
        }

#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float m = row_max[rr];
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) m = fmaxf(m, fmaxf(s[n][2 * rr], s[n][2 * rr + 1]));
          m = fmaxf(m, ShflXor(m, 1));
          m = fmaxf(m, ShflXor(m, 2));
          // A row that has seen no key yet keeps max -inf; subtracting 0 then gives exp2(-inf) = 0, not NaN.
          const float m_use = m == -INFINITY ? 0.f : m;
          const float alpha = exp2f(row_max[rr] - m_use);
          row_max[rr] = m;
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) {
            s[n][2 * rr] = exp2f(s[n][2 * rr] - m_use);
            s[n][2 * rr + 1] = exp2f(s[n][2 * rr + 1] - m_use);
            sum += s[n][2 * rr] + s[n][2 * rr + 1];
          }
          row_sum[rr] = row_sum[rr] * alpha + sum;
#pragma unroll
          for (int d = 0; d < kDTiles; ++d) {
            o_acc[d][2 * rr] *= alpha;
            o_acc[d][2 * rr + 1] *= alpha;
          }
        }

#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          // The score accumulators of keys 16kk..16kk+15 are exactly the A fragment of P.
          const uint32_t a[4] = {
              TypeTraits<T>::Pack2(s[2 * kk][0], s[2 * kk][1]),
              TypeTraits<T>::Pack2(s[2 * kk][2], s[2 * kk][3]),
              TypeTraits<T>::Pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
              TypeTraits<T>::Pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
          };
#pragma unroll
          for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {
            uint32_t b[4];  // B fragments: b[0..1] for d = dp*16 + 0..7, b[2..3] for d = dp*16 + 8..15
            LdMatrixX4Trans(b, v_tile + (kk * 16 + a_row) * kPitch + dp * 16 + a_col);
            Mma16816<T>(o_acc[2 * dp], a, b[0], b[1]);
            Mma16816<T>(o_acc[2 * dp + 1], a, b[2], b[3]);
          }
        }
      }
      // Everyone is done with this stage before the next iteration refills it.
      SyncThreads();
    }
  }

  if (!warp_active) return;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    row_sum[rr] += ShflXor(row_sum[rr], 1);
    row_sum[rr] += ShflXor(row_sum[rr], 2);
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = rows[rr];
    if (row >= m_end) continue;
    const int token = q_start + row / group;
    const int head = kv_head * group + row % group;
    const float l = row_sum[rr];
    const bool any = l > 0.f;
    const float inv = any ? 1.f / l : 0.f;
    const float lse = any ? (row_max[rr] + log2f(l)) * kLn2 : -INFINITY;
    const int col = 2 * (lane % 4);
    if (p.num_splits > 1) {
      const int64_t idx = (int64_t(split) * p.num_tokens + token) * p.num_heads + head;
      float* dst = p.partial_out + idx * HEAD_DIM + col;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o_acc[d][2 * rr] * inv, o_acc[d][2 * rr + 1] * inv);
      }
      if (lane % 4 == 0) p.partial_lse[idx] = lse;
    } else {
      T* dst = p.out + int64_t(token) * p.out_stride_token + int64_t(head) * p.out_stride_head + col;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        *reinterpret_cast<uint32_t*>(dst + d * 8) =
            TypeTraits<T>::Pack2(o_acc[d][2 * rr] * inv, o_acc[d][2 * rr + 1] * inv);
      }
      if (p.lse != nullptr && lane % 4 == 0) p.lse[int64_t(token) * p.num_heads + head] = lse;
    }
  }
}

// Combines the splits of each (token, head) row: weights exp(lse_s - max), splits with lse -inf skipped.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kMergeThreads) MergeSplitsKernel(const PagedAttentionParams<T> p) {
  constexpr int kThreadsPerRow = HEAD_DIM / 4;
  constexpr int kRowsPerBlock = kMergeThreads / kThreadsPerRow;
  const int64_t num_rows = int64_t(p.num_tokens) * p.num_heads;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  // Rows past the last sequence's queries have no partial results (the attention kernel never wrote
  // them): read nothing there and leave out and lse as they were.
  const int64_t owned_rows = int64_t(p.cu_q_lens[p.num_seqs]) * p.num_heads;
  if (row >= num_rows || row >= owned_rows) return;
  const int col = (threadIdx.x % kThreadsPerRow) * 4;

  float m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, p.partial_lse[s * num_rows + row]);
  float sum = 0.f;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (m != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float lse = p.partial_lse[s * num_rows + row];
      if (lse == -INFINITY) continue;
      const float w = expf(lse - m);
      const float4 o = *reinterpret_cast<const float4*>(p.partial_out + (s * num_rows + row) * HEAD_DIM + col);
      sum += w;
      acc[0] += w * o.x;
      acc[1] += w * o.y;
      acc[2] += w * o.z;
      acc[3] += w * o.w;
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const int64_t token = row / p.num_heads;
  const int64_t head = row % p.num_heads;
  T* dst = p.out + token * p.out_stride_token + head * p.out_stride_head + col;
  reinterpret_cast<uint32_t*>(dst)[0] = TypeTraits<T>::Pack2(acc[0] * inv, acc[1] * inv);
  reinterpret_cast<uint32_t*>(dst)[1] = TypeTraits<T>::Pack2(acc[2] * inv, acc[3] * inv);
  if (p.lse != nullptr && col == 0) p.lse[row] = sum > 0.f ? m + logf(sum) : -INFINITY;
}

}  // namespace detail

template <typename T, int HEAD_DIM>
cudaError_t PagedAttention(const PagedAttentionParams<T>& p, cudaStream_t stream) {
  using Tile = detail::PagedAttentionTile<HEAD_DIM>;
  static_assert(Tile::kBlockM == kPagedAttentionBlockM && Tile::kBlockN == kPagedAttentionBlockN,
                "the split heuristic and the kernel disagree on the tile");
  auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool strides_ok = p.q_stride_token % 8 == 0 && p.q_stride_head % 8 == 0 && p.out_stride_token % 8 == 0 &&
                          p.out_stride_head % 8 == 0 && p.k_stride_page % 8 == 0 && p.k_stride_token % 8 == 0 &&
                          p.k_stride_head % 8 == 0 && p.v_stride_page % 8 == 0 && p.v_stride_token % 8 == 0 &&
                          p.v_stride_head % 8 == 0;
  if (p.head_dim != HEAD_DIM || !IsPowerOfTwo(p.page_size) || p.num_kv_heads <= 0 || p.num_heads <= 0 ||
      p.num_heads % p.num_kv_heads != 0 || p.num_splits < 1 || p.num_tokens < 0 || p.num_seqs < 0 ||
      p.num_pages < 0 || p.max_pages < 0 || !strides_ok || !aligned16(p.q) || !aligned16(p.k_cache) ||
      !aligned16(p.v_cache) || !aligned16(p.out) ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0 || p.num_seqs == 0 || p.max_q_len <= 0) return cudaSuccess;

  const int group = p.num_heads / p.num_kv_heads;
  const int64_t grid_x = int64_t(p.num_seqs) * p.num_kv_heads;
  const int64_t grid_y = CeilDiv<int64_t>(int64_t(p.max_q_len) * group, Tile::kBlockM);
  if (grid_x > INT_MAX || grid_y > 65535 || p.num_splits > 65535 ||
      int64_t(p.num_tokens) * p.num_heads > INT_MAX) {
    return cudaErrorInvalidConfiguration;
  }

  auto kernel = detail::PagedAttentionKernel<T, HEAD_DIM>;
  cudaError_t err = detail::SetMaxDynamicSmem(kernel, Tile::kSmemBytes);
  if (err != cudaSuccess) return err;
  err = detail::LaunchKernel(kernel, dim3(unsigned(grid_x), unsigned(grid_y), unsigned(p.num_splits)),
                             dim3(Tile::kThreads), Tile::kSmemBytes, stream, p, Log2(p.page_size));
  if (err != cudaSuccess || p.num_splits == 1) return err;

  constexpr int kRowsPerBlock = detail::kMergeThreads / (HEAD_DIM / 4);
  const int64_t merge_blocks = CeilDiv<int64_t>(int64_t(p.num_tokens) * p.num_heads, kRowsPerBlock);
  return detail::LaunchKernel(detail::MergeSplitsKernel<T, HEAD_DIM>, dim3(unsigned(merge_blocks)),
                              dim3(detail::kMergeThreads), 0, stream, p);
}

}  // namespace arpg
