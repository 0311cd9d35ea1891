// arpg_cpu::rms_norm, add_rms_norm, silu_mul and rope: a decoding step's elementwise chains in one op each
// (csrc/include/arpg/cpu/step_ops.h). arpg/model.py's decoding path calls them on CPU tensors through
// arpg_kernels/cpu.py: on a CPU a step's host time is mostly the number of ops, and RMSNorm alone is eight.
// Rows are the leading dim with any stride (a broadcast [MASK] query row has stride 0); the last dim is
// contiguous. Small inputs stay on one thread: a step's tensors are a few hundred rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "arpg/cpu/step_ops.h"

namespace arpg {
namespace {

constexpr int64_t kGrainElems = 16384;  // elements per thread before a second thread is worth waking

int64_t Grain(int64_t row_elems) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row_elems, 1)); }

void CheckRows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1), "arpg_cpu::", op, ": ", name,
              " must be [rows, dim] with a contiguous last dim, got shape ", t.sizes(), " strides ", t.strides());
}

void CheckNorm(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  CheckRows(op, "x", x);
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "arpg_cpu::", op, ": weight must be contiguous [dim] in x's dtype, got ", weight.sizes(), " ",
              weight.scalar_type(), " for x ", x.sizes(), " ", x.scalar_type());
}

template <typename Fn>
void Dispatch(const char* op, at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, "arpg_cpu::", op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

// x [rows, dim], weight [dim] -> RMSNorm(x) [rows, dim], contiguous.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  CheckNorm("rms_norm", x, weight);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), dim = x.size(1), xs = x.stride(0);
  Dispatch("rms_norm", x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* wp = reinterpret_cast<const T*>(weight.data_ptr());
    T* op = reinterpret_cast<T*>(out.data_ptr());
    at::parallel_for(0, rows, Grain(dim), [&](int64_t begin, int64_t end) {
      std::vector<float> row(dim);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < dim; ++i) row[i] = static_cast<float>(xp[r * xs + i]);
        cpu::RmsNormRow(row.data(), wp, dim, static_cast<float>(eps), op + r * dim);
      }
    });
  });
  return out;
}

// h = x + y (rounded to the dtype), n = RMSNorm(h): the residual add of a layer and the norm after it.
std::tuple<at::Tensor, at::Tensor> AddRmsNorm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                                              double eps) {
  CheckNorm("add_rms_norm", x, weight);
  CheckRows("add_rms_norm", "y", y);
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(),
              "arpg_cpu::add_rms_norm: y must match x in shape and dtype, got ", y.sizes(), " ", y.scalar_type(),
              " for x ", x.sizes(), " ", x.scalar_type());
  at::Tensor h = at::empty(x.sizes(), x.options()), n = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), dim = x.size(1), xs = x.stride(0), ys = y.stride(0);
  Dispatch("add_rms_norm", x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* yp = reinterpret_cast<const T*>(y.data_ptr());
    const T* wp = reinterpret_cast<const T*>(weight.data_ptr());
    T* hp = reinterpret_cast<T*>(h.data_ptr());
    T* np = reinterpret_cast<T*>(n.data_ptr());
    at::parallel_for(0, rows, Grain(dim), [&](int64_t begin, int64_t end) {
      std::vector<float> row(dim);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < dim; ++i) {
          const T sum = T(static_cast<float>(xp[r * xs + i]) + static_cast<float>(yp[r * ys + i]));
          hp[r * dim + i] = sum;
          row[i] = static_cast<float>(sum);
        }
        cpu::RmsNormRow(row.data(), wp, dim, static_cast<float>(eps), np + r * dim);
      }
    });
  });
  return {h, n};
}

template <typename T>
ARPG_CPU_INLINE void SiluMulRows(const T* a, int64_t as, const T* b, int64_t bs, T* out, int64_t dim, int64_t begin,
                                 int64_t end) {
  std::vector<float> x((dim + 7) / 8 * 8);
  for (int64_t r = begin; r < end; ++r) cpu::SiluMulRow(a + r * as, b + r * bs, dim, x.data(), out + r * dim);
}

