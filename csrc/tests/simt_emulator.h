// A small SIMT emulator: runs the unmodified arpg kernels on the CPU, one fiber per CUDA thread.
//
// Include this before any arpg header and compile with a host compiler. It provides the primitives of
// arpg/common.cuh with their PTX semantics written out from the PTX ISA (ldmatrix fragments, mma.sync
// m16n8k16 register layouts, cp.async groups), threadIdx/blockIdx, __syncthreads and the launch.
// What it checks beyond the numbers:
//  - every cp.async and ldmatrix address is 16-byte aligned and inside the dynamic shared memory;
//  - shared memory starts as NaN, so reading a slot before its copy landed shows;
//  - a cp.async lands at its issue (ARPG_EMU_CP_ASYNC=early: a refill of a buffer that some warp
//    still reads shows) or only at the cp.async.wait_group that covers it (the default);
//  - warps run at random, skewed speeds between barriers, so a missing __syncthreads shows;
//  - a barrier that not every thread reaches is reported as a deadlock;
//  - global reads go through AddressSanitizer when built with -fsanitize=address.
// The emulator does not model timing, occupancy, register limits or PTX that the kernels do not use.
#pragma once

#define ARPG_SIMT_EMULATION 1

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace arpg_emu {

[[noreturn]] inline void Fail(const char* what) {
  std::fprintf(stderr, "simt emulator: %s\n", what);
  std::abort();
}

struct CpCopy {
  void* dst;
  unsigned char bytes[16];
};

#if defined(__x86_64__)
// A fiber switch that saves only the callee-saved registers: no signal-mask syscall as in
// swapcontext, and AddressSanitizer only needs the fiber annotations.
extern "C" void arpg_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl arpg_emu_switch
.type arpg_emu_switch,@function
arpg_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size arpg_emu_switch, .-arpg_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

struct Context {
  void* sp = nullptr;
};

// Jumps from `from` to `to`; returns when something switches back to `from`.
inline void SwitchTo(Context& from, Context& to) { arpg_emu_switch(&from.sp, to.sp); }

// A fresh context whose first switch enters entry() on the given stack (entry must never return).
inline void MakeContext(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                             // entry's return address slot: rsp % 16 == 8 on entry
  *--sp = reinterpret_cast<void*>(entry);      // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

inline void SwitchTo(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void MakeContext(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Thread {
  Context context;
  std::unique_ptr<char[]> stack;
  uint3 thread_idx;
  int lane = 0;
  int warp = 0;
  bool done = false;
  std::vector<CpCopy> open_group;
  std::vector<std::vector<CpCopy>> committed;  // oldest first
};

constexpr size_t kStackBytes = 256 * 1024;

struct Block {
  dim3 grid_dim, block_dim;
  uint3 block_idx;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Thread> threads;
  int current = 0;
  Context scheduler;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer's fiber annotations
  size_t scheduler_stack_bytes = 0;
  std::function<void()> body;
  // Barriers: a generation counter and an arrival count per warp and for the block.
  std::vector<uint64_t> warp_generation;
  std::vector<int> warp_arrived;
  uint64_t block_generation = 0;
  int block_arrived = 0;
  uint64_t progress = 0;
  // One slot per lane for exchanging registers in warp collectives.
  std::vector<std::vector<unsigned char>> exchange;
};

// A cp.async may land any time between its issue and the wait that covers it. ARPG_EMU_CP_ASYNC=early
// lands it at issue (exposes a refill of a buffer some warp still reads), the default `late` at the
// wait (exposes a read before the wait).
inline bool CpAsyncLandsEarly() {
  static const bool early = [] {
    const char* mode = std::getenv("ARPG_EMU_CP_ASYNC");
    return mode != nullptr && std::strcmp(mode, "early") == 0;
  }();
  return early;
}

inline Block*& CurrentBlock() {
  static Block* block = nullptr;
  return block;
}

inline Thread& Me() { return CurrentBlock()->threads[CurrentBlock()->current]; }

inline void Yield() {
  Block* b = CurrentBlock();
  Thread& t = b->threads[b->current];
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, b->scheduler_stack, b->scheduler_stack_bytes);
#endif
  SwitchTo(t.context, b->scheduler);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, &b->scheduler_stack, &b->scheduler_stack_bytes);
#endif
}

inline void WarpBarrier() {
  Block* b = CurrentBlock();
  Thread& t = Me();
  const uint64_t gen = b->warp_generation[t.warp];
  if (++b->warp_arrived[t.warp] == 32) {
    b->warp_arrived[t.warp] = 0;
    ++b->warp_generation[t.warp];
    ++b->progress;
    return;
  }
  while (b->warp_generation[t.warp] == gen) Yield();
}

inline void SyncThreads() {
  Block* b = CurrentBlock();
  const uint64_t gen = b->block_generation;
  if (++b->block_arrived == int(b->threads.size())) {
    b->block_arrived = 0;
    ++b->block_generation;
    ++b->progress;
    return;
  }
  while (b->block_generation == gen) Yield();
}

// Every lane deposits `in`; after the barrier `f(lanes)` computes this lane's result from all of them.
template <typename In, typename Out>
Out WarpCollective(const In& in, const std::function<Out(const In* lanes, int lane)>& f) {
  Block* b = CurrentBlock();
  Thread& t = Me();
  if (b->block_dim.x % 32 != 0) Fail("warp collective in a block that is not whole warps");
  std::memcpy(b->exchange[t.warp * 32 + t.lane].data(), &in, sizeof(In));
  WarpBarrier();
  std::vector<In> lanes(32);
  for (int l = 0; l < 32; ++l) std::memcpy(&lanes[l], b->exchange[t.warp * 32 + l].data(), sizeof(In));
  Out out = f(lanes.data(), t.lane);
  WarpBarrier();
  return out;
}

inline void CheckShared(const void* p, size_t bytes, const char* what) {
  Block* b = CurrentBlock();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < b->smem || c + bytes > b->smem + b->smem_bytes) {
    std::fprintf(stderr, "simt emulator: %s outside dynamic shared memory (offset %td of %zu)\n", what,
                 c - b->smem, b->smem_bytes);
    std::abort();
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) Fail("shared address not 16-byte aligned");
}

inline void ThreadEntry() {
  Block* b = CurrentBlock();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b->scheduler_stack, &b->scheduler_stack_bytes);
#endif
  b->body();
  Me().done = true;
  ++b->progress;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(nullptr, b->scheduler_stack, b->scheduler_stack_bytes);
#endif
  SwitchTo(Me().context, b->scheduler);
  Fail("a finished thread was resumed");
}

