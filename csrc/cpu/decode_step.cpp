// arpg_cpu::decode_step: a whole decoding step of ARPG (self layers, shared K/V, cross layers, head) or of the
// raster baseline (self layers, head) as one op, the CPU's counterpart of the CUDA graph of a step. On a CPU a
// step's host time is mostly Python between ops (about 0.6 ms of a 1.2 ms step at batch 1 on the project's
// 2-core machine): here the same ops run in the same order with the same roundings as arpg/model.py's
// decoding path with the step ops on (`arpg.model.step_ops`), called from C++. arpg/model.py's `cpu_decode_step`
// builds the arguments and decides where it applies.
//
// With several threads the layers (and the head, where guidance does not mix rows of two groups) run in groups of
// sequences, one group per thread, each group's ops on its one thread (a step's ops are tens of rows: two threads
// splitting each op wait for each other between ops, and MKL runs these matmuls at about 90% of a core's peak on
// one thread). 2-core AMD EPYC, cpu-tiny, 64 steps: ARPG steps 1.05-1.15x, raster steps 1.09-1.26x faster than one
// group on two threads; the head in the groups another 1-2% (ARPG) and 3-5% (raster) at batches 4 and 16.
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
#include <utility>
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

// The sequences of a group: [b0, b1), then their unconditional partners [p0, p1) (empty, p0 == p1, but for guided
// steps whose rows pair up: Groups).
struct Group {
  int64_t b0, b1, p0, p1;
};

// Rows [a0, a1) of t, then rows [c0, c1) (a view where the second range is empty).
Tensor TakeRanges(const Tensor& t, int64_t a0, int64_t a1, int64_t c0, int64_t c1) {
  const Tensor first = t.narrow(0, a0, a1 - a0);
  return c0 == c1 ? first : at::cat({first, t.narrow(0, c0, c1 - c0)});
}

// The group's rows of a packed tensor t, whose sequence b owns rows cu[b]:cu[b + 1].
Tensor TakeRows(const Tensor& t, const int32_t* cu, const Group& g) {
  return TakeRanges(t, cu[g.b0], cu[g.b1], cu[g.p0], cu[g.p1]);
}

// The group's rows of a per-sequence tensor t (block table, kv_lens).
Tensor TakeSeqs(const Tensor& t, const Group& g) { return TakeRanges(t, g.b0, g.b1, g.p0, g.p1); }

// The prefix sums of the group's rows: int32 [sequences + 1] from 0.
Tensor GroupCu(const int32_t* cu, const Group& g) {
  Tensor out = at::empty({g.b1 - g.b0 + g.p1 - g.p0 + 1}, at::kInt);
  int32_t* o = out.data_ptr<int32_t>();
  int64_t i = 0;
  o[0] = 0;
  for (const auto& [lo, hi] : {std::pair{g.b0, g.b1}, std::pair{g.p0, g.p1}}) {
    for (int64_t b = lo; b < hi; ++b, ++i) o[i + 1] = o[i] + cu[b + 1] - cu[b];
  }
  return out;
}

