// arpg_cpu_kernel_tests: the torch-free CPU kernels (arpg/cpu/paged_attention.h, arpg/cpu/merge_states.h,
// arpg/cpu/sample.h, arpg/cpu/step_ops.h)
// on random data against plain loops in double precision. Needs only the standard library: the 16-bit
// storage types are small structs of this file (the header takes any T with static_cast<float> and
// construction from float; it accepts every head dim, padding it to a multiple of 8 internally).
//
// Each attention case runs through every code path the header has on this CPU (the baseline build and,
// on x86-64, the AVX2 clone, the AVX-512 path and its AVX512_BF16 variant where the CPU has them), with its
// work items (sequence, KV head, block of queries) called in shuffled order on one reused scratch, like
// csrc/cpu/arpg_cpu.cpp does from its threads.
// Buffers are exactly sized heap allocations (AddressSanitizer sees overruns), unused cache slots and
// padding hold NaN, padding of the outputs holds a sentinel that must stay untouched.
//
// Prints one line per failing case (all cases with -v), a summary line, and returns nonzero on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// GCC notes that passing the header's 32-byte vectors changes the ABI without AVX (all inlined here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "arpg/cpu/merge_states.h"
#include "arpg/cpu/paged_attention.h"
#include "arpg/cpu/sample.h"
#include "arpg/cpu/step_ops.h"

namespace {

// 16-bit storage types -------------------------------------------------------------------------

uint32_t Bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  return x;
}
float FromBits(uint32_t x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}

// bfloat16: the top half of a float, rounded to nearest even.
struct BF16 {
  uint16_t bits = 0;
  BF16() = default;
  explicit BF16(float f) {
    const uint32_t x = Bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
    } else {
      bits = static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    }
  }
  explicit operator float() const { return FromBits(static_cast<uint32_t>(bits) << 16); }
};

}  // namespace

template <>
struct arpg::cpu::IsBFloat16<BF16> : std::true_type {};

namespace {

// IEEE binary16, rounded to nearest even (subnormals included).
struct Half {
  uint16_t bits = 0;
  Half() = default;
  explicit Half(float f) {
    const uint32_t x = Bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
      bits = static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    } else if (ax >= 0x477ff000u) {  // >= 65520 rounds to infinity
      bits = static_cast<uint16_t>(sign | 0x7c00u);
    } else if (ax < 0x38800000u) {  // below 2^-14: a subnormal, in units of 2^-24 (exact scaling)
      bits = static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(FromBits(ax) * 16777216.0f)));
    } else {
      uint32_t h = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13));
      const uint32_t rem = ax & 0x1fffu;
      if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent correctly
      bits = static_cast<uint16_t>(sign | h);
    }
  }
  explicit operator float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    if (e == 0) return FromBits(sign | Bits(std::ldexp(static_cast<float>(m), -24)));
    if (e == 31) return FromBits(sign | 0x7f800000u | (m << 13));
    return FromBits(sign | ((e - 15 + 127) << 23) | (m << 13));
  }
};

template <typename T>
float ToF(T x) {
  return static_cast<float>(x);
}
template <typename T>
T FromF(float x) {
  return T(x);
}
template <typename T>
const char* DtypeName();
template <>
const char* DtypeName<float>() {
  return "fp32";
}
template <>
const char* DtypeName<BF16>() {
  return "bf16";
}
template <>
const char* DtypeName<Half>() {
  return "fp16";
}

// |got - want| <= abs + rel |want| for outputs; LSE is float for every storage type.
template <typename T>
double OutAbsTol() {
  return std::is_same<T, float>::value ? 2e-5 : 1e-4;
}
template <typename T>
double OutRelTol() {
  if (std::is_same<T, float>::value) return 2e-5;
  return std::is_same<T, BF16>::value ? 8e-3 : 1e-3;  // a few half-ulps of the 16-bit output rounding
}
constexpr double kLseTol = 2e-5;  // abs + rel: computed in float from the (exactly representable) inputs

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kSentinel = 12345.0f;  // in output padding: the kernels must not write there

int g_failures = 0;
int g_cases = 0;
bool g_verbose = false;

void Report(const std::string& name, bool ok, double err_out, double err_lse, const std::string& detail = "") {
  ++g_cases;
  if (!ok) ++g_failures;
  if (!ok || g_verbose) {
    std::printf("%s %s (max err out %.3g, lse %.3g)%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), err_out, err_lse,
                detail.empty() ? "" : ": ", detail.c_str());
    std::fflush(stdout);
  }
}

bool Close(double got, double want, double abs_tol, double rel_tol) {
  return std::fabs(got - want) <= abs_tol + rel_tol * std::fabs(want);  // NaN fails
}

// NaN in every scratch buffer, at least as long as any work item here needs (resize keeps the contents): a
// work item that reads scratch it did not write in this item (the kernels do not clear it per item) gets NaN
// into its output, through P V if nowhere else.
void PoisonScratch(arpg::cpu::PagedAttentionScratch& w) {
  for (std::vector<float>* v : {&w.q, &w.acc, &w.m, &w.corr, &w.l, &w.k, &w.v, &w.s}) {
    v->assign(std::max<size_t>(v->size(), 1 << 15), std::numeric_limits<float>::quiet_NaN());
  }
}

// The few-row path run tile by tile over several KV heads (cpu::PagedAttentionHeads, as the adapter does), as
// a BlockFn: the item of KV head 0 serves every head of its sequence's query block, in groups of at most
// kMaxHeadsPerItem, each head on its own poisoned scratch; the items of the other heads do nothing.
template <typename T>
void HeadsTileByTile(const arpg::cpu::PagedAttentionArgs<T>& a, int seq, int kv_head, int q_begin, int q_end,
                     arpg::cpu::PagedAttentionScratch&) {
  if (kv_head != 0) return;
  static thread_local std::vector<arpg::cpu::PagedAttentionScratch> ws(arpg::cpu::kMaxHeadsPerItem);
  for (int h = 0; h < a.num_kv_heads; h += arpg::cpu::kMaxHeadsPerItem) {
    for (auto& w : ws) PoisonScratch(w);
    arpg::cpu::PagedAttentionHeads(a, seq, h, std::min(h + arpg::cpu::kMaxHeadsPerItem, a.num_kv_heads), q_begin,
                                   q_end, ws.data());
  }
}

