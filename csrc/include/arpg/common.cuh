// Device primitives shared by the arpg kernels: tensor-core fragments, cp.async, warp shuffles.
//
// ARPG_SIMT_EMULATION: csrc/tests/simt_emulator.h, included before these headers, provides host
// versions of the primitives below so the unmodified kernels run on the CPU in the C++ tests.
#pragma once

#include <cmath>
#include <cstring>

#include <cuda_runtime.h>

#include "arpg/common.h"

namespace arpg {

template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<half> {
  __device__ __host__ __forceinline__ static float ToFloat(half x) { return __half2float(x); }
  __device__ __host__ __forceinline__ static half FromFloat(float x) { return __float2half_rn(x); }
  // Two floats as one 32-bit register, `lo` in the low half (the lower column of a fragment).
  __device__ __host__ __forceinline__ static uint32_t Pack2(float lo, float hi) {
    const half2 h = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, sizeof(r));
    return r;
  }
};

template <>
struct TypeTraits<__nv_bfloat16> {
  __device__ __host__ __forceinline__ static float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __host__ __forceinline__ static __nv_bfloat16 FromFloat(float x) { return __float2bfloat16_rn(x); }
  __device__ __host__ __forceinline__ static uint32_t Pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, sizeof(r));
    return r;
  }
};

template <>
struct TypeTraits<float> {
  __device__ __host__ __forceinline__ static float ToFloat(float x) { return x; }
  __device__ __host__ __forceinline__ static float FromFloat(float x) { return x; }
};

}  // namespace arpg

#if !defined(ARPG_SIMT_EMULATION)

namespace arpg {
namespace detail {

__device__ __forceinline__ uint32_t SmemAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when `pred` is false nothing is read and the destination is zeroed.
__device__ __forceinline__ void CpAsync16(void* smem_dst, const void* gmem_src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddress(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, r[i] receives its fragment.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddress(smem_row))
               : "memory");
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddress(smem_row))
               : "memory");
}

// d += a * b for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void Mma16816<half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float ShflXor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

__device__ __forceinline__ void SyncThreads() { __syncthreads(); }

template <typename Kernel>
inline cudaError_t SetMaxDynamicSmem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename... KernelArgs, typename... Args>
inline cudaError_t LaunchKernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                                cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace arpg

#define ARPG_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

#endif  // !ARPG_SIMT_EMULATION
