// arpg_cpu::paged_attention, append_kv(_rope), merge_attention_states and sample_tokens: the CPU backend
// behind torch.ops.arpg.* (arpg_kernels/cpu.py routes there after the shared Python checks). Work items
// are (sequence, KV head, block of queries), taken costliest first by torch's intra-op threads; each streams its sequence's pages in place
// (csrc/include/arpg/cpu/paged_attention.h). Importing the Python module arpg_kernels._cpu loads this
// library and so registers the ops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "arpg/cpu/merge_states.h"
#include "arpg/cpu/paged_attention.h"
#include "arpg/cpu/sample.h"
#include "arpg/cpu/step_ops.h"

// c10::BFloat16 holds bfloat16 bits: the kernel may multiply them raw (AVX512_BF16).
template <>
struct arpg::cpu::IsBFloat16<c10::BFloat16> : std::true_type {};

namespace arpg {
namespace {

// Queries per work item. Each item reads its sequence's K/V once for all its rows, so long query runs
// take the longest block that still gives every thread several items.
constexpr int kQueryBlocks[] = {64, 32, 16};
constexpr int kMaxRows = 256;  // rows (queries x heads of a group) per item: its scratch stays in L2

struct WorkItem {
  int64_t cost;  // rows x visible keys
  int seq, kv_head, q_begin;
  int heads;  // KV heads kv_head, kv_head + 1, ... (more than one: the few-row path, tile by tile)
};

template <typename T>
void Run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
         const at::Tensor& kv_lens, const at::Tensor& cu_q_lens, int64_t max_q_len, bool causal, double scale,
         at::Tensor& out, at::Tensor& lse, bool return_lse) {
  cpu::PagedAttentionArgs<T> a{};
  a.q = reinterpret_cast<const T*>(q.data_ptr());
  a.k_cache = reinterpret_cast<const T*>(k_cache.data_ptr());
  a.v_cache = reinterpret_cast<const T*>(v_cache.data_ptr());
  a.block_table = block_table.data_ptr<int32_t>();
  a.kv_lens = kv_lens.data_ptr<int32_t>();
  a.cu_q_lens = cu_q_lens.data_ptr<int32_t>();
  a.out = reinterpret_cast<T*>(out.data_ptr());
  a.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  a.q_stride_token = q.stride(0);
  a.q_stride_head = q.stride(1);
  a.out_stride_token = out.stride(0);
  a.out_stride_head = out.stride(1);
  a.k_stride_page = k_cache.stride(0);
  a.k_stride_token = k_cache.stride(1);
  a.k_stride_head = k_cache.stride(2);
  a.v_stride_page = v_cache.stride(0);
  a.v_stride_token = v_cache.stride(1);
  a.v_stride_head = v_cache.stride(2);
  a.block_table_stride = block_table.stride(0);
  a.lse_stride_token = return_lse ? lse.stride(0) : 0;
  a.num_heads = static_cast<int>(q.size(1));
  a.num_kv_heads = static_cast<int>(k_cache.size(2));
  a.head_dim = static_cast<int>(q.size(2));
  a.num_pages = static_cast<int>(k_cache.size(0));
  a.page_size = static_cast<int>(k_cache.size(1));
  a.max_pages = static_cast<int>(block_table.size(1));
  a.causal = causal;
  a.scale = static_cast<float>(scale);

  // Items with visible keys only (the output is prefilled with 0 and the LSE with -inf), costliest
  // first, handed out one at a time by an atomic counter: varlen batches stay balanced.
  const int seqs = static_cast<int>(block_table.size(0));
  // The Python value checks may be off (ak.set_checks(False)): page ids and kv_lens are clamped in the
  // kernel, and queries outside q are refused here.
  for (int seq = 0; seq < seqs; ++seq) {
    TORCH_CHECK(a.cu_q_lens[seq] >= 0 && a.cu_q_lens[seq] <= a.cu_q_lens[seq + 1] && a.cu_q_lens[seq + 1] <= q.size(0),
                "arpg_cpu::paged_attention: cu_q_lens must be non-decreasing within [0, ", q.size(0), "], got ",
                a.cu_q_lens[seq], ", ", a.cu_q_lens[seq + 1], " at sequence ", seq);
  }
  const int group = a.num_heads / a.num_kv_heads;
  const int max_kv = a.max_pages * a.page_size;
  const int64_t threads = at::get_num_threads();
  int block = kQueryBlocks[2];
  for (int b : kQueryBlocks) {
    if (b * group > kMaxRows && b != kQueryBlocks[2]) continue;
    int64_t count = 0;
    for (int seq = 0; seq < seqs; ++seq) count += (a.cu_q_lens[seq + 1] - a.cu_q_lens[seq] + b - 1) / b;
    if (count * a.num_kv_heads >= 4 * threads) {
      block = b;
      break;
    }
  }
  // Few-row sequences are served several KV heads per item, tile by tile (cpu::PagedAttentionHeads: the reads
  // then sweep each page in order), as many heads as still leave 4 items per thread.
  int64_t blocks = 0;
  for (int seq = 0; seq < seqs; ++seq) blocks += (a.cu_q_lens[seq + 1] - a.cu_q_lens[seq] + block - 1) / block;
  const int heads_per_item = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({a.num_kv_heads, cpu::kMaxHeadsPerItem, blocks * a.num_kv_heads / (4 * threads)})));
  std::vector<WorkItem> items;
  bool uniform = true;
  for (int seq = 0; seq < seqs; ++seq) {
    const int q_len = a.cu_q_lens[seq + 1] - a.cu_q_lens[seq];
    const int kv_len = std::min(std::max(a.kv_lens[seq], 0), max_kv);
    const int per_item = cpu::PagedAttentionNarrow(a, seq) ? heads_per_item : 1;
    for (int q_begin = 0; q_begin < q_len; q_begin += block) {
      const int q_end = std::min(q_begin + block, q_len);
      const int span = causal ? std::min(kv_len, std::max(kv_len - q_len + q_end, 0)) : kv_len;
      if (span <= 0) continue;
      const int64_t cost = static_cast<int64_t>(q_end - q_begin) * group * span;
      for (int head = 0; head < a.num_kv_heads; head += per_item) {
        const int heads = std::min(per_item, a.num_kv_heads - head);
        uniform = uniform && (items.empty() || items.back().cost == cost * heads);
        items.push_back({cost * heads, seq, head, q_begin, heads});
      }
    }
  }
  if (!uniform) {
    std::stable_sort(items.begin(), items.end(), [](const WorkItem& x, const WorkItem& y) { return x.cost > y.cost; });
  }
  const int64_t n = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n), 1, [&](int64_t, int64_t) {
    std::vector<cpu::PagedAttentionScratch> scratch(heads_per_item);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed)) {
      const WorkItem& it = items[i];
      if (it.heads > 1) {
        cpu::PagedAttentionHeads(a, it.seq, it.kv_head, it.kv_head + it.heads, it.q_begin, it.q_begin + block,
                                 scratch.data());
      } else {
        cpu::PagedAttentionBlock(a, it.seq, it.kv_head, it.q_begin, it.q_begin + block, scratch[0]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> PagedAttention(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                                  const at::Tensor& kv_lens, const at::Tensor& cu_q_lens,
                                                  int64_t max_q_len, bool causal, double scale, bool return_lse) {
  // Shapes, dtypes and index values are checked in Python (arpg_kernels/checks.py); these guard the
  // raw-pointer reads below against a direct call.
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "arpg_cpu::paged_attention: bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "arpg_cpu::paged_attention: the head dim must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && kv_lens.scalar_type() == at::kInt &&
                  cu_q_lens.scalar_type() == at::kInt && block_table.is_contiguous() && kv_lens.is_contiguous() &&
                  cu_q_lens.is_contiguous(),
              "arpg_cpu::paged_attention: index tensors must be contiguous int32");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "arpg_cpu::paged_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(block_table.dim() == 2 && kv_lens.numel() == block_table.size(0) &&
                  cu_q_lens.numel() == block_table.size(0) + 1,
              "arpg_cpu::paged_attention: kv_lens needs B and cu_q_lens B + 1 entries for a block_table of B rows");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(2) &&
                  k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "arpg_cpu::paged_attention: the caches must match each other and q in shape and dtype");
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = return_lse ? at::full({q.size(0), q.size(1)}, -std::numeric_limits<float>::infinity(),
                                         q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  if (q.size(0) == 0 || block_table.size(0) == 0 || block_table.size(1) == 0 || k_cache.size(0) == 0) {
    return {out, lse};
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      Run<float>(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale, out, lse, return_lse);
      break;
    case at::kHalf:
      Run<c10::Half>(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale, out, lse,
                     return_lse);
      break;
    case at::kBFloat16:
      Run<c10::BFloat16>(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale, out, lse,
                         return_lse);
      break;
    default:
      TORCH_CHECK(false, "arpg_cpu::paged_attention: dtype must be float32, float16 or bfloat16, got ",
                  q.scalar_type());
  }
  return {out, lse};
}

// Rows k[t], v[t] ([Hkv, D] each) into slot slot_mapping[t] of the caches; -1 skips the row. Only the
// written rows are touched (the reference copies the whole cache).
void AppendKv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "arpg_cpu::append_kv: bad ranks");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
                  k.scalar_type() == v.scalar_type(),
              "arpg_cpu::append_kv: k, v and the caches must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "arpg_cpu::append_kv: the head dim must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "arpg_cpu::append_kv: slot_mapping must be contiguous int64");
  const int64_t rows = k.size(0), heads = k.size(1), bytes = k.size(2) * k.element_size();
  const int64_t page_size = k_cache.size(1), slots_total = k_cache.size(0) * page_size;
  const int64_t esize = k.element_size();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= slots_total) continue;  // -1 skips; the Python checks refuse the rest
      const int64_t page = slot / page_size, off = slot % page_size;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(kc + (page * k_cache.stride(0) + off * k_cache.stride(1) + h * k_cache.stride(2)) * esize,
                    kp + (t * k.stride(0) + h * k.stride(1)) * esize, bytes);
        std::memcpy(vc + (page * v_cache.stride(0) + off * v_cache.stride(1) + h * v_cache.stride(2)) * esize,
                    vp + (t * v.stride(0) + h * v.stride(1)) * esize, bytes);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> MergeAttentionStates(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                        const at::Tensor& out_b, const at::Tensor& lse_b) {
  TORCH_CHECK(out_a.dim() == 3 && out_b.sizes() == out_a.sizes() && out_b.scalar_type() == out_a.scalar_type() &&
                  lse_a.dim() == 2 && lse_b.dim() == 2 && lse_a.size(0) == out_a.size(0) &&
                  lse_a.size(1) == out_a.size(1) && lse_b.sizes() == lse_a.sizes(),
              "arpg_cpu::merge_attention_states: bad shapes");
  TORCH_CHECK(lse_a.scalar_type() == at::kFloat && lse_b.scalar_type() == at::kFloat,
              "arpg_cpu::merge_attention_states: lse must be float32");
  TORCH_CHECK(out_a.stride(2) == 1 && out_b.stride(2) == 1,
              "arpg_cpu::merge_attention_states: the head dim must be contiguous");
  at::Tensor out = at::empty(out_a.sizes(), out_a.options());
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());
  const int64_t rows = out_a.size(0) * out_a.size(1);
  if (rows == 0) return {out, lse};
  auto run = [&](auto tag) {
    using T = decltype(tag);
    cpu::MergeStatesArgs<T> a{};
    a.out_a = reinterpret_cast<const T*>(out_a.data_ptr());
    a.out_b = reinterpret_cast<const T*>(out_b.data_ptr());
    a.lse_a = lse_a.data_ptr<float>();
    a.lse_b = lse_b.data_ptr<float>();
    a.out = reinterpret_cast<T*>(out.data_ptr());
    a.lse = lse.data_ptr<float>();
    a.a_stride_token = out_a.stride(0);
    a.a_stride_head = out_a.stride(1);
    a.b_stride_token = out_b.stride(0);
    a.b_stride_head = out_b.stride(1);
    a.lse_a_stride_token = lse_a.stride(0);
    a.lse_a_stride_head = lse_a.stride(1);
    a.lse_b_stride_token = lse_b.stride(0);
    a.lse_b_stride_head = lse_b.stride(1);
    a.num_heads = out_a.size(1);
    a.head_dim = out_a.size(2);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.head_dim, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { cpu::MergeStatesRows(a, begin, end); });
  };
  switch (out_a.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "arpg_cpu::merge_attention_states: dtype must be float32, float16 or bfloat16, got ",
                  out_a.scalar_type());
  }
  return {out, lse};
}

}  // namespace
}  // namespace arpg