// The header's code paths on this CPU.
template <typename T>
using BlockFn = void (*)(const arpg::cpu::PagedAttentionArgs<T>&, int, int, int, int, arpg::cpu::PagedAttentionScratch&);

template <typename T>
std::vector<std::pair<const char*, BlockFn<T>>> Paths() {
  std::vector<std::pair<const char*, BlockFn<T>>> paths;
  paths.push_back({"baseline", &arpg::cpu::PagedAttentionBlockBaseline<T>});
#ifdef ARPG_CPU_HAS_AVX2_PATH
  if (arpg::cpu::CpuHasAvx2Fma()) paths.push_back({"avx2", &arpg::cpu::PagedAttentionBlockAvx2<T>});
#endif
#ifdef ARPG_CPU_HAS_AVX512_PATH
  if (arpg::cpu::CpuHasAvx512()) paths.push_back({"avx512", &arpg::cpu::PagedAttentionBlockAvx512<T>});
  if (arpg::cpu::CpuHasAvx512() && arpg::cpu::CpuHasAvx512Bf16()) {
    paths.push_back({"avx512-bf16", &arpg::cpu::PagedAttentionBlockAvx512Bf16<T>});
  }
#endif
  paths.push_back({"dispatch", &arpg::cpu::PagedAttentionBlock<T>});
  paths.push_back({"heads", &HeadsTileByTile<T>});
  return paths;
}

// paged_attention ------------------------------------------------------------------------------

struct AttnCase {
  std::vector<int> q_lens;
  std::vector<int> kv_lens;
  int head_dim = 64;
  int num_heads = 8;
  int num_kv_heads = 2;
  int page_size = 16;
  bool causal = false;
  bool return_lse = true;
  bool share_pages = false;  // sequence 1 reuses sequence 0's full leading pages (same physical pages)
  int q_block = 16;          // queries per work item
  int extra_pages = 1;       // block-table columns past what the longest sequence needs
  int table_pad = 0;         // block-table row stride = max_pages + table_pad
  int head_pad = 0;          // cache head stride = D + head_pad (NaN padding)
  float q_amplitude = 1.f;
};

std::string Describe(const AttnCase& c, const char* dtype) {
  std::string name = std::string("paged_attention ") + dtype + " D=" + std::to_string(c.head_dim) +
                     " page=" + std::to_string(c.page_size) + " H=" + std::to_string(c.num_heads) + "/" +
                     std::to_string(c.num_kv_heads) + (c.causal ? " causal" : " full") +
                     " block=" + std::to_string(c.q_block) + " q_lens=[";
  for (size_t b = 0; b < c.q_lens.size(); ++b) name += std::to_string(c.q_lens[b]) + (b + 1 < c.q_lens.size() ? "," : "");
  name += "] kv_lens=[";
  for (size_t b = 0; b < c.kv_lens.size(); ++b)
    name += std::to_string(c.kv_lens[b]) + (b + 1 < c.kv_lens.size() ? "," : "");
  name += "]";
  if (c.share_pages) name += " shared";
  if (!c.return_lse) name += " no-lse";
  if (c.head_pad) name += " head_pad=" + std::to_string(c.head_pad);
  if (c.table_pad) name += " table_pad=" + std::to_string(c.table_pad);
  if (c.q_amplitude != 1.f) name += " q_amp=" + std::to_string(static_cast<int>(c.q_amplitude));
  return name;
}

// The paged K/V of a batch and its double-precision reference, built once per case.
template <typename T>
struct PagedProblem {
  int B, H, Hkv, D, ps, group, T_, max_pages, table_stride, num_pages, fused_heads;
  int64_t k_stride_page, k_stride_token, k_stride_head;
  std::vector<int> cu;
  std::vector<int32_t> block_table, kv_lens, cu_q_lens;
  std::vector<T> k_pool, v_pool, q;
  int64_t layer_offset;
  std::vector<std::vector<double>> k_seq, v_seq;  // [kv_len][Hkv][D] per sequence
  float scale;
};