inline void Resume(Block& b, int i) {
  b.current = i;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, b.threads[i].stack.get(), kStackBytes);
#endif
  SwitchTo(b.scheduler, b.threads[i].context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Warps advance at random, skewed speeds (a fixed seed per block), so one warp can run many
// collectives ahead of another up to the next __syncthreads: a missing barrier shows up as a race.
inline void RunBlock(Block& b) {
  CurrentBlock() = &b;
  const int n = int(b.threads.size());
  const int warps = (n + 31) / 32;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    if (!t.stack) t.stack.reset(new char[kStackBytes]);
    t.done = false;
    t.open_group.clear();
    t.committed.clear();
    MakeContext(t.context, t.stack.get(), kStackBytes, ThreadEntry);
  }
  uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t(b.block_idx.x) << 40) ^ (uint64_t(b.block_idx.y) << 20) ^
                 b.block_idx.z;
  auto next = [&rng]() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  };
  std::vector<int> weight(warps);
  for (int w = 0; w < warps; ++w) weight[w] = 1 << (next() % 5);
  std::vector<bool> stalled(warps, false);
  for (;;) {
    std::vector<int> live;
    int total = 0;
    for (int w = 0; w < warps; ++w) {
      bool any = false;
      for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) any = any || !b.threads[i].done;
      if (any) {
        live.push_back(w);
        total += weight[w];
      }
    }
    if (live.empty()) break;
    bool all_stalled = true;
    for (int w : live) all_stalled = all_stalled && stalled[w];
    if (all_stalled) Fail("deadlock: a barrier that not every thread reaches");
    // Pick a warp in proportion to its weight; run each of its live threads until it blocks.
    int pick = int(next() % uint64_t(total));
    int warp = live.back();
    for (int w : live) {
      if (pick < weight[w]) {
        warp = w;
        break;
      }
      pick -= weight[w];
    }
    const uint64_t before = b.progress;
    for (int i = warp * 32; i < std::min(n, warp * 32 + 32); ++i) {
      if (!b.threads[i].done) Resume(b, i);
    }
    if (b.progress == before) {
      stalled[warp] = true;
    } else {
      std::fill(stalled.begin(), stalled.end(), false);
    }
  }
  CurrentBlock() = nullptr;
}

