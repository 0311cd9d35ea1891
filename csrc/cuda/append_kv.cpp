// arpg_cuda::append_kv on CUDA: write rows of k/v into their cache slots in place (kernels in
// append_kv_kernels.cu).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "arpg/append_kv.h"
#include "tensor_checks.h"

namespace arpg {
namespace {

constexpr const char* kOp = "arpg_cuda::append_kv";

template <typename T>
cudaError_t Launch(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& slot_mapping, cudaStream_t stream) {
  AppendKVParams<T> p{};
  p.k = reinterpret_cast<const T*>(k.data_ptr());
  p.v = reinterpret_cast<const T*>(v.data_ptr());
  p.k_cache = reinterpret_cast<T*>(k_cache.data_ptr());
  p.v_cache = reinterpret_cast<T*>(v_cache.data_ptr());
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.k_stride_token = k.stride(0);
  p.k_stride_head = k.stride(1);
  p.v_stride_token = v.stride(0);
  p.v_stride_head = v.stride(1);
  p.k_cache_stride_page = k_cache.stride(0);
  p.k_cache_stride_token = k_cache.stride(1);
  p.k_cache_stride_head = k_cache.stride(2);
  p.v_cache_stride_page = v_cache.stride(0);
  p.v_cache_stride_token = v_cache.stride(1);
  p.v_cache_stride_head = v_cache.stride(2);
  p.num_tokens = ToInt(kOp, k.size(0), "T");
  p.num_kv_heads = ToInt(kOp, k.size(1), "Hkv");
  p.head_dim = ToInt(kOp, k.size(2), "D");
  p.num_pages = ToInt(kOp, k_cache.size(0), "num_pages");
  p.page_size = ToInt(kOp, k_cache.size(1), "page_size");
  return AppendKV<T>(p, stream);
}

void AppendKVCUDA(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slot_mapping_in) {
  const at::Device device = k_cache.device();
  CheckCuda(kOp, k_cache, "k_cache", device);
  CheckCuda(kOp, v_cache, "v_cache", device);
  CheckCuda(kOp, k_in, "k", device);
  CheckCuda(kOp, v_in, "v", device);
  CheckCuda(kOp, slot_mapping_in, "slot_mapping", device);
  CheckDim(kOp, k_cache, "k_cache", 4, "[num_pages, page_size, Hkv, D]");
  CheckDim(kOp, v_cache, "v_cache", 4, "[num_pages, page_size, Hkv, D]");
  CheckDim(kOp, k_in, "k", 3, "[T, Hkv, D]");
  CheckDim(kOp, v_in, "v", 3, "[T, Hkv, D]");
  CheckDim(kOp, slot_mapping_in, "slot_mapping", 1, "[T]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), kOp, ": k_cache and v_cache shapes differ: ", k_cache.sizes(),
              " vs ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), kOp, ": k_cache and v_cache dtypes differ");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, kOp,
              ": the cuda backend supports float16/bfloat16/float32 caches, got ", dtype);
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), kOp, ": k and v shapes differ: ", k_in.sizes(), " vs ", v_in.sizes());
  TORCH_CHECK(k_in.size(1) == k_cache.size(2) && k_in.size(2) == k_cache.size(3), kOp, ": k of shape ", k_in.sizes(),
              " does not match the cache's [Hkv, D] = [", k_cache.size(2), ", ", k_cache.size(3), "]");
  TORCH_CHECK(slot_mapping_in.size(0) == k_in.size(0), kOp, ": slot_mapping has ", slot_mapping_in.size(0),
              " entries for ", k_in.size(0), " rows of k");
  TORCH_CHECK(slot_mapping_in.scalar_type() == at::kLong || slot_mapping_in.scalar_type() == at::kInt, kOp,
              ": slot_mapping must be int64 (or int32), got ", slot_mapping_in.scalar_type());
  CheckLastDimContiguous(kOp, k_cache, "k_cache");
  CheckLastDimContiguous(kOp, v_cache, "v_cache");

  const c10::cuda::CUDAGuard guard(device);
  // Rows are copied as bytes, so bring k/v to the cache dtype with a contiguous last dimension.
  auto prepare = [&](const at::Tensor& t) {
    at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
    return r.size(-1) <= 1 || r.stride(-1) == 1 ? r : r.contiguous();
  };
  const at::Tensor k = prepare(k_in);
  const at::Tensor v = prepare(v_in);
  const at::Tensor slot_mapping = slot_mapping_in.to(at::kLong).contiguous();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (k_cache.size(1) == 0) return;  // a cache without slots: every row is dropped
  switch (dtype) {
    case at::kHalf:
      C10_CUDA_CHECK(Launch<half>(k, v, k_cache, v_cache, slot_mapping, stream));
      break;
    case at::kBFloat16:
      C10_CUDA_CHECK(Launch<__nv_bfloat16>(k, v, k_cache, v_cache, slot_mapping, stream));
      break;
    default:
      C10_CUDA_CHECK(Launch<float>(k, v, k_cache, v_cache, slot_mapping, stream));
      break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(arpg_cuda, CUDA, m) { m.impl("append_kv", &AppendKVCUDA); }

}  // namespace arpg