// The layers and the final norm of a group of the step's sequences: the normalized rows of their logits, [T_q rows,
// dim] (ARPG: the cross layers' output) or [T_in rows, dim] (raster: the self layers'), the group's rows in its
// order. The whole batch (g = {0, B, B, B}) takes every row as given; a part of it the rows cu_in[b0]:cu_in[b1]
// (and cu_q[b0]:cu_q[b1]), then the partners', which Groups has checked are exactly those sequences' rows.
Tensor Layers(const Step& s, const Group& g) {
  Tensor tokens = s.tokens, rope_in = s.rope_in, rope_q = s.rope_q, slots = s.slots, bt = s.block_table,
         lens = s.kv_lens, cu_in = s.cu_in, cu_q = s.cu_q;
  int64_t rows_q = s.pos_q.size(0);
  if (g.b0 != 0 || g.b1 != s.block_table.size(0)) {
    const int32_t* ci = s.cu_in.data_ptr<int32_t>();
    tokens = TakeRows(tokens, ci, g);
    rope_in = TakeRows(rope_in, ci, g);
    slots = TakeRows(slots, ci, g);
    bt = TakeSeqs(bt, g);
    lens = TakeSeqs(lens, g);
    cu_in = GroupCu(ci, g);
    if (s.arpg) {
      const int32_t* cq = s.cu_q.data_ptr<int32_t>();
      rope_q = TakeRows(rope_q, cq, g);
      cu_q = GroupCu(cq, g);
      rows_q = rope_q.size(0);
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

// Float32 logits of normalized rows h [R, dim]; with guidance (float32 [R / 2, 1]) the guided logits [R / 2, V] of
// the first R / 2 rows (conditional) and the rest (their unconditional partners, in the same order), mixed before
// the head.
Tensor Logits(const Tensor& h, const Tensor& head, const Tensor* guidance) {
  if (guidance == nullptr) return at::linear(h, head).to(at::kFloat);
  const int64_t half = h.size(0) / 2;
  const Tensor hf = h.to(at::kFloat);
  const Tensor c = hf.narrow(0, 0, half), u = hf.narrow(0, half, half);
  // arpg.sampling.guide's expression and order
  return at::linear(at::add(u, at::mul(at::sub(c, u), *guidance)).to(h.scalar_type()), head).to(at::kFloat);
}

// Prefix sums cu [seqs + 1] that are exactly the rows [0, total) in order: from 0, non-decreasing.
bool CoversRows(const Tensor& cu, int64_t seqs, int64_t total) {
  if (cu.scalar_type() != at::kInt || cu.dim() != 1 || cu.numel() != seqs + 1) return false;
  const int32_t* c = cu.data_ptr<int32_t>();
  if (c[0] != 0 || c[seqs] != total) return false;
  for (int64_t b = 0; b < seqs; ++b) {
    if (c[b + 1] < c[b]) return false;
  }
  return true;
}

// Every group reads every weight, from its own core: groups only for weights up to this size, which the caches can
// hold (the project's 2-core EPYC: 1 MiB of L2 per core, 32 MiB of L3; cpu-tiny is 4.1 MiB). A rough measure: the
// embedding counts in full, though a step reads a few of its rows. A larger model's step
// runs as one group, each product split over the threads and each weight read once, as before the groups.
constexpr int64_t kGroupWeightBytes = int64_t{16} << 20;

int64_t WeightBytes(const Step& s) {
  int64_t bytes = 0;
  for (const at::TensorList list : {s.weights, s.cross_weights}) {
    for (const Tensor& w : list) bytes += w.numel() * w.element_size();
  }
  return bytes;
}

// The groups the step runs in, one per thread, about equal in rows. Under guidance whose rows pair up by sequence
// (B even; sequence b + B / 2 is b's unconditional partner, with as many rows of logits) a group takes sequences
// [b0, b1) and their partners, and also mixes the guidance and runs the head (paired = true); else a group is a
// range of sequences. One group, the whole batch, without thread_groups, inside a parallel region, on one thread,
// for one sequence, for weights over kGroupWeightBytes, or when the rows are not exactly the sequences' in order
// (cu_in from 0 to T_in, non-decreasing; cu_q likewise for ARPG): then the step runs as one op sequence over every
// row, as given.
std::vector<Group> Groups(const Step& s, bool thread_groups, bool guided, bool& paired) {
  const int64_t seqs = s.block_table.size(0);
  const int64_t threads = !thread_groups || at::in_parallel_region() ? 1 : at::get_num_threads();
  const std::vector<Group> one{{0, seqs, seqs, seqs}};
  paired = false;
  if (std::min(threads, seqs) <= 1 || WeightBytes(s) > kGroupWeightBytes ||
      !CoversRows(s.cu_in, seqs, s.tokens.size(0)) ||
      (s.arpg && !CoversRows(s.cu_q, seqs, s.pos_q.size(0)))) {
    return one;
  }
  const int32_t* ci = s.cu_in.data_ptr<int32_t>();
  const int32_t* cq = s.arpg ? s.cu_q.data_ptr<int32_t>() : nullptr;
  const int32_t* out = s.arpg ? cq : ci;  // the rows of logits
  const int64_t half = seqs / 2;
  paired = guided && seqs % 2 == 0 && half >= 2;
  for (int64_t b = 0; paired && b < half; ++b) {
    paired = out[b + 1] - out[b] == out[half + b + 1] - out[half + b];
  }
  // Units: single sequences, or pairs (b, b + B / 2); a unit's weight is its rows (at least 1).
  const int64_t units = paired ? half : seqs;
  const int64_t n = std::min(threads, units);
  std::vector<int64_t> weight(units);
  int64_t total = 0;
  for (int64_t u = 0; u < units; ++u) {
    weight[u] = 1 + ci[u + 1] - ci[u] + (cq ? cq[u + 1] - cq[u] : 0);
    if (paired) weight[u] += ci[half + u + 1] - ci[half + u] + (cq ? cq[half + u + 1] - cq[half + u] : 0);
    total += weight[u];
  }
  std::vector<int64_t> bounds{0};
  int64_t acc = 0, u = 0;
  for (int64_t k = 1; k < n; ++k) {
    const int64_t target = total * k / n;
    // At least one unit in this group and in each one after it.
    while (u < units - (n - k) && (u == bounds.back() || 2 * acc + weight[u] <= 2 * target)) acc += weight[u++];
    bounds.push_back(u);
  }
  bounds.push_back(units);
  std::vector<Group> groups;
  for (size_t k = 0; k + 1 < bounds.size(); ++k) {
    const int64_t b0 = bounds[k], b1 = bounds[k + 1];
    groups.push_back(paired ? Group{b0, b1, half + b0, half + b1} : Group{b0, b1, b1, b1});
  }
  return groups;
}

// tokens, pos_in: int64 [T_in]; pos_q: int64 [T_q] (ARPG; unused by the raster model); rope_table: float32
// [P, head_dim / 2, 2]; weights: embedding, final norm, head, then kSelfWeights per self layer; cross_weights
// (ARPG; empty for the raster model): the shared K/V's norm, to_k, to_v, then kCrossWeights per cross layer;
// k_caches, v_caches: [num_pages, page_size, H, head_dim] per cache layer (self layers, then the shared one).
// guidance (optional): float32 [R / 2, 1] for the R rows of logits, the first R / 2 conditional and the rest their
// unconditional partners: the guided logits are made from the rows' normalized hidden states mixed before the
// head, u + (c - u) * scale in float (arpg.model.head_logits; the head is linear without a bias, so this is the
// original's mixing of the logits, rounded otherwise, at half the head's work).
// thread_groups: run the step in groups of sequences, one group per thread (Groups); each sequence's rows then go
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
  const Tensor* g = guidance.has_value() ? &*guidance : nullptr;
  bool paired = false;
  const std::vector<Group> groups = Groups(step, thread_groups, g != nullptr, paired);
  if (groups.size() == 1) return Logits(Layers(step, groups[0]), weights[2], g);
  // One group of sequences per thread, each on one thread: its ops are small (tens of rows), and one thread per op
  // of them runs the matmuls at about 1.5x the FLOP rate of two threads splitting each op, with no wait for the
  // other thread between ops. A sequence's rows are the same wherever it runs (row-wise ops, attention within the
  // sequence), and the groups write disjoint rows of the caches: each sequence its own slots (arpg_kernels'
  // PagedKVCache gives a sequence that would append to a shared page its own copy first; a caller whose
  // slot_mapping sends rows of sequences in two groups to one slot gets either row there, where one group keeps
  // the later one). The groups also run
  // the head, unless guidance mixes rows of two groups: paired groups mix it, their guided rows being the
  // conditional rows cu[b0]:cu[b1], in order.
  const bool head_in_groups = g == nullptr || paired;
  const int32_t* out_cu = (arpg ? step.cu_q : step.cu_in).data_ptr<int32_t>();
  std::vector<Tensor> parts(groups.size());
  const at::ThreadLocalState state;  // grad mode and the dispatch keys above, in the pool's threads too
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t k = begin; k < end; ++k) {
      const Group& gr = groups[k];
      Tensor h = Layers(step, gr);
      if (paired) {
        const Tensor scales = g->narrow(0, out_cu[gr.b0], out_cu[gr.b1] - out_cu[gr.b0]);
        h = Logits(h, weights[2], &scales);
      } else if (head_in_groups) {
        h = Logits(h, weights[2], nullptr);
      }
      parts[k] = std::move(h);
    }
  });
  return head_in_groups ? at::cat(parts) : Logits(at::cat(parts), weights[2], g);
}