inline unsigned CeilWarps(unsigned threads) { return (threads + 31) / 32; }

template <typename... KernelArgs, typename... Args>
cudaError_t Launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024) Fail("unsupported block shape");
  Block b;
  b.grid_dim = grid;
  b.block_dim = block;
  b.threads.resize(block.x);
  b.warp_generation.assign(CeilWarps(block.x), 0);
  b.warp_arrived.assign(CeilWarps(block.x), 0);
  b.exchange.assign(block.x, std::vector<unsigned char>(256));
  std::unique_ptr<unsigned char[]> smem(smem_bytes ? new unsigned char[smem_bytes] : nullptr);
  b.smem = smem.get();
  b.smem_bytes = smem_bytes;
  for (unsigned i = 0; i < block.x; ++i) {
    b.threads[i].thread_idx = make_uint3(i, 0, 0);
    b.threads[i].lane = int(i % 32);
    b.threads[i].warp = int(i / 32);
  }
  b.body = [&]() { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = make_uint3(x, y, z);
        if (smem_bytes) std::memset(b.smem, 0xFF, smem_bytes);  // NaN in fp16, bf16 and fp32
        RunBlock(b);
      }
    }
  }
  return cudaSuccess;
}

}  // namespace arpg_emu

#define threadIdx (::arpg_emu::Me().thread_idx)
#define blockIdx (::arpg_emu::CurrentBlock()->block_idx)
#define blockDim (::arpg_emu::CurrentBlock()->block_dim)
#define gridDim (::arpg_emu::CurrentBlock()->grid_dim)
#define __syncthreads() ::arpg_emu::SyncThreads()
#define __launch_bounds__(...)
#define ARPG_DYNAMIC_SMEM(name) unsigned char* name = ::arpg_emu::CurrentBlock()->smem

