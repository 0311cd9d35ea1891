// Argument checks shared by the CUDA adapters; every message names the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>

namespace arpg {

inline void CheckCuda(const char* op, const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the first argument is on ", device);
}

inline void CheckDim(const char* op, const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline void CheckDtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void CheckLastDimContiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dimension, got strides ", t.strides());
}

inline int ToInt(const char* op, int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= INT_MAX, op, ": ", what, " = ", value, " is out of the supported range");
  return static_cast<int>(value);
}

}  // namespace arpg
