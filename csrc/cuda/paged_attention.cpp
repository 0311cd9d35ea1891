// arpg_cuda::paged_attention on CUDA: argument checks, dtype/head_dim dispatch, split workspace, launch.
// The kernels are compiled by nvcc in paged_attention_kernels.cu; this file is plain C++.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <limits>
#include <tuple>

#include "arpg/paged_attention.h"
#include "tensor_checks.h"

namespace arpg {
namespace {

constexpr const char* kOp = "arpg_cuda::paged_attention";

// The stride the kernel steps by along dim d: 0 for a size-1 dim, which is never stepped along and whose
// stride torch leaves arbitrary (Aligned16 ignores it too; passed as is it could fail the launcher's
// multiple-of-8 check with an opaque cudaErrorInvalidValue).
int64_t StepStride(const at::Tensor& t, int64_t d) { return t.size(d) > 1 ? t.stride(d) : 0; }

template <typename T, int HEAD_DIM>
cudaError_t Launch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_table, const at::Tensor& kv_lens, const at::Tensor& cu_q_lens,
                   at::Tensor& out, at::Tensor& lse, at::Tensor& partial_out, at::Tensor& partial_lse,
                   int max_q_len, bool causal, float scale, bool return_lse, int num_splits, cudaStream_t stream) {
  PagedAttentionParams<T> p{};
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.k_cache = reinterpret_cast<const T*>(k_cache.data_ptr());
  p.v_cache = reinterpret_cast<const T*>(v_cache.data_ptr());
  p.block_table = block_table.data_ptr<int32_t>();
  p.kv_lens = kv_lens.data_ptr<int32_t>();
  p.cu_q_lens = cu_q_lens.data_ptr<int32_t>();
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  p.partial_out = num_splits > 1 ? partial_out.data_ptr<float>() : nullptr;
  p.partial_lse = num_splits > 1 ? partial_lse.data_ptr<float>() : nullptr;
  p.q_stride_token = StepStride(q, 0);
  p.q_stride_head = StepStride(q, 1);
  p.out_stride_token = StepStride(out, 0);
  p.out_stride_head = StepStride(out, 1);
  p.k_stride_page = StepStride(k_cache, 0);
  p.k_stride_token = StepStride(k_cache, 1);
  p.k_stride_head = StepStride(k_cache, 2);
  p.v_stride_page = StepStride(v_cache, 0);
  p.v_stride_token = StepStride(v_cache, 1);
  p.v_stride_head = StepStride(v_cache, 2);
  p.block_table_stride = block_table.stride(0);
  p.num_tokens = static_cast<int>(q.size(0));
  p.num_heads = static_cast<int>(q.size(1));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.head_dim = HEAD_DIM;
  p.num_seqs = static_cast<int>(block_table.size(0));
  p.num_pages = static_cast<int>(k_cache.size(0));
  p.page_size = static_cast<int>(k_cache.size(1));
  p.max_pages = static_cast<int>(block_table.size(1));
  p.max_q_len = max_q_len;
  p.num_splits = num_splits;
  p.causal = causal;
  p.scale = scale;
  return PagedAttention<T, HEAD_DIM>(p, stream);
}

template <typename T>
cudaError_t LaunchHeadDim(int head_dim, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_table, const at::Tensor& kv_lens, const at::Tensor& cu_q_lens,
                          at::Tensor& out, at::Tensor& lse, at::Tensor& partial_out, at::Tensor& partial_lse,
                          int max_q_len, bool causal, float scale, bool return_lse, int num_splits,
                          cudaStream_t stream) {
  if (head_dim == 64) {
    return Launch<T, 64>(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, out, lse, partial_out, partial_lse,
                         max_q_len, causal, scale, return_lse, num_splits, stream);
  }
  return Launch<T, 128>(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, out, lse, partial_out, partial_lse,
                        max_q_len, causal, scale, return_lse, num_splits, stream);
}

bool Aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// SM count per device, queried once (so a captured decoding step makes no such call).
int NumSms(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= int(cache.size())) return 0;  // split by shapes as if the GPU were large
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

std::tuple<at::Tensor, at::Tensor> PagedAttentionCUDA(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& block_table_in,
                                                      const at::Tensor& kv_lens_in, const at::Tensor& cu_q_lens_in,
                                                      int64_t max_q_len, bool causal, double scale, bool return_lse,
                                                      int64_t num_splits) {
  const at::Device device = q.device();
  CheckCuda(kOp, q, "q", device);
  CheckCuda(kOp, k_cache, "k_cache", device);
  CheckCuda(kOp, v_cache, "v_cache", device);
  CheckCuda(kOp, block_table_in, "block_table", device);
  CheckCuda(kOp, kv_lens_in, "kv_lens", device);
  CheckCuda(kOp, cu_q_lens_in, "cu_q_lens", device);
  CheckDim(kOp, q, "q", 3, "[T, H, D]");
  CheckDim(kOp, k_cache, "k_cache", 4, "[num_pages, page_size, Hkv, D]");
  CheckDim(kOp, v_cache, "v_cache", 4, "[num_pages, page_size, Hkv, D]");
  CheckDim(kOp, block_table_in, "block_table", 2, "[B, max_pages]");
  CheckDim(kOp, kv_lens_in, "kv_lens", 1, "[B]");
  CheckDim(kOp, cu_q_lens_in, "cu_q_lens", 1, "[B + 1]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": the cuda backend supports float16/bfloat16 q, got ", dtype);
  CheckDtype(kOp, k_cache, "k_cache", dtype);
  CheckDtype(kOp, v_cache, "v_cache", dtype);
  CheckDtype(kOp, block_table_in, "block_table", at::kInt);
  CheckDtype(kOp, kv_lens_in, "kv_lens", at::kInt);
  CheckDtype(kOp, cu_q_lens_in, "cu_q_lens", at::kInt);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), kOp, ": k_cache and v_cache shapes differ: ", k_cache.sizes(),
              " vs ", v_cache.sizes());

  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, kOp,
              ": the cuda backend supports head_dim 64 or 128, got q of shape ", q.sizes());
  TORCH_CHECK(k_cache.size(3) == head_dim, kOp, ": k_cache head_dim ", k_cache.size(3), " != q head_dim ", head_dim);
  const int64_t page_size = k_cache.size(1);
  TORCH_CHECK(page_size == 16 || page_size == 32 || page_size == 64, kOp,
              ": the cuda backend supports page_size 16, 32 or 64, got page_size ", page_size);
  const int64_t num_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, kOp, ": q heads (", num_heads,
              ") must be a multiple of the cache's KV heads (", num_kv_heads, ")");
  const int64_t num_seqs = block_table_in.size(0);
  TORCH_CHECK(kv_lens_in.size(0) == num_seqs, kOp, ": kv_lens has ", kv_lens_in.size(0),
              " entries but block_table has ", num_seqs, " rows");
  TORCH_CHECK(cu_q_lens_in.size(0) == num_seqs + 1, kOp, ": cu_q_lens must have B + 1 = ", num_seqs + 1,
              " entries, got ", cu_q_lens_in.size(0));
  TORCH_CHECK(max_q_len >= 0, kOp, ": max_q_len must be >= 0, got ", max_q_len);
  TORCH_CHECK(num_splits >= 0, kOp, ": num_splits must be >= 0 (0 picks from the shapes), got ", num_splits);
  CheckLastDimContiguous(kOp, q, "q");
  CheckLastDimContiguous(kOp, k_cache, "k_cache");
  CheckLastDimContiguous(kOp, v_cache, "v_cache");
  TORCH_CHECK(Aligned16(q), kOp,
              ": q must be 16-byte aligned with strides that are multiples of 8, got strides ", q.strides());
  TORCH_CHECK(Aligned16(k_cache), kOp, ": k_cache must be 16-byte aligned with strides that are multiples of 8, ",
              "got strides ", k_cache.strides());
  TORCH_CHECK(Aligned16(v_cache), kOp, ": v_cache must be 16-byte aligned with strides that are multiples of 8, ",
              "got strides ", v_cache.strides());

  const int num_tokens = ToInt(kOp, q.size(0), "q.size(0)");
  ToInt(kOp, q.size(0) * num_heads, "tokens * heads");
  ToInt(kOp, num_seqs, "B");
  ToInt(kOp, k_cache.size(0), "num_pages");
  const int max_pages = ToInt(kOp, block_table_in.size(1), "max_pages");
  const int q_len_bound = ToInt(kOp, max_q_len, "max_q_len");

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor block_table = block_table_in.stride(1) == 1 ? block_table_in : block_table_in.contiguous();
  const at::Tensor kv_lens = kv_lens_in.contiguous();
  const at::Tensor cu_q_lens = cu_q_lens_in.contiguous();

  at::Tensor out = at::empty({q.size(0), num_heads, head_dim}, q.options());
  const auto lse_options = q.options().dtype(at::kFloat);
  at::Tensor lse = return_lse ? at::empty({q.size(0), num_heads}, lse_options) : at::empty({0}, lse_options);
  if (num_tokens == 0) return {out, lse};
  if (num_seqs == 0 || q_len_bound == 0) {
    out.zero_();
    if (return_lse) lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const int group = static_cast<int>(num_heads / num_kv_heads);
  const int64_t key_tiles = (int64_t(max_pages) * page_size + kPagedAttentionBlockN - 1) / kPagedAttentionBlockN;
  int splits = 1;
  if (num_splits > 0) {
    splits = static_cast<int>(std::min<int64_t>(num_splits, std::max<int64_t>(key_tiles, 1)));
  } else {
    splits = PagedAttentionNumSplits(static_cast<int>(num_seqs), static_cast<int>(num_kv_heads), group, q_len_bound,
                                     max_pages, static_cast<int>(page_size), NumSms(device.index()));
  }
  at::Tensor partial_out, partial_lse;
  if (splits > 1) {
    partial_out = at::empty({splits, q.size(0), num_heads, head_dim}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({splits, q.size(0), num_heads}, q.options().dtype(at::kFloat));
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const float scale_f = static_cast<float>(scale);
  const cudaError_t err =
      dtype == at::kHalf
          ? LaunchHeadDim<half>(static_cast<int>(head_dim), q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, out,
                                lse, partial_out, partial_lse, q_len_bound, causal, scale_f, return_lse, splits, stream)
          : LaunchHeadDim<__nv_bfloat16>(static_cast<int>(head_dim), q, k_cache, v_cache, block_table, kv_lens,
                                         cu_q_lens, out, lse, partial_out, partial_lse, q_len_bound, causal, scale_f,
                                         return_lse, splits, stream);
  C10_CUDA_CHECK(err);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(arpg_cuda, CUDA, m) { m.impl("paged_attention", &PagedAttentionCUDA); }

}  // namespace arpg