namespace arpg {
namespace {

template <typename T>
void AppendKvRopeTyped(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                       const int64_t* slots, const float* table) {
  const int64_t rows = k.size(0), heads = k.size(1), dim = k.size(2), pairs = dim / 2;
  const int64_t page_size = k_cache.size(1), slots_total = k_cache.size(0) * page_size;
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  T* kc = reinterpret_cast<T*>(k_cache.data_ptr());
  T* vc = reinterpret_cast<T*>(v_cache.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> x(dim), y(dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= slots_total) continue;  // -1 skips; the Python checks refuse the rest
      const int64_t page = slot / page_size, off = slot % page_size;
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = kp + t * k.stride(0) + h * k.stride(1);
        for (int64_t d = 0; d < dim; ++d) x[d] = static_cast<float>(src[d]);
        cpu::RotatePairs(x.data(), table + t * pairs * 2, pairs, y.data());
        T* dst = kc + page * k_cache.stride(0) + off * k_cache.stride(1) + h * k_cache.stride(2);
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(y[d]);
        std::memcpy(vc + page * v_cache.stride(0) + off * v_cache.stride(1) + h * v_cache.stride(2),
                    vp + t * v.stride(0) + h * v.stride(1), dim * sizeof(T));
      }
    }
  });
}

// append_kv with k rotated on the way in: rope float32 [T, D / 2, 2] (cos, sin), contiguous.
void AppendKvRope(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                  const at::Tensor& slot_mapping, const at::Tensor& rope) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && k.sizes() == v.sizes(),
              "arpg_cpu::append_kv_rope: bad ranks");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
                  k.scalar_type() == v.scalar_type(),
              "arpg_cpu::append_kv_rope: k, v and the caches must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "arpg_cpu::append_kv_rope: the head dim must be contiguous");
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3) && k_cache.sizes() == v_cache.sizes(),
              "arpg_cpu::append_kv_rope: rows must match the caches' [Hkv, D]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0),
              "arpg_cpu::append_kv_rope: slot_mapping must be contiguous int64 [T]");
  TORCH_CHECK(k.size(2) % 2 == 0 && rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.dim() == 3 &&
                  rope.size(0) == k.size(0) && rope.size(1) == k.size(2) / 2 && rope.size(2) == 2,
              "arpg_cpu::append_kv_rope: rope must be contiguous float32 [T, D / 2, 2] (D even)");
  if (k.size(0) == 0 || k.size(1) == 0 || k.size(2) == 0) return;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* table = rope.data_ptr<float>();
  switch (k.scalar_type()) {
    case at::kFloat:
      AppendKvRopeTyped<float>(k, v, k_cache, v_cache, slots, table);
      break;
    case at::kHalf:
      AppendKvRopeTyped<c10::Half>(k, v, k_cache, v_cache, slots, table);
      break;
    case at::kBFloat16:
      AppendKvRopeTyped<c10::BFloat16>(k, v, k_cache, v_cache, slots, table);
      break;
    default:
      TORCH_CHECK(false, "arpg_cpu::append_kv_rope: dtype must be float32, float16 or bfloat16, got ", k.scalar_type());
  }
}