// The steps of a generation in one call (arpg.model.cpu_decode_loop calls it a chunk of steps at a time), as the
// engine's Python loop runs them:
// step s gathers its fed tokens buf[in_index[s]], runs DecodeStep, draws one token per row of its logits against
// uniforms[s] (arpg_cpu::sample_tokens, no guidance of its own: guided steps mix it before the head) and writes
// them to buf[out_index[s]], where later steps gather them. The host then returns to Python once per call
// instead of twice per step (0.2-0.6 ms a step on the project's 2-core machine).
// buf: int64 [N], the engine's token buffer; per step s: in_index, pos_in, out_index int64; pos_q int64 (ARPG);
// slot_mapping, kv_lens, cu_in, cu_q as DecodeStep's; max_in[s], max_q[s]; causal[s] (0 or 1); guidance: empty, or
// float32 [R_s / 2, 1] per step; uniforms[s]: float64 [rows of the step's logits]. The rest as DecodeStep's.
void DecodeLoop(const Tensor& buf, at::TensorList in_index, at::TensorList pos_in, at::TensorList pos_q,
                at::TensorList out_index, at::TensorList slot_mapping, const Tensor& block_table,
                at::TensorList kv_lens, at::TensorList cu_in, at::TensorList cu_q, at::IntArrayRef max_in,
                at::IntArrayRef max_q, at::IntArrayRef causal, at::TensorList guidance, at::TensorList uniforms,
                const Tensor& rope_table, at::TensorList weights, at::TensorList cross_weights,
                at::TensorList k_caches, at::TensorList v_caches, int64_t n_head, double eps, int64_t mask_token_id,
                double temperature, int64_t top_k, double top_p, bool thread_groups) {
  static const auto sample =
      Handle<Tensor(const Tensor&, const c10::optional<Tensor>&, const c10::optional<Tensor>&, const Tensor&, double,
                    int64_t, double)>("arpg_cpu::sample_tokens");
  const size_t steps = in_index.size();
  for (const size_t n : {pos_in.size(), pos_q.size(), out_index.size(), slot_mapping.size(), kv_lens.size(),
                         cu_in.size(), cu_q.size(), max_in.size(), max_q.size(), causal.size(), uniforms.size()}) {
    TORCH_CHECK(n == steps, "arpg_cpu::decode_loop: every per-step list must have one entry per step (", steps,
                "), got one of ", n);
  }
  TORCH_CHECK(guidance.empty() || guidance.size() == steps,
              "arpg_cpu::decode_loop: guidance must be empty or one tensor per step, got ", guidance.size());
  TORCH_CHECK(buf.dim() == 1 && buf.scalar_type() == at::kLong,
              "arpg_cpu::decode_loop: buf must be int64 [N], got ", buf.scalar_type(), " ", buf.sizes());
  // What the loop itself reads, checked for every step before the first runs, so that a bad step does not
  // leave the steps before it written (the step's own tensors are DecodeStep's, checked by the caller).
  const bool arpg = !cross_weights.empty();
  const int64_t n = buf.size(0);
  for (size_t s = 0; s < steps; ++s) {
    for (const Tensor* index : {&in_index[s], &out_index[s]}) {
      TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 1,
                  "arpg_cpu::decode_loop: step ", s, "'s in_index and out_index must be int64 [T], got ",
                  index->scalar_type(), " ", index->sizes());
      const Tensor c = index->contiguous();
      const int64_t* p = c.data_ptr<int64_t>();
      for (int64_t i = 0; i < c.numel(); ++i) {
        TORCH_CHECK(p[i] >= 0 && p[i] < n, "arpg_cpu::decode_loop: step ", s, " indexes buf[", p[i],
                    "], outside its ", n, " tokens");
      }
    }
    const int64_t logit_rows = arpg ? pos_q[s].size(0) : in_index[s].size(0);
    const int64_t drawn = guidance.empty() ? logit_rows : logit_rows / 2;
    if (!guidance.empty()) {
      TORCH_CHECK(logit_rows % 2 == 0 && guidance[s].scalar_type() == at::kFloat && guidance[s].dim() == 2 &&
                      guidance[s].size(0) == drawn && guidance[s].size(1) == 1,
                  "arpg_cpu::decode_loop: step ", s, "'s guidance must be float32 [", drawn, ", 1], got ",
                  guidance[s].scalar_type(), " ", guidance[s].sizes());
    }
    TORCH_CHECK(out_index[s].size(0) == drawn, "arpg_cpu::decode_loop: step ", s, " draws ", drawn,
                " tokens (its rows of logits) for ", out_index[s].size(0), " places in buf");
    TORCH_CHECK(uniforms[s].scalar_type() == at::kDouble && uniforms[s].dim() == 1 && uniforms[s].size(0) == drawn,
                "arpg_cpu::decode_loop: step ", s, "'s uniforms must be float64 [", drawn, "], got ",
                uniforms[s].scalar_type(), " ", uniforms[s].sizes());
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only, as DecodeStep
  for (size_t s = 0; s < steps; ++s) {
    const c10::optional<Tensor> g = guidance.empty() ? c10::optional<Tensor>() : c10::optional<Tensor>(guidance[s]);
    const Tensor logits = DecodeStep(at::index_select(buf, 0, in_index[s]), pos_in[s], pos_q[s], rope_table, weights,
                                     cross_weights, k_caches, v_caches, slot_mapping[s], block_table, kv_lens[s],
                                     cu_in[s], cu_q[s], max_in[s], max_q[s], n_head, eps, causal[s] != 0,
                                     mask_token_id, g, thread_groups);
    buf.index_copy_(0, out_index[s],
                    sample.call(logits, c10::nullopt, c10::nullopt, uniforms[s].contiguous(), temperature, top_k, top_p));
  }
}

}  // namespace
}  // namespace arpg