template <typename T>
PagedProblem<T> MakeProblem(const AttnCase& c, std::mt19937& rng) {
  PagedProblem<T> p;
  p.B = static_cast<int>(c.q_lens.size());
  p.H = c.num_heads;
  p.Hkv = c.num_kv_heads;
  p.D = c.head_dim;
  p.ps = c.page_size;
  p.group = p.H / p.Hkv;
  p.cu.assign(p.B + 1, 0);
  for (int b = 0; b < p.B; ++b) p.cu[b + 1] = p.cu[b] + c.q_lens[b];
  p.T_ = p.cu[p.B];
  int max_kv = 0;
  for (int b = 0; b < p.B; ++b) max_kv = std::max(max_kv, c.kv_lens[b]);
  const int ps = p.ps;
  p.max_pages = (max_kv + ps - 1) / ps + c.extra_pages;
  p.table_stride = p.max_pages + c.table_pad;

  // Logical pages numbered in order, then shuffled onto physical pages; sequence 1 may share sequence 0's
  // full leading pages. Columns past a sequence's pages (and the row padding) hold junk ids, even out of range.
  std::vector<int> table(static_cast<size_t>(p.B) * p.table_stride, -1);
  int n = 0;
  for (int b = 0; b < p.B; ++b) {
    const int needed = (c.kv_lens[b] + ps - 1) / ps;
    for (int i = 0; i < needed; ++i) {
      if (c.share_pages && b == 1 && i < c.kv_lens[0] / ps) {
        table[static_cast<size_t>(b) * p.table_stride + i] = table[i];
      } else {
        table[static_cast<size_t>(b) * p.table_stride + i] = n++;
      }
    }
  }
  p.num_pages = std::max(n, 1) + 2;  // a couple of pages nobody uses
  std::vector<int> perm(p.num_pages);
  for (int i = 0; i < p.num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  p.block_table.resize(table.size());
  for (int b = 0; b < p.B; ++b) {
    const int needed = (c.kv_lens[b] + ps - 1) / ps;
    for (int i = 0; i < p.table_stride; ++i) {
      const size_t e = static_cast<size_t>(b) * p.table_stride + i;
      p.block_table[e] = i < needed ? perm[table[e]] : static_cast<int32_t>(rng() % 1000) - 500;
    }
  }

  // A 2-layer pool; the kernel sees the last layer through the page stride (so an overrun leaves the
  // allocation). Untouched slots and head padding hold NaN.
  const int hs = p.D + c.head_pad;
  p.k_stride_head = hs;
  p.k_stride_token = static_cast<int64_t>(p.Hkv) * hs;
  p.k_stride_page = static_cast<int64_t>(ps) * p.k_stride_token;
  const int layers = 2;
  p.layer_offset = static_cast<int64_t>(layers - 1) * p.num_pages * p.k_stride_page;
  p.k_pool.assign(static_cast<size_t>(layers) * p.num_pages * p.k_stride_page, FromF<T>(kNaN));
  p.v_pool = p.k_pool;
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  p.k_seq.resize(p.B);
  p.v_seq.resize(p.B);
  for (int b = 0; b < p.B; ++b) {
    p.k_seq[b].resize(static_cast<size_t>(c.kv_lens[b]) * p.Hkv * p.D);
    p.v_seq[b].resize(p.k_seq[b].size());
    for (int j = 0; j < c.kv_lens[b]; ++j) {
      const int page = p.block_table[static_cast<size_t>(b) * p.table_stride + j / ps];
      const bool shared = c.share_pages && b == 1 && j < (c.kv_lens[0] / ps) * ps;
      for (int h = 0; h < p.Hkv; ++h) {
        for (int d = 0; d < p.D; ++d) {
          const size_t slot = p.layer_offset + page * p.k_stride_page + (j % ps) * p.k_stride_token + h * hs + d;
          if (!shared) {
            p.k_pool[slot] = FromF<T>(uni(rng));
            p.v_pool[slot] = FromF<T>(uni(rng));
          }
          p.k_seq[b][(static_cast<size_t>(j) * p.Hkv + h) * p.D + d] = ToF(p.k_pool[slot]);
          p.v_seq[b][(static_cast<size_t>(j) * p.Hkv + h) * p.D + d] = ToF(p.v_pool[slot]);
        }
      }
    }
  }

  // q: the first H heads of a fused [T, H + 2 Hkv, D] projection (token stride != H * D), NaN elsewhere.
  p.fused_heads = p.H + 2 * p.Hkv;
  p.q.assign(std::max<size_t>(static_cast<size_t>(p.T_) * p.fused_heads * p.D, 1), FromF<T>(kNaN));
  for (int t = 0; t < p.T_; ++t)
    for (int h = 0; h < p.H; ++h)
      for (int d = 0; d < p.D; ++d)
        p.q[(static_cast<size_t>(t) * p.fused_heads + h) * p.D + d] = FromF<T>(c.q_amplitude * uni(rng));
  p.kv_lens.assign(c.kv_lens.begin(), c.kv_lens.end());
  p.cu_q_lens.assign(p.cu.begin(), p.cu.end());
  p.scale = 1.f / std::sqrt(static_cast<float>(p.D));
  return p;
}

// Attention of each query over the keys [0, vis) of its sequence in double; rows with no key: 0, -inf.
template <typename T>
void Reference(const AttnCase& c, const PagedProblem<T>& p, std::vector<double>& out, std::vector<double>& lse) {
  out.assign(static_cast<size_t>(p.T_) * p.H * p.D, 0.0);
  lse.assign(static_cast<size_t>(p.T_) * p.H, -INFINITY);
  for (int b = 0; b < p.B; ++b) {
    const int q_len = c.q_lens[b], kv_len = c.kv_lens[b];
    for (int i = 0; i < q_len; ++i) {
      const int vis = c.causal ? std::max(0, std::min(kv_len, kv_len - q_len + i + 1)) : kv_len;
      if (vis == 0) continue;
      for (int h = 0; h < p.H; ++h) {
        const int t = p.cu[b] + i, hk = h / p.group;
        std::vector<double> s(vis);
        double m = -INFINITY;
        for (int j = 0; j < vis; ++j) {
          double acc = 0;
          for (int d = 0; d < p.D; ++d)
            acc += double(ToF(p.q[(static_cast<size_t>(t) * p.fused_heads + h) * p.D + d])) *
                   p.k_seq[b][(static_cast<size_t>(j) * p.Hkv + hk) * p.D + d];
          s[j] = acc * p.scale;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (int j = 0; j < vis; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        for (int d = 0; d < p.D; ++d) {
          double acc = 0;
          for (int j = 0; j < vis; ++j) acc += s[j] * p.v_seq[b][(static_cast<size_t>(j) * p.Hkv + hk) * p.D + d];
          out[(static_cast<size_t>(t) * p.H + h) * p.D + d] = acc / sum;
        }
        lse[static_cast<size_t>(t) * p.H + h] = m + std::log(sum);
      }
    }
  }
}

// Output and LSE layouts with padding (token strides past H * D and H).
constexpr int kOutTokenPad = 5;
constexpr int kLseTokenPad = 1;

template <typename T>
void RunKernel(const AttnCase& c, const PagedProblem<T>& p, BlockFn<T> fn, std::mt19937& rng,
               arpg::cpu::PagedAttentionScratch& scratch, std::vector<T>& out, std::vector<float>& lse) {
  const int64_t out_stride_token = static_cast<int64_t>(p.H) * p.D + kOutTokenPad;
  const int64_t lse_stride_token = p.H + kLseTokenPad;
  // The caller's prefill (arpg_cpu.cpp: zeros and -inf), the sentinel in the padding.
  out.assign(std::max<size_t>(static_cast<size_t>(p.T_) * out_stride_token, 1), FromF<T>(kSentinel));
  lse.assign(std::max<size_t>(static_cast<size_t>(p.T_) * lse_stride_token, 1), kSentinel);
  for (int t = 0; t < p.T_; ++t) {
    for (int h = 0; h < p.H; ++h) {
      for (int d = 0; d < p.D; ++d) out[t * out_stride_token + h * p.D + d] = FromF<T>(0.f);
      lse[t * lse_stride_token + h] = kNegInf;
    }
  }
  arpg::cpu::PagedAttentionArgs<T> a{};
  a.q = p.q.data();
  a.k_cache = p.k_pool.data() + p.layer_offset;
  a.v_cache = p.v_pool.data() + p.layer_offset;
  a.block_table = p.block_table.data();
  a.kv_lens = p.kv_lens.data();
  a.cu_q_lens = p.cu_q_lens.data();
  a.out = out.data();
  a.lse = c.return_lse ? lse.data() : nullptr;
  a.q_stride_token = static_cast<int64_t>(p.fused_heads) * p.D;
  a.q_stride_head = p.D;
  a.out_stride_token = out_stride_token;
  a.out_stride_head = p.D;
  a.k_stride_page = a.v_stride_page = p.k_stride_page;
  a.k_stride_token = a.v_stride_token = p.k_stride_token;
  a.k_stride_head = a.v_stride_head = p.k_stride_head;
  a.block_table_stride = p.table_stride;
  a.lse_stride_token = lse_stride_token;
  a.num_heads = p.H;
  a.num_kv_heads = p.Hkv;
  a.head_dim = p.D;
  a.num_pages = p.num_pages;
  a.page_size = p.ps;
  a.max_pages = p.max_pages;
  a.causal = c.causal;
  a.scale = p.scale;
  // Every (sequence, KV head, query block), also those with no queries or no visible key (the adapter
  // skips them; the kernel must leave them alone), in shuffled order; q_end may pass the sequence's end.
  struct Item {
    int seq, kv_head, q_begin;
  };
  std::vector<Item> items;
  for (int b = 0; b < p.B; ++b) {
    for (int h = 0; h < p.Hkv; ++h) {
      int q_begin = 0;
      do {
        items.push_back({b, h, q_begin});
        q_begin += c.q_block;
      } while (q_begin < c.q_lens[b]);
    }
  }
  std::shuffle(items.begin(), items.end(), rng);
  for (const Item& it : items) {
    PoisonScratch(scratch);
    fn(a, it.seq, it.kv_head, it.q_begin, it.q_begin + c.q_block, scratch);
  }
}

template <typename T>
bool Compare(const AttnCase& c, const PagedProblem<T>& p, const std::vector<double>& ref_out,
             const std::vector<double>& ref_lse, const std::vector<T>& out, const std::vector<float>& lse,
             double& err_out, double& err_lse, std::string& detail) {
  const int64_t out_stride_token = static_cast<int64_t>(p.H) * p.D + kOutTokenPad;
  const int64_t lse_stride_token = p.H + kLseTokenPad;
  bool ok = true;
  auto fail = [&](const std::string& what) {
    if (ok) detail = what;  // the first mismatch
    ok = false;
  };
  for (int t = 0; t < p.T_; ++t) {
    for (int h = 0; h < p.H; ++h) {
      const std::string where = "token " + std::to_string(t) + " head " + std::to_string(h);
      for (int d = 0; d < p.D; ++d) {
        const double got = ToF(out[t * out_stride_token + h * p.D + d]);
        const double want = ref_out[(static_cast<size_t>(t) * p.H + h) * p.D + d];
        if (std::isfinite(got)) err_out = std::max(err_out, std::fabs(got - want));
        if (!Close(got, want, OutAbsTol<T>(), OutRelTol<T>())) {
          fail(where + " dim " + std::to_string(d) + ": out " + std::to_string(got) + ", want " + std::to_string(want));
        }
      }
      const float got = lse[t * lse_stride_token + h];
      const double want = ref_lse[static_cast<size_t>(t) * p.H + h];
      if (!c.return_lse) {
        if (got != kNegInf) fail(where + ": LSE written without an LSE pointer");
      } else if (std::isinf(want)) {
        if (got != kNegInf) fail(where + ": lse " + std::to_string(got) + ", want -inf");
      } else {
        if (std::isfinite(got)) err_lse = std::max(err_lse, std::fabs(got - want));
        if (!Close(got, want, kLseTol, kLseTol)) {
          fail(where + ": lse " + std::to_string(got) + ", want " + std::to_string(want));
        }
      }
    }
    for (int64_t i = static_cast<int64_t>(p.H) * p.D; i < out_stride_token; ++i) {
      if (!(ToF(out[t * out_stride_token + i]) == ToF(FromF<T>(kSentinel)))) fail("token " + std::to_string(t) + ": out padding written");
    }
    if (!(lse[t * lse_stride_token + p.H] == kSentinel)) fail("token " + std::to_string(t) + ": lse padding written");
  }
  return ok;
}

template <typename T>
void RunPagedAttention(const AttnCase& c, std::mt19937& rng, arpg::cpu::PagedAttentionScratch& scratch) {
  const PagedProblem<T> p = MakeProblem<T>(c, rng);
  std::vector<double> ref_out, ref_lse;
  Reference(c, p, ref_out, ref_lse);
  for (const auto& path : Paths<T>()) {
    std::vector<T> out;
    std::vector<float> lse;
    RunKernel(c, p, path.second, rng, scratch, out, lse);
    double err_out = 0, err_lse = 0;
    std::string detail;
    const bool ok = Compare(c, p, ref_out, ref_lse, out, lse, err_out, err_lse, detail);
    Report(Describe(c, DtypeName<T>()) + " [" + path.first + "]", ok, err_out, err_lse, detail);
  }
}

// merge_states ---------------------------------------------------------------------------------

// Two states per row, contiguous or strided (outputs with a padded head stride, LSE head-major), with
// rows where one or both sides are empty (LSE -inf, output 0, as paged_attention leaves them), equal
// LSEs and far-apart LSEs (one weight underflows).
template <typename T>
void RunMergeStates(int tokens, int heads, int dim, bool strided, std::mt19937& rng) {
  const int64_t rows = static_cast<int64_t>(tokens) * heads;
  const int64_t hs = strided ? dim + 3 : dim, ts = heads * hs + (strided ? 2 : 0);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::vector<T> oa(std::max<int64_t>(tokens * ts, 1), FromF<T>(kNaN)), ob(oa.size(), FromF<T>(kNaN));
  // LSE: [T, H] contiguous, or a [H, T] buffer read transposed.
  const int64_t l_tok = strided ? 1 : heads, l_head = strided ? tokens : 1;
  std::vector<float> la(std::max<int64_t>(rows, 1), kNaN), lb(la.size(), kNaN);
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      const int64_t r = static_cast<int64_t>(t) * heads + h;
      float a = 3 * uni(rng), b = 3 * uni(rng);
      switch (r % 7) {
        case 1: a = kNegInf; break;
        case 2: b = kNegInf; break;
        case 3: a = b = kNegInf; break;
        case 4: b = a; break;
        case 5: b = a - 120.f; break;  // exp(-120) underflows in float
        case 6: a = 40.f + b; break;
        default: break;
      }
      la[t * l_tok + h * l_head] = a;
      lb[t * l_tok + h * l_head] = b;
      for (int d = 0; d < dim; ++d) {
        oa[t * ts + h * hs + d] = FromF<T>(a == kNegInf ? 0.f : uni(rng));
        ob[t * ts + h * hs + d] = FromF<T>(b == kNegInf ? 0.f : uni(rng));
      }
    }
  }
  std::vector<T> out(std::max<int64_t>(rows * dim, 1), FromF<T>(kNaN));
  std::vector<float> lse(std::max<int64_t>(rows, 1), kNaN);
  arpg::cpu::MergeStatesArgs<T> a{};
  a.out_a = oa.data();
  a.out_b = ob.data();
  a.lse_a = la.data();
  a.lse_b = lb.data();
  a.out = out.data();
  a.lse = lse.data();
  a.a_stride_token = a.b_stride_token = ts;
  a.a_stride_head = a.b_stride_head = hs;
  a.lse_a_stride_token = a.lse_b_stride_token = l_tok;
  a.lse_a_stride_head = a.lse_b_stride_head = l_head;
  a.num_heads = heads;
  a.head_dim = dim;
  // In uneven chunks, as threads would take them.
  for (int64_t begin = 0; begin < rows;) {
    const int64_t end = std::min<int64_t>(rows, begin + 1 + static_cast<int64_t>(rng() % 7));
    arpg::cpu::MergeStatesRows(a, begin, end);
    begin = end;
  }
  bool ok = true;
  double err = 0, err_lse = 0;
  std::string detail;
  auto fail = [&](const std::string& what) {
    if (ok) detail = what;
    ok = false;
  };
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      const int64_t r = static_cast<int64_t>(t) * heads + h;
      const double xa = la[t * l_tok + h * l_head], xb = lb[t * l_tok + h * l_head];
      const double m = std::max(xa, xb);
      const double wa = std::isinf(xa) ? 0 : std::exp(xa - m), wb = std::isinf(xb) ? 0 : std::exp(xb - m);
      const double want_lse = wa + wb > 0 ? m + std::log(wa + wb) : -INFINITY;
      const std::string where = "token " + std::to_string(t) + " head " + std::to_string(h);
      if (std::isinf(want_lse)) {
        if (lse[r] != kNegInf) fail(where + ": lse " + std::to_string(lse[r]) + ", want -inf");
      } else {
        if (std::isfinite(lse[r])) err_lse = std::max(err_lse, std::fabs(lse[r] - want_lse));
        if (!Close(lse[r], want_lse, kLseTol, kLseTol)) {
          fail(where + ": lse " + std::to_string(lse[r]) + ", want " + std::to_string(want_lse));
        }
      }
      for (int d = 0; d < dim; ++d) {
        double want = 0;
        if (wa + wb > 0) {
          want = (wa * ToF(oa[t * ts + h * hs + d]) + wb * ToF(ob[t * ts + h * hs + d])) / (wa + wb);
        }
        const double got = ToF(out[r * dim + d]);
        if (std::isfinite(got)) err = std::max(err, std::fabs(got - want));
        if (!Close(got, want, OutAbsTol<T>(), OutRelTol<T>())) {
          fail(where + " dim " + std::to_string(d) + ": out " + std::to_string(got) + ", want " + std::to_string(want));
        }
      }
    }
  }
  Report(std::string("merge_states ") + DtypeName<T>() + " T=" + std::to_string(tokens) + " H=" +
             std::to_string(heads) + " D=" + std::to_string(dim) + (strided ? " strided" : " contiguous"),
         ok, err, err_lse, detail);
}

