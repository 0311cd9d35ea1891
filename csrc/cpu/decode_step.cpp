// arpg_cpu::decode_step: a whole decoding step of ARPG (self layers, shared K/V, cross layers, head) or of the
// raster baseline (self layers, head) as one op, the CPU's counterpart of the CUDA graph of a step. On a CPU a
// step's host time is mostly Python between ops (about 0.6 ms of a 1.2 ms step at batch 1 on the project's
// 2-core machine): here the same ops run in the same order with the same roundings as arpg/model.py's
// decoding path with the step ops on (`arpg.model.step_ops`), called from C++. arpg/model.py's `cpu_decode_step`
// builds the arguments and decides where it applies.
//
// With several threads the layers run in groups of sequences, one group per thread, each group's ops on its one
// thread (a step's ops are tens of rows: two threads splitting each op wait for each other between ops, and MKL
// runs these matmuls at about 90% of a core's peak on one thread). 2-core AMD EPYC, cpu-tiny, 64 steps: ARPG
// steps 1.05-1.15x, raster steps 1.09-1.26x faster than one group on two threads.
//
// The ops are called through the dispatcher, so torch.profiler still sees each of them (arpg-bench's step
// breakdown) and each one keeps its own checks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace arpg {
namespace {

using at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> Handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor RmsNorm(const Tensor& x, const Tensor& weight, double eps) {
  static const auto op = Handle<Tensor(const Tensor&, const Tensor&, double)>("arpg_cpu::rms_norm");
  return op.call(x, weight, eps);
}

std::tuple<Tensor, Tensor> AddRmsNorm(const Tensor& x, const Tensor& y, const Tensor& weight, double eps) {
  static const auto op =
      Handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>("arpg_cpu::add_rms_norm");
  return op.call(x, y, weight, eps);
}

Tensor SiluMul(const Tensor& a, const Tensor& b) {
  static const auto op = Handle<Tensor(const Tensor&, const Tensor&)>("arpg_cpu::silu_mul");
  return op.call(a, b);
}

Tensor Rope(const Tensor& x, const Tensor& table) {
  static const auto op = Handle<Tensor(const Tensor&, const Tensor&)>("arpg_cpu::rope");
  return op.call(x, table);
}

void AppendKvRope(const Tensor& k, const Tensor& v, const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots,
                  const Tensor& rope) {
  using Sig = void(const Tensor&, const Tensor&, Tensor, Tensor, const Tensor&, const Tensor&);
  static const auto op = Handle<Sig>("arpg_cpu::append_kv_rope");
  op.call(k, v, k_cache, v_cache, slots, rope);
}

Tensor PagedAttention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                      const Tensor& kv_lens, const Tensor& cu_q, int64_t max_q, bool causal, double scale) {
  static const auto op =
      Handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                        const Tensor&, int64_t, bool, double, bool)>("arpg_cpu::paged_attention");
  return std::get<0>(op.call(q, k_cache, v_cache, block_table, kv_lens, cu_q, max_q, causal, scale, false));
}

// fn(x) for a row-wise fn on x [R, dim]; when x is one row broadcast (stride 0: the [MASK] query stream of the
// first cross layer), fn of that row, broadcast (arpg.model._per_row).
template <typename Fn>
Tensor PerRow(Fn&& fn, const Tensor& x) {
  if (x.size(0) > 1 && x.stride(0) == 0) {
    Tensor y = fn(x.narrow(0, 0, 1));
    return y.expand({x.size(0), y.size(1)});
  }
  return fn(x);
}

// The tensors of one step's attention: the metadata of the rows (fed tokens or queries) and the caches.
struct Attend {
  Tensor block_table, kv_lens, cu;
  int64_t max_len;
  bool causal;
};

struct Dims {
  int64_t heads, head_dim;
  double eps, scale;
  Tensor Heads(const Tensor& x) const { return x.view({x.size(0), heads, head_dim}); }
};

