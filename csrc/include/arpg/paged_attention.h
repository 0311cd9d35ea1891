// Paged attention forward: packed varlen queries against a paged KV cache (host-side declarations).
#pragma once

#include "arpg/common.h"

namespace arpg {

template <typename T>
struct PagedAttentionParams {
  const T* q;                  // [num_tokens, num_heads, head_dim]
  const T* k_cache;            // [num_pages, page_size, num_kv_heads, head_dim]
  const T* v_cache;            // [num_pages, page_size, num_kv_heads, head_dim]
  const int32_t* block_table;  // [num_seqs, max_pages]
  const int32_t* kv_lens;      // [num_seqs]
  const int32_t* cu_q_lens;    // [num_seqs + 1]
  T* out;                      // [num_tokens, num_heads, head_dim]
  float* lse;                  // [num_tokens, num_heads], contiguous; nullptr when not wanted
  // Split-KV workspace, required when num_splits > 1, contiguous:
  float* partial_out;  // [num_splits, num_tokens, num_heads, head_dim]
  float* partial_lse;  // [num_splits, num_tokens, num_heads]

  // Strides in elements; the head_dim axis is contiguous everywhere.
  int64_t q_stride_token, q_stride_head;
  int64_t out_stride_token, out_stride_head;
  int64_t k_stride_page, k_stride_token, k_stride_head;
  int64_t v_stride_page, v_stride_token, v_stride_head;
  int64_t block_table_stride;

  int num_tokens, num_heads, num_kv_heads, head_dim;
  int num_seqs, num_pages, page_size, max_pages;
  int max_q_len;   // upper bound of cu_q_lens[b + 1] - cu_q_lens[b]; sizes the grid
  int num_splits;  // >= 1
  bool causal;     // bottom-right aligned: query i sees keys j < kv_len - q_len + i + 1
  float scale;
};

constexpr int kPagedAttentionBlockM = 64;  // rows (query, head) per CTA
constexpr int kPagedAttentionBlockN = 64;  // keys per tile
constexpr int kPagedAttentionMaxSplits = 32;

// Split count from shapes only (never from kv_lens), so the host never waits on the device: split the
// keys when the (sequence, KV head, row block) CTAs alone cannot fill the GPU, at most one split per
// two key tiles. The kernel divides each block's actual key range evenly among the splits.
inline int PagedAttentionNumSplits(int num_seqs, int num_kv_heads, int group, int max_q_len, int max_pages,
                                   int page_size, int num_sms) {
  const int64_t row_blocks = CeilDiv<int64_t>(int64_t(Max(max_q_len, 0)) * group, kPagedAttentionBlockM);
  const int64_t ctas = int64_t(num_seqs) * num_kv_heads * row_blocks;
  const int64_t key_tiles = CeilDiv<int64_t>(int64_t(max_pages) * page_size, kPagedAttentionBlockN);
  if (ctas <= 0 || num_sms <= 0 || ctas >= num_sms) return 1;
  const int64_t want = CeilDiv<int64_t>(2 * int64_t(num_sms), ctas);
  const int64_t splits = Min<int64_t>(Min<int64_t>(want, key_tiles / 2), kPagedAttentionMaxSplits);
  return int(Max<int64_t>(splits, 1));
}

// Launches the attention kernel (and the merge kernel when p.num_splits > 1) on `stream`.
// Requirements, reported as cudaErrorInvalidValue: head_dim == HEAD_DIM; page_size a power of two;
// num_heads a multiple of num_kv_heads; q, k_cache, v_cache 16-byte aligned with strides that are
// multiples of 8 elements; out strides multiples of 8; the split workspace present when num_splits > 1.
// Rows of q that no sequence owns (past cu_q_lens[num_seqs]) are not written.
// Instantiated for T in {half, __nv_bfloat16} and HEAD_DIM in {64, 128} (csrc/cuda/paged_attention_kernels.cu).
template <typename T, int HEAD_DIM>
cudaError_t PagedAttention(const PagedAttentionParams<T>& p, cudaStream_t stream);

}  // namespace arpg