// Split-KV cascade: attention over keys [0, split) and [split, kv_len) of every sequence (two block
// tables over the same pages, the split on a page boundary), merged, against attention over all keys.
template <typename T>
void RunCascade(int D, int ps, std::mt19937& rng, arpg::cpu::PagedAttentionScratch& scratch) {
  AttnCase c;
  c.head_dim = D;
  c.page_size = ps;
  c.q_lens = {4, 1, 9};
  c.kv_lens = {5 * ps + 3, 2 * ps, 3 * ps + 1};
  const PagedProblem<T> p = MakeProblem<T>(c, rng);
  std::vector<double> ref_out, ref_lse;
  Reference(c, p, ref_out, ref_lse);
  // Prefix: the first split_pages[b] pages; suffix: the rest (shifted to column 0).
  const std::vector<int> split_pages = {2, 2, 0};  // sequence 1 has an empty suffix, sequence 2 an empty prefix
  PagedProblem<T> pre = p, suf = p;
  for (int b = 0; b < p.B; ++b) {
    const int needed = (c.kv_lens[b] + ps - 1) / ps;
    pre.kv_lens[b] = std::min(c.kv_lens[b], split_pages[b] * ps);
    suf.kv_lens[b] = c.kv_lens[b] - pre.kv_lens[b];
    for (int i = 0; i < p.table_stride; ++i) {
      const int src = i + split_pages[b];
      suf.block_table[b * p.table_stride + i] = src < needed ? p.block_table[b * p.table_stride + src] : -7;
    }
  }
  std::vector<T> out_a, out_b;
  std::vector<float> lse_a, lse_b;
  RunKernel(c, pre, &arpg::cpu::PagedAttentionBlock<T>, rng, scratch, out_a, lse_a);
  RunKernel(c, suf, &arpg::cpu::PagedAttentionBlock<T>, rng, scratch, out_b, lse_b);
  std::vector<T> out(static_cast<size_t>(p.T_) * p.H * p.D);
  std::vector<float> lse(static_cast<size_t>(p.T_) * p.H);
  arpg::cpu::MergeStatesArgs<T> m{};
  m.out_a = out_a.data();
  m.out_b = out_b.data();
  m.lse_a = lse_a.data();
  m.lse_b = lse_b.data();
  m.out = out.data();
  m.lse = lse.data();
  m.a_stride_token = m.b_stride_token = static_cast<int64_t>(p.H) * p.D + kOutTokenPad;
  m.a_stride_head = m.b_stride_head = p.D;
  m.lse_a_stride_token = m.lse_b_stride_token = p.H + kLseTokenPad;
  m.lse_a_stride_head = m.lse_b_stride_head = 1;
  m.num_heads = p.H;
  m.head_dim = p.D;
  arpg::cpu::MergeStatesRows(m, 0, static_cast<int64_t>(p.T_) * p.H);
  bool ok = true;
  double err = 0, err_lse = 0;
  std::string detail;
  // 16-bit: the halves are rounded before the merge, so twice the output tolerance.
  for (size_t i = 0; i < out.size(); ++i) {
    const double got = ToF(out[i]);
    if (std::isfinite(got)) err = std::max(err, std::fabs(got - ref_out[i]));
    if (!Close(got, ref_out[i], 2 * OutAbsTol<T>(), 2 * OutRelTol<T>()) && ok) {
      ok = false;
      detail = "element " + std::to_string(i) + ": out " + std::to_string(got) + ", want " + std::to_string(ref_out[i]);
    }
  }
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isfinite(lse[i])) err_lse = std::max(err_lse, std::fabs(lse[i] - ref_lse[i]));
    if (!Close(lse[i], ref_lse[i], kLseTol, kLseTol) && ok) {
      ok = false;
      detail = "row " + std::to_string(i) + ": lse " + std::to_string(lse[i]) + ", want " + std::to_string(ref_lse[i]);
    }
  }
  Report(std::string("cascade paged_attention + merge_states ") + DtypeName<T>() + " D=" + std::to_string(D) +
             " page=" + std::to_string(ps),
         ok, err, err_lse, detail);
}

