// arpg_kernel_tests: the raw-pointer launchers on random data against CPU loops in double precision.
//
// Built by CMake twice: as CUDA (needs a GPU to run; exits 77, CTest's skip code, without one) and,
// through kernel_tests_emu.cpp, as plain C++ on top of simt_emulator.h, which runs the same kernels on
// the CPU. Prints one line per case and returns nonzero when any case fails.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "arpg/append_kv.cuh"
#include "arpg/merge_states.cuh"
#include "arpg/paged_attention.cuh"

// GCC 12 reports a false -Wfree-nonheap-object when destroying std::vector<__half> at -O2.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wfree-nonheap-object"
#endif

namespace {

#if defined(ARPG_SIMT_EMULATION)
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

#define CHECK_CUDA(expr)                                                                        \
  do {                                                                                          \
    const cudaError_t err_ = (expr);                                                            \
    if (err_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d: %s failed: %d\n", __FILE__, __LINE__, #expr, int(err_));    \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

// Device memory, or exactly sized host memory under the emulator (so AddressSanitizer sees overruns).
template <typename T>
class Buffer {
 public:
  explicit Buffer(const std::vector<T>& host) : size_(host.size()) {
    const size_t bytes = std::max<size_t>(size_, 1) * sizeof(T);
    if (kEmulated) {
      ptr_ = static_cast<T*>(std::malloc(bytes));
      if (size_) std::memcpy(ptr_, host.data(), size_ * sizeof(T));
    } else {
      CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr_), bytes));
      if (size_) CHECK_CUDA(cudaMemcpy(ptr_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  ~Buffer() {
    if (kEmulated) {
      std::free(ptr_);
    } else {
      cudaFree(ptr_);
    }
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return ptr_; }
  std::vector<T> ToHost() const {
    std::vector<T> host(size_);
    if (kEmulated) {
      if (size_) std::memcpy(host.data(), ptr_, size_ * sizeof(T));
    } else {
      CHECK_CUDA(cudaDeviceSynchronize());
      if (size_) CHECK_CUDA(cudaMemcpy(host.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    }
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t size_;
};

template <typename T>
float ToF(T x) {
  return arpg::TypeTraits<T>::ToFloat(x);
}
template <typename T>
T FromF(float x) {
  return arpg::TypeTraits<T>::FromFloat(x);
}
template <typename T>
const char* DtypeName();
template <>
const char* DtypeName<half>() {
  return "fp16";
}
template <>
const char* DtypeName<__nv_bfloat16>() {
  return "bf16";
}
template <>
const char* DtypeName<float>() {
  return "fp32";
}

int g_failures = 0;
int g_cases = 0;
bool g_fail_fast = false;

void Report(const std::string& name, bool ok, double err_out, double err_lse) {
  ++g_cases;
  if (!ok) ++g_failures;
  std::printf("%s %s (max err out %.3g, lse %.3g)\n", ok ? "PASS" : "FAIL", name.c_str(), err_out, err_lse);
  std::fflush(stdout);
  if (!ok && g_fail_fast) std::exit(1);
}

struct AttnCase {
  std::vector<int> q_lens;
  std::vector<int> kv_lens;
  int num_heads = 2;
  int num_kv_heads = 1;
  int page_size = 16;
  bool causal = false;
  int num_splits = 1;  // 0: the shape heuristic with a pretend 132-SM device
  bool return_lse = true;
  bool share_pages = false;  // the second sequence reuses the first sequence's leading pages
  int extra_pages = 1;       // block-table columns past what the longest sequence needs
  float q_amplitude = 1.f;
  int pad_rows = 0;  // rows of q past the last sequence's queries (a captured graph's padding): not written
};

template <typename T, int D>
void RunPagedAttention(const AttnCase& c, std::mt19937& rng) {
  const int B = int(c.q_lens.size());
  const int H = c.num_heads, Hkv = c.num_kv_heads, ps = c.page_size;
  const int group = H / Hkv;
  std::vector<int> cu(B + 1, 0);
  for (int b = 0; b < B; ++b) cu[b + 1] = cu[b] + c.q_lens[b];
  const int T_ = cu[B] + c.pad_rows;
  int max_q_len = 0, max_kv = 0;
  for (int b = 0; b < B; ++b) {
    max_q_len = std::max(max_q_len, c.q_lens[b]);
    max_kv = std::max(max_kv, c.kv_lens[b]);
  }
  const int max_pages = (max_kv + ps - 1) / ps + c.extra_pages;

  // Physical pages in shuffled order; sequence 1 may share sequence 0's leading pages.
  std::vector<int> block_table(size_t(B) * max_pages, 0);
  int num_pages = 0;
  std::vector<int> owner;  // physical page -> (seq, logical page) that defines its contents
  std::vector<int> order;
  for (int b = 0; b < B; ++b) {
    const int needed = (c.kv_lens[b] + ps - 1) / ps;
    for (int i = 0; i < max_pages; ++i) {
      if (c.share_pages && b == 1 && i < needed && i < (c.kv_lens[0] / ps)) {
        block_table[size_t(b) * max_pages + i] = block_table[i];  // full pages of sequence 0 only
      } else if (i < needed) {
        block_table[size_t(b) * max_pages + i] = num_pages++;
      }
    }
  }
  num_pages = std::max(num_pages, 1) + 2;  // a couple of pages nobody uses
  std::vector<int> perm(num_pages);
  for (int i = 0; i < num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int b = 0; b < B; ++b) {
    const int needed = (c.kv_lens[b] + ps - 1) / ps;
    for (int i = 0; i < max_pages; ++i) {
      int& e = block_table[size_t(b) * max_pages + i];
      // Columns past the sequence's pages hold junk ids (even out of range): they must never be read.
      e = i < needed ? perm[e] : int(rng() % 1000) - 500;
    }
  }

  // A 2-layer pool; the kernel sees layer 1 through page strides. Untouched slots hold NaN.
  const int layers = 2, layer = 1;
  const int64_t page_elems = int64_t(ps) * Hkv * D;
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  const float nan = std::nanf("");
  std::vector<T> k_pool(size_t(layers) * num_pages * page_elems, FromF<T>(nan));
  std::vector<T> v_pool(k_pool.size(), FromF<T>(nan));
  // Logical K/V per sequence, written through the block table (shared pages get the same values).
  std::vector<std::vector<float>> k_seq(B), v_seq(B);
  for (int b = 0; b < B; ++b) {
    k_seq[b].resize(size_t(c.kv_lens[b]) * Hkv * D);
    v_seq[b].resize(k_seq[b].size());
    for (int j = 0; j < c.kv_lens[b]; ++j) {
      const int page = block_table[size_t(b) * max_pages + j / ps];
      const bool shared = c.share_pages && b == 1 && j < (c.kv_lens[0] / ps) * ps;
      for (int h = 0; h < Hkv; ++h) {
        for (int d = 0; d < D; ++d) {
          const size_t slot = (size_t(layer) * num_pages + page) * page_elems + (size_t(j % ps) * Hkv + h) * D + d;
          if (!shared) {
            k_pool[slot] = FromF<T>(uni(rng));
            v_pool[slot] = FromF<T>(uni(rng));
          }
          k_seq[b][(size_t(j) * Hkv + h) * D + d] = ToF(k_pool[slot]);
          v_seq[b][(size_t(j) * Hkv + h) * D + d] = ToF(v_pool[slot]);
        }
      }
    }
  }

  // q is the first H heads of a fused [T, H + 2 Hkv, D] projection, so its token stride is not H * D.
  const int fused_heads = H + 2 * Hkv;
  std::vector<T> q(std::max<size_t>(size_t(T_) * fused_heads * D, 1), FromF<T>(nan));
  for (int t = 0; t < T_; ++t)
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d) q[(size_t(t) * fused_heads + h) * D + d] = FromF<T>(c.q_amplitude * uni(rng));

  const float scale = 1.f / std::sqrt(float(D));
  std::vector<double> ref_out(size_t(T_) * H * D, 0.0), ref_lse(size_t(T_) * H, -INFINITY);
  for (int b = 0; b < B; ++b) {
    const int q_len = c.q_lens[b], kv_len = c.kv_lens[b];
    for (int i = 0; i < q_len; ++i) {
      const int vis = c.causal ? std::max(0, std::min(kv_len, kv_len - q_len + i + 1)) : kv_len;
      for (int h = 0; h < H; ++h) {
        const int t = cu[b] + i, hk = h / group;
        if (vis == 0) continue;
        std::vector<double> s(vis);
        double m = -INFINITY;
        for (int j = 0; j < vis; ++j) {
          double acc = 0;
          for (int d = 0; d < D; ++d)
            acc += double(ToF(q[(size_t(t) * fused_heads + h) * D + d])) * k_seq[b][(size_t(j) * Hkv + hk) * D + d];
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (int j = 0; j < vis; ++j) sum += std::exp(s[j] - m);
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int j = 0; j < vis; ++j) acc += std::exp(s[j] - m) * v_seq[b][(size_t(j) * Hkv + hk) * D + d];
          ref_out[(size_t(t) * H + h) * D + d] = acc / sum;
        }
        ref_lse[size_t(t) * H + h] = m + std::log(sum);
      }
    }
  }

  int num_splits = c.num_splits;
  if (num_splits == 0) num_splits = arpg::PagedAttentionNumSplits(B, Hkv, group, max_q_len, max_pages, ps, 132);

  Buffer<T> d_q(q), d_k(k_pool), d_v(v_pool);
  Buffer<int32_t> d_bt(std::vector<int32_t>(block_table.begin(), block_table.end()));
  Buffer<int32_t> d_kv(std::vector<int32_t>(c.kv_lens.begin(), c.kv_lens.end()));
  Buffer<int32_t> d_cu(std::vector<int32_t>(cu.begin(), cu.end()));
  Buffer<T> d_out(std::vector<T>(size_t(T_) * H * D, FromF<T>(nan)));
  Buffer<float> d_lse(std::vector<float>(size_t(T_) * H, nan));
  Buffer<float> d_pout(std::vector<float>(num_splits > 1 ? size_t(num_splits) * T_ * H * D : 0, nan));
  Buffer<float> d_plse(std::vector<float>(num_splits > 1 ? size_t(num_splits) * T_ * H : 0, nan));

  arpg::PagedAttentionParams<T> p{};
  p.q = d_q.get();
  p.k_cache = d_k.get() + size_t(layer) * num_pages * page_elems;
  p.v_cache = d_v.get() + size_t(layer) * num_pages * page_elems;
  p.block_table = d_bt.get();
  p.kv_lens = d_kv.get();
  p.cu_q_lens = d_cu.get();
  p.out = d_out.get();
  p.lse = c.return_lse ? d_lse.get() : nullptr;
  p.partial_out = num_splits > 1 ? d_pout.get() : nullptr;
  p.partial_lse = num_splits > 1 ? d_plse.get() : nullptr;
  p.q_stride_token = int64_t(fused_heads) * D;
  p.q_stride_head = D;
  p.out_stride_token = int64_t(H) * D;
  p.out_stride_head = D;
  p.k_stride_page = p.v_stride_page = page_elems;
  p.k_stride_token = p.v_stride_token = int64_t(Hkv) * D;
  p.k_stride_head = p.v_stride_head = D;
  p.block_table_stride = max_pages;
  p.num_tokens = T_;
  p.num_heads = H;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.num_seqs = B;
  p.num_pages = num_pages;
  p.page_size = ps;
  p.max_pages = max_pages;
  p.max_q_len = max_q_len;
  p.num_splits = num_splits;
  p.causal = c.causal;
  p.scale = scale;
  CHECK_CUDA((arpg::PagedAttention<T, D>(p, nullptr)));

  const std::vector<T> out = d_out.ToHost();
  const std::vector<float> lse = d_lse.ToHost();
  const double tol = std::is_same<T, half>::value ? 4e-3 : 3e-2;
  double err_out = 0, err_lse = 0;
  bool ok = true;
  const size_t owned = size_t(cu[B]) * H;  // rows past it must keep their NaN poison, bit for bit
  for (size_t i = owned * D; i < out.size(); ++i) {
    if (!std::isnan(ToF(out[i]))) ok = false;
  }
  for (size_t i = owned; i < lse.size(); ++i) {
    if (!std::isnan(lse[i])) ok = false;
  }
  for (size_t i = 0; i < owned * D; ++i) {
    const double o = ToF(out[i]);
    const double e = std::fabs(o - ref_out[i]);
    if (!(e <= tol)) ok = false;  // NaN fails
    if (std::isfinite(e)) err_out = std::max(err_out, e);
  }
  if (c.return_lse) {
    for (size_t i = 0; i < owned; ++i) {
      if (std::isinf(ref_lse[i])) {
        if (!(std::isinf(lse[i]) && lse[i] < 0)) ok = false;
        continue;
      }
      const double e = std::fabs(lse[i] - ref_lse[i]);
      if (!(e <= 2e-3)) ok = false;
      if (std::isfinite(e)) err_lse = std::max(err_lse, e);
    }
  }
  std::string name = std::string("paged_attention ") + DtypeName<T>() + " D=" + std::to_string(D) +
                     " page=" + std::to_string(ps) + " H=" + std::to_string(H) + "/" + std::to_string(Hkv) +
                     (c.causal ? " causal" : " full") + " splits=" + std::to_string(num_splits) + " q_lens=[";
  for (int b = 0; b < B; ++b) name += std::to_string(c.q_lens[b]) + (b + 1 < B ? "," : "]");
  name += " kv_lens=[";
  for (int b = 0; b < B; ++b) name += std::to_string(c.kv_lens[b]) + (b + 1 < B ? "," : "]");
  if (c.share_pages) name += " shared";
  if (!c.return_lse) name += " no-lse";
  if (c.pad_rows) name += " pad=" + std::to_string(c.pad_rows);
  Report(name, ok, err_out, err_lse);
}

template <typename T>
void RunAppendKV(int head_dim, std::mt19937& rng) {
  const int T_ = 37, Hkv = 3, D = head_dim, ps = 16, num_pages = 5;
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::vector<T> k(size_t(T_) * Hkv * D), v(k.size());
  for (auto& x : k) x = FromF<T>(uni(rng));
  for (auto& x : v) x = FromF<T>(uni(rng));
  std::vector<int> slots(num_pages * ps);
  for (int i = 0; i < num_pages * ps; ++i) slots[i] = i;
  std::shuffle(slots.begin(), slots.end(), rng);
  std::vector<int64_t> slot_mapping(T_);
  for (int t = 0; t < T_; ++t) slot_mapping[t] = (t % 5 == 3) ? -1 : slots[t];
  const std::vector<T> init(size_t(num_pages) * ps * Hkv * D, FromF<T>(0.5f));
  std::vector<T> ref_k = init, ref_v = init;
  for (int t = 0; t < T_; ++t) {
    if (slot_mapping[t] < 0) continue;
    for (int i = 0; i < Hkv * D; ++i) {
      ref_k[size_t(slot_mapping[t]) * Hkv * D + i] = k[size_t(t) * Hkv * D + i];
      ref_v[size_t(slot_mapping[t]) * Hkv * D + i] = v[size_t(t) * Hkv * D + i];
    }
  }
  Buffer<T> d_k(k), d_v(v), d_kc(init), d_vc(init);
  Buffer<int64_t> d_slots(slot_mapping);
  arpg::AppendKVParams<T> p{};
  p.k = d_k.get();
  p.v = d_v.get();
  p.k_cache = d_kc.get();
  p.v_cache = d_vc.get();
  p.slot_mapping = d_slots.get();
  p.k_stride_token = p.v_stride_token = int64_t(Hkv) * D;
  p.k_stride_head = p.v_stride_head = D;
  p.k_cache_stride_page = p.v_cache_stride_page = int64_t(ps) * Hkv * D;
  p.k_cache_stride_token = p.v_cache_stride_token = int64_t(Hkv) * D;
  p.k_cache_stride_head = p.v_cache_stride_head = D;
  p.num_tokens = T_;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.num_pages = num_pages;
  p.page_size = ps;
  CHECK_CUDA(arpg::AppendKV<T>(p, nullptr));
  const std::vector<T> kc = d_kc.ToHost(), vc = d_vc.ToHost();
  const bool ok = std::memcmp(kc.data(), ref_k.data(), kc.size() * sizeof(T)) == 0 &&
                  std::memcmp(vc.data(), ref_v.data(), vc.size() * sizeof(T)) == 0;
  Report(std::string("append_kv ") + DtypeName<T>() + " D=" + std::to_string(D) + " vec=" +
             std::to_string(arpg::AppendKVVectorBytes(p)),
         ok, 0, 0);
}

template <typename T>
void RunMergeStates(std::mt19937& rng) {
  const int64_t rows = 29;
  const int D = 40;
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::vector<T> oa(rows * D), ob(rows * D);
  std::vector<float> la(rows), lb(rows);
  for (auto& x : oa) x = FromF<T>(uni(rng));
  for (auto& x : ob) x = FromF<T>(uni(rng));
  for (int64_t r = 0; r < rows; ++r) {
    la[r] = 3 * uni(rng);
    lb[r] = 3 * uni(rng);
    if (r % 4 == 1) la[r] = -INFINITY;
    if (r % 4 == 2) lb[r] = -INFINITY;
    if (r % 4 == 3) la[r] = lb[r] = -INFINITY;
    if (r % 4 != 0) {  // the side with no keys holds garbage that must not leak
      for (int d = 0; d < D; ++d) {
        if (la[r] == -INFINITY) oa[r * D + d] = FromF<T>(std::nanf(""));
        if (lb[r] == -INFINITY) ob[r * D + d] = FromF<T>(std::nanf(""));
      }
    }
  }
  Buffer<T> d_oa(oa), d_ob(ob), d_out{std::vector<T>(rows * D)};
  Buffer<float> d_la(la), d_lb(lb), d_lse{std::vector<float>(rows)};
  arpg::MergeStatesParams<T> p{d_oa.get(), d_la.get(), d_ob.get(), d_lb.get(), d_out.get(), d_lse.get(), rows, D};
  CHECK_CUDA(arpg::MergeStates<T>(p, nullptr));
  const std::vector<T> out = d_out.ToHost();
  const std::vector<float> lse = d_lse.ToHost();
  bool ok = true;
  double err = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const double m = std::max(la[r], lb[r]);
    const double wa = std::isinf(la[r]) ? 0 : std::exp(la[r] - m), wb = std::isinf(lb[r]) ? 0 : std::exp(lb[r] - m);
    const double ref_lse = (wa + wb) > 0 ? m + std::log(wa + wb) : -INFINITY;
    if (std::isinf(ref_lse) ? !(std::isinf(lse[r]) && lse[r] < 0) : !(std::fabs(lse[r] - ref_lse) < 1e-5)) ok = false;
    for (int d = 0; d < D; ++d) {
      double ref = 0;
      if (wa > 0) ref += wa * ToF(oa[r * D + d]);
      if (wb > 0) ref += wb * ToF(ob[r * D + d]);
      if (wa + wb > 0) ref /= (wa + wb);
      const double e = std::fabs(ToF(out[r * D + d]) - ref);
      if (!(e < 1e-2)) ok = false;
      if (std::isfinite(e)) err = std::max(err, e);
    }
  }
  Report(std::string("merge_states ") + DtypeName<T>(), ok, err, 0);
}

template <typename T, int D>
void AttentionSuite(std::mt19937& rng, bool quick) {
  for (int ps : {16, 32, 64}) {
    for (int group : {1, 2, 4}) {
      for (bool causal : {false, true}) {
        AttnCase c;
        c.page_size = ps;
        c.num_kv_heads = group == 4 ? 1 : 2;
        c.num_heads = c.num_kv_heads * group;
        c.causal = causal;
        // varlen, an empty query set, a sequence with no keys, a partial last page
        c.q_lens = {3, 0, 5, 1};
        c.kv_lens = {70, 9, 0, ps + 1};
        c.num_splits = 1;
        RunPagedAttention<T, D>(c, rng);
        if (quick && ps != 32) continue;
        // shared pages, forced splits
        c.q_lens = {20, 7};
        c.kv_lens = {135, 130};
        c.share_pages = true;
        c.num_splits = 3;
        RunPagedAttention<T, D>(c, rng);
        c.q_lens = {2, 9};
        c.kv_lens = {4, 200};
        c.share_pages = false;
        c.num_splits = 7;  // more splits than key tiles
        c.return_lse = false;
        RunPagedAttention<T, D>(c, rng);
      }
    }
  }
  // Causal rows that see no key next to rows that do, in one CTA and across splits: the early
  // queries of a sequence with more queries than keys, and splits past some rows' last key.
  for (int splits : {1, 4}) {
    AttnCase z;
    z.num_heads = 2;
    z.num_kv_heads = 1;
    z.causal = true;
    z.q_lens = {20, 3, 40};
    z.kv_lens = {10, 0, 200};
    z.num_splits = splits;
    RunPagedAttention<T, D>(z, rng);
    // Padding rows past the last sequence (a CUDA graph sized for more rows than this step has).
    z.pad_rows = 7;
    RunPagedAttention<T, D>(z, rng);
  }
  // Rows that span several CTAs (q_len * group > 64) and large logits.
  AttnCase c;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.q_lens = {40, 3};
  c.kv_lens = {97, 50};
  c.causal = true;
  c.q_amplitude = 8.f;
  c.num_splits = 2;
  RunPagedAttention<T, D>(c, rng);
  c.causal = false;
  c.num_splits = 0;
  c.page_size = 64;
  RunPagedAttention<T, D>(c, rng);
  if (!quick) {
    // ARPG-like decoding step: 16 heads, a few queries per sequence, ~257 keys.
    AttnCase a;
    a.num_heads = a.num_kv_heads = 16;
    a.page_size = 16;
    a.q_lens = {1, 8, 16, 32, 64, 5};
    a.kv_lens = {257, 257, 130, 200, 257, 1};
    a.causal = false;
    a.num_splits = 0;
    RunPagedAttention<T, D>(a, rng);
    a.causal = true;
    a.num_splits = 4;
    RunPagedAttention<T, D>(a, rng);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = kEmulated;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--full") quick = false;
    if (std::string(argv[i]) == "--quick") quick = true;
    if (std::string(argv[i]) == "--fail-fast") g_fail_fast = true;
  }
  if (!kEmulated) {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      std::printf("SKIP: no CUDA device\n");
      return 77;
    }
  }
  std::mt19937 rng(1234);
  RunAppendKV<half>(64, rng);
  RunAppendKV<__nv_bfloat16>(36, rng);
  RunAppendKV<float>(5, rng);
  RunMergeStates<half>(rng);
  RunMergeStates<__nv_bfloat16>(rng);
  RunMergeStates<float>(rng);
  AttentionSuite<half, 64>(rng, quick);
  AttentionSuite<__nv_bfloat16, 64>(rng, quick);
  AttentionSuite<half, 128>(rng, quick);
  AttentionSuite<__nv_bfloat16, 128>(rng, quick);
  std::printf("%d/%d cases passed%s\n", g_cases - g_failures, g_cases, kEmulated ? " (SIMT emulation on the CPU)" : "");
  return g_failures == 0 ? 0 : 1;
}