TORCH_LIBRARY_FRAGMENT(arpg_cpu, m) {
  m.def(
      "decode_step(Tensor tokens, Tensor pos_in, Tensor pos_q, Tensor rope_table, Tensor[] weights, "
      "Tensor[] cross_weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, Tensor block_table, "
      "Tensor kv_lens, Tensor cu_in, Tensor cu_q, int max_in, int max_q, int n_head, float eps, bool causal, "
      "int mask_token_id, Tensor? guidance=None, bool thread_groups=True) -> Tensor");
  m.def(
      "decode_loop(Tensor(a!) buf, Tensor[] in_index, Tensor[] pos_in, Tensor[] pos_q, Tensor[] out_index, "
      "Tensor[] slot_mapping, Tensor block_table, Tensor[] kv_lens, Tensor[] cu_in, Tensor[] cu_q, int[] max_in, "
      "int[] max_q, int[] causal, Tensor[] guidance, Tensor[] uniforms, Tensor rope_table, Tensor[] weights, "
      "Tensor[] cross_weights, Tensor(b!)[] k_caches, Tensor(c!)[] v_caches, int n_head, float eps, "
      "int mask_token_id, float temperature, int top_k, float top_p, bool thread_groups=True) -> ()");
}

TORCH_LIBRARY_IMPL(arpg_cpu, CPU, m) {
  m.impl("decode_step", &arpg::DecodeStep);
  m.impl("decode_loop", &arpg::DecodeLoop);
}