// The test's own 16-bit conversions, against known encodings and round trips.
void CheckConversions() {
  bool ok = true;
  std::string detail;
  auto expect = [&](bool cond, const std::string& what) {
    if (!cond && ok) detail = what;
    ok = ok && cond;
  };
  expect(Half(1.0f).bits == 0x3c00 && Half(-2.0f).bits == 0xc000 && Half(65504.0f).bits == 0x7bff, "fp16 encodings");
  expect(Half(65520.0f).bits == 0x7c00 && Half(65519.0f).bits == 0x7bff, "fp16 overflow rounding");
  expect(Half(std::ldexp(1.0f, -24)).bits == 0x0001 && Half(std::ldexp(1.0f, -25)).bits == 0x0000 &&
             Half(std::ldexp(3.0f, -26)).bits == 0x0001 && Half(std::ldexp(1.0f, -14)).bits == 0x0400,
         "fp16 subnormals");
  expect(Half(1.0f + std::ldexp(1.0f, -11)).bits == 0x3c00 && Half(1.0f + std::ldexp(3.0f, -11)).bits == 0x3c02,
         "fp16 ties to even");
  expect(std::isnan(ToF(Half(kNaN))) && std::isnan(ToF(BF16(kNaN))), "NaN");
  expect(BF16(1.0f).bits == 0x3f80 && BF16(1.0f + std::ldexp(1.0f, -8)).bits == 0x3f80 &&
             BF16(1.0f + std::ldexp(3.0f, -8)).bits == 0x3f82,
         "bf16 encodings, ties to even");
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    Half h;
    h.bits = static_cast<uint16_t>(b);
    const float f = ToF(h);
    if (std::isnan(f)) continue;
    if (Half(f).bits != h.bits) {
      expect(false, "fp16 round trip of 0x" + std::to_string(b));
      break;
    }
    BF16 g;
    g.bits = static_cast<uint16_t>(b);
    if (!std::isnan(ToF(g)) && BF16(ToF(g)).bits != g.bits) {
      expect(false, "bf16 round trip of " + std::to_string(b));
      break;
    }
  }
  Report("16-bit conversions of this test", ok, 0, 0, detail);
}