template <typename T>
void SiluMulRowsBaseline(const T* a, int64_t as, const T* b, int64_t bs, T* out, int64_t dim, int64_t begin,
                         int64_t end) {
  SiluMulRows(a, as, b, bs, out, dim, begin, end);
}

#ifdef ARPG_CPU_HAS_AVX2_PATH
// The same compiled for AVX2 + FMA, picked at run time (the exp is most of the work).
template <typename T>
__attribute__((target("avx2,fma"))) void SiluMulRowsAvx2(const T* a, int64_t as, const T* b, int64_t bs, T* out,
                                                          int64_t dim, int64_t begin, int64_t end) {
  SiluMulRows(a, as, b, bs, out, dim, begin, end);
}
#endif

// silu(a) * b, a and b [rows, dim] -> [rows, dim] contiguous (SwiGLU's activation).
at::Tensor SiluMul(const at::Tensor& a, const at::Tensor& b) {
  CheckRows("silu_mul", "a", a);
  CheckRows("silu_mul", "b", b);
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(),
              "arpg_cpu::silu_mul: a and b must match in shape and dtype, got ", a.sizes(), " ", a.scalar_type(),
              " and ", b.sizes(), " ", b.scalar_type());
  at::Tensor out = at::empty(a.sizes(), a.options());
  const int64_t rows = a.size(0), dim = a.size(1), as = a.stride(0), bs = b.stride(0);
  Dispatch("silu_mul", a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ap = reinterpret_cast<const T*>(a.data_ptr());
    const T* bp = reinterpret_cast<const T*>(b.data_ptr());
    T* op = reinterpret_cast<T*>(out.data_ptr());
    at::parallel_for(0, rows, Grain(dim), [&](int64_t begin, int64_t end) {
#ifdef ARPG_CPU_HAS_AVX2_PATH
      if (cpu::CpuHasAvx2Fma()) return SiluMulRowsAvx2(ap, as, bp, bs, op, dim, begin, end);
#endif
      SiluMulRowsBaseline(ap, as, bp, bs, op, dim, begin, end);
    });
  });
  return out;
}

// x [T, H, D] (rows of any stride, heads of any stride, D contiguous and even), rope float32 [T, D / 2, 2]
// contiguous -> x rotated [T, H, D] contiguous: apply_rope's products and sums (arpg.model.apply_rope).
at::Tensor Rope(const at::Tensor& x, const at::Tensor& rope) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0 && (x.size(2) <= 1 || x.stride(2) == 1),
              "arpg_cpu::rope: x must be [T, H, D] with D even and contiguous, got ", x.sizes(), " strides ",
              x.strides());
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.dim() == 3 && rope.size(0) == x.size(0) &&
                  rope.size(1) == x.size(2) / 2 && rope.size(2) == 2,
              "arpg_cpu::rope: rope must be contiguous float32 [T, D / 2, 2] for x ", x.sizes(), ", got ", rope.sizes(),
              " ", rope.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2), pairs = dim / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const float* table = rope.data_ptr<float>();
  Dispatch("rope", x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    T* op = reinterpret_cast<T*>(out.data_ptr());
    at::parallel_for(0, rows, Grain(heads * dim), [&](int64_t begin, int64_t end) {
      std::vector<float> in(dim), rot(dim);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          const T* src = xp + t * s0 + h * s1;
          for (int64_t d = 0; d < dim; ++d) in[d] = static_cast<float>(src[d]);
          cpu::RotatePairs(in.data(), table + t * dim, pairs, rot.data());
          T* dst = op + (t * heads + h) * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] = T(rot[d]);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace arpg

TORCH_LIBRARY_FRAGMENT(arpg_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor y, Tensor weight, float eps) -> (Tensor h, Tensor n)");
  m.def("silu_mul(Tensor a, Tensor b) -> Tensor");
  m.def("rope(Tensor x, Tensor rope) -> Tensor");
}

TORCH_LIBRARY_IMPL(arpg_cpu, CPU, m) {
  m.impl("rms_norm", &arpg::RmsNorm);
  m.impl("add_rms_norm", &arpg::AddRmsNorm);
  m.impl("silu_mul", &arpg::SiluMul);
  m.impl("rope", &arpg::Rope);
}