// x + FFN(RMSNorm(x + a)): the end of a decoder layer, a = its attention branch.
Tensor FfnBranch(const Tensor& x, const Tensor& a, const Tensor* w, const Dims& d) {
  // w: ffn_norm, w1, w3, w2
  auto [h, hn] = AddRmsNorm(x, a, w[0], d.eps);
  return at::add(h, at::linear(SiluMul(at::linear(hn, w[1]), at::linear(hn, w[2])), w[3]));
}

// SelfDecoder.forward_paged: w = attn_norm, to_q, to_k, to_v, proj, ffn_norm, w1, w3, w2.
Tensor SelfLayer(const Tensor& x, const Tensor* w, const Tensor& rope, const Tensor& k_cache, const Tensor& v_cache,
                 const Tensor& slots, const Attend& at_, const Dims& d) {
  const Tensor xn = RmsNorm(x, w[0], d.eps);
  const Tensor q = Rope(d.Heads(at::linear(xn, w[1])), rope);
  AppendKvRope(d.Heads(at::linear(xn, w[2])), d.Heads(at::linear(xn, w[3])), k_cache, v_cache, slots, rope);
  const Tensor o = PagedAttention(q, k_cache, v_cache, at_.block_table, at_.kv_lens, at_.cu, at_.max_len, at_.causal,
                                  d.scale);
  return FfnBranch(x, at::linear(o.view({o.size(0), d.heads * d.head_dim}), w[4]), w + 5, d);
}

// CrossDecoder.forward_paged: w = attn_norm, to_q, proj, ffn_norm, w1, w3, w2.
Tensor CrossLayer(const Tensor& x, const Tensor* w, const Tensor& rope, const Tensor& k_cache, const Tensor& v_cache,
                  const Attend& at_, const Dims& d) {
  const Tensor xn = PerRow([&](const Tensor& r) { return RmsNorm(r, w[0], d.eps); }, x);
  const Tensor q = Rope(d.Heads(PerRow([&](const Tensor& r) { return at::linear(r, w[1]); }, xn)), rope);
  const Tensor o = PagedAttention(q, k_cache, v_cache, at_.block_table, at_.kv_lens, at_.cu, at_.max_len, false,
                                  d.scale);
  return FfnBranch(x, at::linear(o.view({o.size(0), d.heads * d.head_dim}), w[2]), w + 3, d);
}

constexpr int64_t kSelfWeights = 9, kCrossWeights = 7, kHeadWeights = 3, kSharedWeights = 3;

// A step's inputs, checked (DecodeStep's comment has the shapes).
struct Step {
  const Tensor& tokens;
  const Tensor& pos_q;
  Tensor rope_in, rope_q;
  at::TensorList weights, cross_weights, k_caches, v_caches;
  Tensor slots, block_table, kv_lens, cu_in, cu_q;
  int64_t max_in, max_q;
  bool causal;
  int64_t mask_token_id, n_self, n_cross;
  bool arpg;
  Dims d;
};