template <typename T>
void AttentionSuite(const std::vector<int>& dims, const std::vector<int>& page_sizes, std::mt19937& rng,
                    arpg::cpu::PagedAttentionScratch& scratch) {
  const int blocks[] = {1, 3, 16, 64};
  int n = 0;
  for (int D : dims) {
    for (int ps : page_sizes) {
      for (bool causal : {false, true}) {
        // Varlen with GQA 8/2: no queries, no keys, a partial last page, a causal sequence with more
        // queries than keys (its first rows see nothing), a long one spanning many tiles.
        AttnCase c;
        c.head_dim = D;
        c.page_size = ps;
        c.causal = causal;
        c.q_block = blocks[n++ % 4];
        c.q_lens = {3, 0, 17, 1, 6, 2};
        c.kv_lens = {70, 9, 0, ps + 1, 4, 150};
        c.head_pad = n % 3 == 0 ? 8 : 0;
        c.table_pad = n % 2;
        RunPagedAttention<T>(c, rng, scratch);
        // Shared physical pages, no LSE, MHA 4/4.
        AttnCase s;
        s.head_dim = D;
        s.page_size = ps;
        s.causal = causal;
        s.q_block = blocks[n++ % 4];
        s.num_heads = s.num_kv_heads = 4;
        s.q_lens = {20, 7};
        s.kv_lens = {3 * ps + 40, 2 * ps + 33};
        s.share_pages = true;
        s.return_lse = n % 2 == 0;
        RunPagedAttention<T>(s, rng, scratch);
      }
    }
  }
  // MQA 8/1 with large logits; rows across several items.
  for (int ps : {16, 64}) {
    AttnCase c;
    c.head_dim = dims.back();
    c.page_size = ps;
    c.num_heads = 8;
    c.num_kv_heads = 1;
    c.q_lens = {40, 3};
    c.kv_lens = {97, 50};
    c.causal = true;
    c.q_amplitude = 8.f;
    c.q_block = 16;
    RunPagedAttention<T>(c, rng, scratch);
  }
}

}  // namespace