namespace arpg {
namespace detail {

inline float Bf16BitsToFloat(uint16_t bits) {
  const uint32_t f = uint32_t(bits) << 16;
  float x;
  std::memcpy(&x, &f, 4);
  return x;
}

inline float HalfBitsToFloat(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline void CpAsync16(void* smem_dst, const void* gmem_src, bool pred) {
  arpg_emu::CheckShared(smem_dst, 16, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) arpg_emu::Fail("cp.async source not 16-byte aligned");
  arpg_emu::CpCopy copy;
  copy.dst = smem_dst;
  if (pred) {
    std::memcpy(copy.bytes, gmem_src, 16);
  } else {
    std::memset(copy.bytes, 0, 16);
  }
  if (arpg_emu::CpAsyncLandsEarly()) {
    std::memcpy(copy.dst, copy.bytes, 16);
    return;
  }
  arpg_emu::Me().open_group.push_back(copy);
}

inline void CpAsyncCommit() {
  arpg_emu::Thread& t = arpg_emu::Me();
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

// The copies of a group land no earlier than the wait that covers them.
template <int N>
inline void CpAsyncWait() {
  arpg_emu::Thread& t = arpg_emu::Me();
  while (int(t.committed.size()) > N) {
    for (const arpg_emu::CpCopy& c : t.committed.front()) std::memcpy(c.dst, c.bytes, 16);
    t.committed.erase(t.committed.begin());
  }
}

struct Rows {
  const unsigned char* row[32];
};

// PTX ISA, ldmatrix .m8n8 .x4 .b16: lanes 8i..8i+7 address the rows of matrix i; without .trans lane l
// receives row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i in register i (first element low);
// with .trans it receives column l/4, rows 2(l%4) and 2(l%4)+1.
inline void LdMatrix(uint32_t (&r)[4], const void* smem_row, bool trans) {
  arpg_emu::CheckShared(smem_row, 16, "ldmatrix row");
  using Out = std::vector<uint32_t>;
  const auto* row = static_cast<const unsigned char*>(smem_row);
  Out out = arpg_emu::WarpCollective<const unsigned char*, Out>(row, [trans](const unsigned char* const* rows, int l) {
    Out regs(4);
    for (int i = 0; i < 4; ++i) {
      uint16_t e[2];
      for (int k = 0; k < 2; ++k) {
        const int r_ = trans ? 2 * (l % 4) + k : l / 4;
        const int c_ = trans ? l / 4 : 2 * (l % 4) + k;
        std::memcpy(&e[k], rows[8 * i + r_] + 2 * c_, 2);
      }
      regs[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
    return regs;
  });
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}

inline void LdMatrixX4(uint32_t (&r)[4], const void* smem_row) { LdMatrix(r, smem_row, false); }
inline void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem_row) { LdMatrix(r, smem_row, true); }

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

// PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs, lane l: groupID = l/4, tig = l%4.
// A (16x16): element a_i (register i/2, half i%2): row groupID (+8 when i in {2,3,6,7}),
//   col 2*tig + (i&1) (+8 when i >= 4).
// B (16x8): element b_i (register i/2, half i%2): row 2*tig + (i&1) (+8 when i >= 2), col groupID.
// C/D (16x8): element c_i: row groupID (+8 when i >= 2), col 2*tig + (i&1).
template <typename T>
inline void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof(in.a));
  in.b[0] = b0;
  in.b[1] = b1;
  std::memcpy(in.c, d, sizeof(in.c));
  using Out = std::vector<float>;
  Out out = arpg_emu::WarpCollective<MmaIn, Out>(in, [](const MmaIn* lanes, int lane) {
    auto to_float = [](uint16_t bits) {
      return std::is_same<T, half>::value ? HalfBitsToFloat(bits) : Bf16BitsToFloat(bits);
    };
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, tig = l % 4;
      for (int i = 0; i < 8; ++i) {
        const uint16_t bits = uint16_t(lanes[l].a[i / 2] >> (16 * (i % 2)));
        const int row = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
        const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = to_float(bits);
      }
      for (int i = 0; i < 4; ++i) {
        const uint16_t bits = uint16_t(lanes[l].b[i / 2] >> (16 * (i % 2)));
        B[2 * tig + (i & 1) + (i >= 2 ? 8 : 0)][g] = to_float(bits);
      }
      for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * tig + (i & 1)] = lanes[l].c[i];
    }
    Out res(4);
    const int g = lane / 4, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      res[i] = acc;
    }
    return res;
  });
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline float ShflXor(float v, int lane_mask) {
  return arpg_emu::WarpCollective<float, float>(v, [lane_mask](const float* lanes, int lane) {
    return lanes[lane ^ lane_mask];
  });
}

inline void SyncThreads() { arpg_emu::SyncThreads(); }

template <typename Kernel>
inline cudaError_t SetMaxDynamicSmem(Kernel, size_t) {
  return cudaSuccess;
}

template <typename... KernelArgs, typename... Args>
inline cudaError_t LaunchKernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                                cudaStream_t, Args... args) {
  return arpg_emu::Launch(kernel, grid, block, smem_bytes, args...);
}

}  // namespace detail
}  // namespace arpg