// One token per row of logits [T, V] float32 (guided by uncond [T, V] and cfg_scale [T] when given), drawn
// against uniforms [T] float64 (arpg/cpu/sample.h). Rows are independent: split over the threads.
at::Tensor SampleTokens(const at::Tensor& logits, const c10::optional<at::Tensor>& uncond,
                        const c10::optional<at::Tensor>& cfg_scale, const at::Tensor& uniforms, double temperature,
                        int64_t top_k, double top_p) {
  // Shapes and dtypes are checked in Python (arpg_kernels/checks.py); these guard the raw-pointer reads.
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "arpg_cpu::sample_tokens: logits must be float32 [T, V] with contiguous rows");
  TORCH_CHECK(uncond.has_value() == cfg_scale.has_value(), "arpg_cpu::sample_tokens: uncond and cfg_scale go together");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 1 && uniforms.size(0) == rows &&
                  uniforms.is_contiguous(),
              "arpg_cpu::sample_tokens: uniforms must be contiguous float64 [T]");
  const float* un = nullptr;
  const float* sc = nullptr;
  int64_t un_stride = 0;
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->sizes() == logits.sizes() && uncond->scalar_type() == at::kFloat && uncond->stride(1) == 1,
                "arpg_cpu::sample_tokens: uncond must match logits");
    TORCH_CHECK(cfg_scale->scalar_type() == at::kFloat && cfg_scale->dim() == 1 && cfg_scale->size(0) == rows &&
                    cfg_scale->is_contiguous(),
                "arpg_cpu::sample_tokens: cfg_scale must be contiguous float32 [T]");
    un = uncond->data_ptr<float>();
    un_stride = uncond->stride(0);
    sc = cfg_scale->data_ptr<float>();
  }
  TORCH_CHECK(vocab > 0 || rows == 0, "arpg_cpu::sample_tokens: the vocabulary is empty");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  const cpu::SampleArgs args{vocab, static_cast<float>(temperature), top_k, top_p};
  const float* lg = logits.data_ptr<float>();
  const int64_t lg_stride = logits.stride(0);
  const double* u = uniforms.data_ptr<double>();
  int64_t* tokens = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / vocab), [&](int64_t begin, int64_t end) {
    cpu::SampleScratch scratch;
    for (int64_t r = begin; r < end; ++r) {
      tokens[r] = cpu::SampleRow(args, lg + r * lg_stride, un == nullptr ? nullptr : un + r * un_stride,
                                 sc == nullptr ? 0.0f : sc[r], u[r], scratch);
    }
  });
  return out;
}

}  // namespace
}  // namespace arpg

TORCH_LIBRARY(arpg_cpu, m) {
  m.set_python_module("arpg_kernels.cpu");
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor kv_lens, "
      "Tensor cu_q_lens, int max_q_len, bool causal, float scale, bool return_lse) -> (Tensor out, Tensor lse)");
  m.def("append_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "append_kv_rope(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor rope) -> "
      "()");
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor out, Tensor lse)");
  m.def(
      "sample_tokens(Tensor logits, Tensor? uncond, Tensor? cfg_scale, Tensor uniforms, float temperature, "
      "int top_k, float top_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(arpg_cpu, CPU, m) {
  m.impl("paged_attention", &arpg::PagedAttention);
  m.impl("append_kv", &arpg::AppendKv);
  m.impl("append_kv_rope", &arpg::AppendKvRope);
  m.impl("merge_attention_states", &arpg::MergeAttentionStates);
  m.impl("sample_tokens", &arpg::SampleTokens);
}

extern "C" {
PyObject* PyInit__cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