// sample ---------------------------------------------------------------------------------------

// The sampler's semantics in double precision with a sort: guidance, temperature, top-k (>= the k-th largest),
// top-p (sorted exclusive mass <= top_p), then the cumulative probabilities in vocabulary order.
std::vector<double> SampleCdf(const std::vector<float>& c, const std::vector<float>* u, float scale, float temperature,
                              int top_k, double top_p) {
  const int n = static_cast<int>(c.size());
  std::vector<double> x(n);
  for (int j = 0; j < n; ++j) {
    const float g = u == nullptr ? c[j] : (*u)[j] + (c[j] - (*u)[j]) * scale;
    x[j] = static_cast<double>(g / temperature);
  }
  std::vector<double> sorted(x);
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  const double kth = top_k > 0 && top_k < n ? sorted[top_k - 1] : -INFINITY;
  std::vector<double> p(n, 0.0);
  double total = 0.0;
  for (int j = 0; j < n; ++j) {
    if (x[j] >= kth) p[j] = std::exp(x[j] - sorted[0]);
    total += p[j];
  }
  if (top_p < 1.0) {
    std::vector<double> ps(p);
    std::sort(ps.begin(), ps.end(), std::greater<double>());
    double before = 0.0, tau = 0.0;
    for (double v : ps) {
      if (v == 0.0 || before > top_p * total) break;
      tau = v;
      before += v;
    }
    total = 0.0;
    for (int j = 0; j < n; ++j) {
      if (p[j] < tau) p[j] = 0.0;
      total += p[j];
    }
  }
  std::vector<double> cdf(n);
  double run = 0.0;
  for (int j = 0; j < n; ++j) cdf[j] = (run += p[j]) / total;
  return cdf;
}

// Random rows through SampleRow: the token is kept by the filters and is the double-precision loop's, or
// the draw lies within 1e-5 of the boundary between the two. Greedy rows give the first largest.
void RunSample(int vocab, float temperature, int top_k, double top_p, bool cfg, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const arpg::cpu::SampleArgs args{vocab, temperature, top_k, top_p};
  arpg::cpu::SampleScratch scratch;
  bool ok = true;
  std::string detail;
  for (int row = 0; row < 200 && ok; ++row) {
    std::vector<float> c(vocab), u(vocab);  // exactly sized: ASan sees a read past the row
    for (int j = 0; j < vocab; ++j) {
      c[j] = normal(rng);
      u[j] = normal(rng);
    }
    const float scale = cfg ? 1.5f + static_cast<float>(row % 4) : 0.f;
    const double draw = uniform(rng);
    const int64_t got = arpg::cpu::SampleRow(args, c.data(), cfg ? u.data() : nullptr, scale, draw, scratch);
    if (temperature <= 0.f) {
      int64_t want = 0;
      for (int j = 1; j < vocab; ++j) {
        const float gj = cfg ? u[j] + (c[j] - u[j]) * scale : c[j];
        const float gw = cfg ? u[want] + (c[want] - u[want]) * scale : c[want];
        if (gj > gw) want = j;
      }
      ok = got == want;
      if (!ok) detail = "greedy row " + std::to_string(row) + ": " + std::to_string(got) + " vs " + std::to_string(want);
      continue;
    }
    const std::vector<double> cdf = SampleCdf(c, cfg ? &u : nullptr, scale, temperature, top_k, top_p);
    int64_t want = 0;
    while (want < vocab - 1 && cdf[want] <= draw) ++want;
    const double p_got = got >= 0 && got < vocab ? cdf[got] - (got ? cdf[got - 1] : 0.0) : -1.0;
    bool near = false;
    for (int64_t j = std::min(got, want); j < std::max(got, want) && got >= 0 && got < vocab; ++j) {
      near = near || std::fabs(cdf[j] - draw) < 1e-5;
    }
    ok = p_got > 0.0 && (got == want || near);
    if (!ok) detail = "row " + std::to_string(row) + ": " + std::to_string(got) + " vs " + std::to_string(want);
  }
  Report("sample V=" + std::to_string(vocab) + " T=" + std::to_string(temperature).substr(0, 4) + " top_k=" +
             std::to_string(top_k) + " top_p=" + std::to_string(top_p).substr(0, 4) + (cfg ? " cfg" : ""),
         ok, 0, 0, detail);
}