// The layers and the final norm of sequences [b0, b1) of the step: the normalized rows of their logits, [T_q rows,
// dim] (ARPG: the cross layers' output) or [T_in rows, dim] (raster: the self layers'). The whole batch (b0 = 0,
// b1 = B) takes every row as given; a part of it the rows cu_in[b0]:cu_in[b1] (and cu_q[b0]:cu_q[b1]), which
// Groups has checked are exactly those sequences' rows.
Tensor Layers(const Step& s, int64_t b0, int64_t b1) {
  Tensor tokens = s.tokens, rope_in = s.rope_in, rope_q = s.rope_q, slots = s.slots, bt = s.block_table,
         lens = s.kv_lens, cu_in = s.cu_in, cu_q = s.cu_q;
  int64_t rows_q = s.pos_q.size(0);
  if (b0 != 0 || b1 != s.block_table.size(0)) {
    const int32_t* ci = s.cu_in.data_ptr<int32_t>();
    const int64_t i0 = ci[b0], i1 = ci[b1];
    tokens = tokens.narrow(0, i0, i1 - i0);
    rope_in = rope_in.narrow(0, i0, i1 - i0);
    slots = slots.narrow(0, i0, i1 - i0);
    bt = bt.narrow(0, b0, b1 - b0);
    lens = lens.narrow(0, b0, b1 - b0);
    cu_in = at::sub(s.cu_in.narrow(0, b0, b1 - b0 + 1), i0);
    if (s.arpg) {
      const int32_t* cq = s.cu_q.data_ptr<int32_t>();
      const int64_t q0 = cq[b0], q1 = cq[b1];
      rope_q = rope_q.narrow(0, q0, q1 - q0);
      cu_q = at::sub(s.cu_q.narrow(0, b0, b1 - b0 + 1), q0);
      rows_q = q1 - q0;
    }
  }
  const Dims& d = s.d;
  const Attend self_attend{bt, lens, cu_in, s.max_in, s.causal};
  const Tensor& embedding = s.weights[0];
  Tensor x = at::embedding(embedding, tokens);
  for (int64_t i = 0; i < s.n_self; ++i) {
    x = SelfLayer(x, &s.weights[kHeadWeights + kSelfWeights * i], rope_in, s.k_caches[i], s.v_caches[i], slots,
                  self_attend, d);
  }
  if (s.arpg) {
    const Tensor xn = RmsNorm(x, s.cross_weights[0], d.eps);
    const Tensor& k_cache = s.k_caches[s.n_self];
    const Tensor& v_cache = s.v_caches[s.n_self];
    AppendKvRope(d.Heads(at::linear(xn, s.cross_weights[1])), d.Heads(at::linear(xn, s.cross_weights[2])), k_cache,
                 v_cache, slots, rope_in);
    const Attend cross_attend{bt, lens, cu_q, s.max_q, false};
    x = embedding.select(0, s.mask_token_id).expand({rows_q, embedding.size(1)});
    for (int64_t i = 0; i < s.n_cross; ++i) {
      x = CrossLayer(x, &s.cross_weights[kSharedWeights + kCrossWeights * i], rope_q, k_cache, v_cache, cross_attend,
                     d);
    }
  }
  return RmsNorm(x, s.weights[1], d.eps);
}

// Sequence bounds [0, b_1, ..., B] of the groups the step runs in, one group per thread, about equal in rows; a
// single group without thread_groups, inside a parallel region, on one thread, for one sequence, or when the rows
// are not exactly the sequences' in order (cu_in from 0 to T_in, non-decreasing; cu_q likewise for ARPG), where
// the step runs as one op sequence over every row, as given.
std::vector<int64_t> Groups(const Step& s, bool thread_groups) {
  const int64_t seqs = s.block_table.size(0);
  const int64_t n = std::min<int64_t>(!thread_groups || at::in_parallel_region() ? 1 : at::get_num_threads(), seqs);
  const std::vector<int64_t> one{0, seqs};
  if (n <= 1) return one;
  const Tensor* cus[] = {&s.cu_in, s.arpg ? &s.cu_q : nullptr};
  const int64_t totals[] = {s.tokens.size(0), s.pos_q.size(0)};
  std::vector<int64_t> weight(seqs, 1);
  for (int k = 0; k < 2; ++k) {
    if (cus[k] == nullptr) continue;
    const Tensor& cu = *cus[k];
    if (cu.scalar_type() != at::kInt || cu.dim() != 1 || cu.numel() != seqs + 1) return one;
    const int32_t* c = cu.data_ptr<int32_t>();
    if (c[0] != 0 || c[seqs] != totals[k]) return one;
    for (int64_t b = 0; b < seqs; ++b) {
      if (c[b + 1] < c[b]) return one;
      weight[b] += c[b + 1] - c[b];
    }
  }
  int64_t total = 0;
  for (int64_t w : weight) total += w;
  std::vector<int64_t> bounds{0};
  int64_t acc = 0, b = 0;
  for (int64_t g = 1; g < n; ++g) {
    const int64_t target = total * g / n;
    // At least one sequence in this group and in each one after it.
    while (b < seqs - (n - g) && (b == bounds.back() || 2 * acc + weight[b] <= 2 * target)) acc += weight[b++];
    bounds.push_back(b);
  }
  bounds.push_back(seqs);
  return bounds;
}

