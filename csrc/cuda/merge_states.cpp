// arpg_cuda::merge_attention_states on CUDA (kernels in merge_states_kernels.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "arpg/merge_states.h"
#include "tensor_checks.h"

namespace arpg {
namespace {

constexpr const char* kOp = "arpg_cuda::merge_attention_states";

template <typename T>
cudaError_t Launch(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b, const at::Tensor& lse_b,
                   at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  MergeStatesParams<T> p{};
  p.out_a = reinterpret_cast<const T*>(out_a.data_ptr());
  p.lse_a = lse_a.data_ptr<float>();
  p.out_b = reinterpret_cast<const T*>(out_b.data_ptr());
  p.lse_b = lse_b.data_ptr<float>();
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.num_rows = out_a.size(0) * out_a.size(1);
  p.head_dim = static_cast<int>(out_a.size(2));
  return MergeStates<T>(p, stream);
}

std::tuple<at::Tensor, at::Tensor> MergeStatesCUDA(const at::Tensor& out_a_in, const at::Tensor& lse_a_in,
                                                   const at::Tensor& out_b_in, const at::Tensor& lse_b_in) {
  const at::Device device = out_a_in.device();
  CheckCuda(kOp, out_a_in, "out_a", device);
  CheckCuda(kOp, lse_a_in, "lse_a", device);
  CheckCuda(kOp, out_b_in, "out_b", device);
  CheckCuda(kOp, lse_b_in, "lse_b", device);
  CheckDim(kOp, out_a_in, "out_a", 3, "[T, H, D]");
  CheckDim(kOp, lse_a_in, "lse_a", 2, "[T, H]");
  const auto dtype = out_a_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, kOp,
              ": the cuda backend supports float16/bfloat16/float32 out_a, got ", dtype);
  CheckDtype(kOp, out_b_in, "out_b", dtype);
  CheckDtype(kOp, lse_a_in, "lse_a", at::kFloat);
  CheckDtype(kOp, lse_b_in, "lse_b", at::kFloat);
  TORCH_CHECK(out_b_in.sizes() == out_a_in.sizes(), kOp, ": out_b shape ", out_b_in.sizes(), " != out_a shape ",
              out_a_in.sizes());
  TORCH_CHECK(lse_a_in.size(0) == out_a_in.size(0) && lse_a_in.size(1) == out_a_in.size(1), kOp, ": lse_a shape ",
              lse_a_in.sizes(), " does not match out_a ", out_a_in.sizes());
  TORCH_CHECK(lse_b_in.sizes() == lse_a_in.sizes(), kOp, ": lse_b shape ", lse_b_in.sizes(), " != lse_a shape ",
              lse_a_in.sizes());
  TORCH_CHECK(out_a_in.size(2) > 0, kOp, ": head_dim must be positive");
  ToInt(kOp, out_a_in.size(2), "head_dim");

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor out_a = out_a_in.contiguous(), out_b = out_b_in.contiguous();
  const at::Tensor lse_a = lse_a_in.contiguous(), lse_b = lse_b_in.contiguous();
  at::Tensor out = at::empty(out_a.sizes(), out_a.options());
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaError_t err;
  if (dtype == at::kHalf) {
    err = Launch<half>(out_a, lse_a, out_b, lse_b, out, lse, stream);
  } else if (dtype == at::kBFloat16) {
    err = Launch<__nv_bfloat16>(out_a, lse_a, out_b, lse_b, out, lse, stream);
  } else {
    err = Launch<float>(out_a, lse_a, out_b, lse_b, out, lse, stream);
  }
  C10_CUDA_CHECK(err);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(arpg_cuda, CUDA, m) { m.impl("merge_attention_states", &MergeStatesCUDA); }

}  // namespace arpg