// The decoding step's elementwise rows (step_ops.h) against double-precision loops, for row lengths around
// the 8-wide blocks, in exactly sized buffers (ASan sees a read or write past a row or the scratch).
template <typename T>
void RunStepOps(int n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<T> x(n), y(n), w(n), out(n);
  std::vector<float> xf(n), scratch((n + 7) / 8 * 8);
  for (int i = 0; i < n; ++i) {
    x[i] = T(normal(rng));
    y[i] = T(normal(rng) * 3.f);
    w[i] = T(1.f + 0.1f * normal(rng));
    xf[i] = ToF(x[i]);
  }
  const double tol = std::is_same<T, float>::value ? 1e-5 : OutRelTol<T>();
  // RMSNorm: x * rsqrt(mean(x^2) + eps) * w.
  arpg::cpu::RmsNormRow(xf.data(), w.data(), n, 1e-5f, out.data());
  double ss = 0.0, err = 0.0;
  bool ok = true;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(xf[i]) * xf[i];
  const double r = 1.0 / std::sqrt(ss / n + 1e-5);
  for (int i = 0; i < n; ++i) {
    const double want = xf[i] * r * ToF(w[i]);
    err = std::max(err, std::fabs(ToF(out[i]) - want));
    ok = ok && Close(ToF(out[i]), want, tol, 2 * tol);
  }
  Report(std::string("rms_norm ") + DtypeName<T>() + " n=" + std::to_string(n), ok, err, 0);
  // silu(x) * y, over the range where exp saturates too.
  for (int i = 0; i < n; ++i) x[i] = T(normal(rng) * 20.f);
  arpg::cpu::SiluMulRow(x.data(), y.data(), n, scratch.data(), out.data());
  ok = true;
  err = 0.0;
  for (int i = 0; i < n; ++i) {
    const double a = ToF(x[i]);
    const double want = a / (1.0 + std::exp(-a)) * ToF(y[i]);
    err = std::max(err, std::fabs(ToF(out[i]) - want));
    ok = ok && Close(ToF(out[i]), want, tol, 2 * tol);
  }
  Report(std::string("silu_mul ") + DtypeName<T>() + " n=" + std::to_string(n), ok, err, 0);
  // RoPE pairs (even n only): (x0 c - x1 s, x1 c + x0 s), exact to a float rounding of each product.
  if (n % 2 == 0) {
    std::vector<float> table(n), rot(n);
    std::uniform_real_distribution<float> angle(-3.2f, 3.2f);
    for (int i = 0; i < n / 2; ++i) {
      const float t = angle(rng);
      table[2 * i] = std::cos(t);
      table[2 * i + 1] = std::sin(t);
    }
    arpg::cpu::RotatePairs(xf.data(), table.data(), n / 2, rot.data());
    ok = true;
    err = 0.0;
    for (int i = 0; i < n / 2; ++i) {
      const double x0 = xf[2 * i], x1 = xf[2 * i + 1], c = table[2 * i], sn = table[2 * i + 1];
      const double w0 = x0 * c - x1 * sn, w1 = x1 * c + x0 * sn;
      err = std::max({err, std::fabs(rot[2 * i] - w0), std::fabs(rot[2 * i + 1] - w1)});
      ok = ok && Close(rot[2 * i], w0, 1e-5, 1e-5) && Close(rot[2 * i + 1], w1, 1e-5, 1e-5);
    }
    Report(std::string("rope n=") + std::to_string(n), ok, err, 0);
  }
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "-v") g_verbose = true;
  }
  std::mt19937 rng(1234);
  arpg::cpu::PagedAttentionScratch scratch;  // reused by every case: head dims and row counts change
  CheckConversions();
  RunMergeStates<float>(13, 3, 24, false, rng);
  RunMergeStates<float>(11, 4, 72, true, rng);
  RunMergeStates<float>(0, 4, 8, false, rng);
  RunMergeStates<BF16>(13, 3, 64, true, rng);
  RunMergeStates<Half>(9, 5, 20, false, rng);
  // Head dims: multiples of 8 (24 and 72 odd multiples) and two that the header pads (20, 5).
  AttentionSuite<float>({8, 24, 64, 72, 20, 5}, {1, 3, 16, 64}, rng, scratch);
  AttentionSuite<BF16>({24, 64, 20}, {3, 16}, rng, scratch);
  AttentionSuite<Half>({72, 8}, {1, 64}, rng, scratch);
  RunCascade<float>(64, 16, rng, scratch);
  RunCascade<float>(20, 3, rng, scratch);
  RunCascade<BF16>(72, 64, rng, scratch);
  for (int vocab : {1, 7, 64, 1000}) {
    for (bool cfg : {false, true}) {
      RunSample(vocab, 1.0f, 0, 1.0, cfg, rng);
      RunSample(vocab, 0.7f, 5, 1.0, cfg, rng);
      RunSample(vocab, 1.0f, 0, 0.8, cfg, rng);
      RunSample(vocab, 1.3f, 40, 0.9, cfg, rng);
      RunSample(vocab, 0.0f, 0, 1.0, cfg, rng);
    }
  }
  for (int n : {1, 2, 7, 8, 9, 64, 96, 130}) {
    RunStepOps<float>(n, rng);
    RunStepOps<BF16>(n, rng);
    RunStepOps<Half>(n, rng);
  }
  std::string paths;
  for (const auto& path : Paths<float>()) paths += std::string(paths.empty() ? "" : ", ") + path.first;
  std::printf("%d/%d cases passed (CPU kernels; code paths: %s)\n", g_cases - g_failures, g_cases, paths.c_str());
  return g_failures == 0 ? 0 : 1;
}