// tokens, pos_in: int64 [T_in]; pos_q: int64 [T_q] (ARPG; unused by the raster model); rope_table: float32
// [P, head_dim / 2, 2]; weights: embedding, final norm, head, then kSelfWeights per self layer; cross_weights
// (ARPG; empty for the raster model): the shared K/V's norm, to_k, to_v, then kCrossWeights per cross layer;
// k_caches, v_caches: [num_pages, page_size, H, head_dim] per cache layer (self layers, then the shared one).
// guidance (optional): float32 [R / 2, 1] for the R rows of logits, the first R / 2 conditional and the rest their
// unconditional partners: the guided logits are made from the rows' normalized hidden states mixed before the
// head, u + (c - u) * scale in float (arpg.model.head_logits; the head is linear without a bias, so this is the
// original's mixing of the logits, rounded otherwise, at half the head's work).
// thread_groups: run the layers in groups of sequences, one group per thread (Groups); each sequence's rows then go
// through matmuls of fewer rows, which MKL rounds differently from the one-group step (float32: about 1e-7 of the
// values apart, as between batch sizes). False: one group, the op-by-op path's logits bit for bit.
// Returns float32 logits [T_q, V] (ARPG) or [T_in, V] (raster), [R / 2, V] with guidance.
Tensor DecodeStep(const Tensor& tokens, const Tensor& pos_in, const Tensor& pos_q, const Tensor& rope_table,
                  at::TensorList weights, at::TensorList cross_weights, at::TensorList k_caches,
                  at::TensorList v_caches, const Tensor& slot_mapping, const Tensor& block_table,
                  const Tensor& kv_lens, const Tensor& cu_in, const Tensor& cu_q, int64_t max_in, int64_t max_q,
                  int64_t n_head, double eps, bool causal, int64_t mask_token_id,
                  const c10::optional<Tensor>& guidance, bool thread_groups) {
  // Inference only (arpg.model.cpu_decode_step calls it outside autograd): the ops below skip the autograd
  // layer, which refuses out= products of tensors that require grad (the weights are parameters).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n_self = (static_cast<int64_t>(weights.size()) - kHeadWeights) / kSelfWeights;
  const bool arpg = !cross_weights.empty();
  const int64_t n_cross = arpg ? (static_cast<int64_t>(cross_weights.size()) - kSharedWeights) / kCrossWeights : 0;
  TORCH_CHECK(n_self >= 0 && static_cast<int64_t>(weights.size()) == kHeadWeights + kSelfWeights * n_self,
              "arpg_cpu::decode_step: weights must be the embedding, the final norm, the head and ", kSelfWeights,
              " per self layer, got ", weights.size(), " tensors");
  TORCH_CHECK(!arpg || static_cast<int64_t>(cross_weights.size()) == kSharedWeights + kCrossWeights * n_cross,
              "arpg_cpu::decode_step: cross_weights must be the shared norm, to_k, to_v and ", kCrossWeights,
              " per cross layer, got ", cross_weights.size(), " tensors");
  const int64_t n_caches = n_self + (arpg ? 1 : 0);
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == n_caches && static_cast<int64_t>(v_caches.size()) == n_caches,
              "arpg_cpu::decode_step: ", n_caches, " cache layers needed, got ", k_caches.size(), " K and ",
              v_caches.size(), " V");
  const Tensor& embedding = weights[0];
  TORCH_CHECK(embedding.dim() == 2 && n_head > 0 && embedding.size(1) % n_head == 0,
              "arpg_cpu::decode_step: the embedding must be [num_embeddings, dim] with dim a multiple of n_head");
  for (const at::TensorList list : {weights, cross_weights}) {
    for (const Tensor& w : list) {
      TORCH_CHECK(w.scalar_type() == embedding.scalar_type(), "arpg_cpu::decode_step: every weight must be in the "
                  "embedding's dtype ", embedding.scalar_type(), ", got ", w.scalar_type());
    }
  }
  // Checked before anything is appended: a bad guidance leaves the cache as it was.
  const int64_t rows = arpg ? pos_q.size(0) : tokens.size(0);
  if (guidance.has_value()) {
    const Tensor& g = *guidance;
    TORCH_CHECK(rows % 2 == 0 && g.scalar_type() == at::kFloat && g.dim() == 2 && g.size(0) == rows / 2 &&
                    g.size(1) == 1,
                "arpg_cpu::decode_step: guidance must be float32 [rows / 2, 1] for an even number of rows of logits (",
                rows, " rows), got ", g.scalar_type(), " ", g.sizes());
  }
  const int64_t head_dim = embedding.size(1) / n_head;
  const Dims d{n_head, head_dim, eps, std::pow(static_cast<double>(head_dim), -0.5)};
  const Tensor table = rope_table.contiguous();
  // Both lookups before any append: a position outside the table then changes nothing.
  const Tensor rope_in = at::index_select(table, 0, pos_in);
  const Tensor rope_q = arpg ? at::index_select(table, 0, pos_q) : Tensor();
  const Step step{tokens,        pos_q,          rope_in,
                  rope_q,        weights,        cross_weights,
                  k_caches,      v_caches,       slot_mapping.contiguous(),
                  block_table.contiguous(),      kv_lens.contiguous(),
                  cu_in.contiguous(),            cu_q.contiguous(),
                  max_in,        max_q,          causal,
                  mask_token_id, n_self,         n_cross,
                  arpg,          d};
  const std::vector<int64_t> bounds = Groups(step, thread_groups);
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  Tensor x;
  if (groups <= 1) {
    x = Layers(step, 0, step.block_table.size(0));
  } else {
    // One group of sequences per thread, each on one thread: its ops are small (tens of rows), and one thread per
    // op of them runs the matmuls at about 1.5x the FLOP rate of two threads splitting each op, with no wait for
    // the other thread between ops. A sequence's rows are the same wherever it runs (row-wise ops, attention
    // within the sequence), and the groups write disjoint rows of the caches (their own sequences' slots).
    std::vector<Tensor> parts(groups);
    const at::ThreadLocalState state;  // grad mode and the dispatch keys above, in the pool's threads too
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t g = begin; g < end; ++g) parts[g] = Layers(step, bounds[g], bounds[g + 1]);
    });
    x = at::cat(parts);
  }
  Tensor h = std::move(x);
  if (guidance.has_value()) {
    const Tensor& g = *guidance;
    const Tensor hf = h.to(at::kFloat);
    const Tensor c = hf.narrow(0, 0, rows / 2), u = hf.narrow(0, rows / 2, rows / 2);
    h = at::add(u, at::mul(at::sub(c, u), g)).to(h.scalar_type());  // arpg.sampling.guide's expression and order
  }
  return at::linear(h, weights[2]).to(at::kFloat);
}

}  // namespace
}  // namespace arpg

TORCH_LIBRARY_FRAGMENT(arpg_cpu, m) {
  m.def(
      "decode_step(Tensor tokens, Tensor pos_in, Tensor pos_q, Tensor rope_table, Tensor[] weights, "
      "Tensor[] cross_weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, Tensor block_table, "
      "Tensor kv_lens, Tensor cu_in, Tensor cu_q, int max_in, int max_q, int n_head, float eps, bool causal, "
      "int mask_token_id, Tensor? guidance=None, bool thread_groups=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(arpg_cpu, CPU, m) { m.impl("decode_step", &arpg::DecodeStep); }
