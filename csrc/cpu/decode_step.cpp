// arpg_cpu::decode_step: a whole decoding step of ARPG (self layers, shared K/V, cross layers, head) or of the
// raster baseline (self layers, head) as one op, the CPU's counterpart of the CUDA graph of a step. On a CPU a
// step's host time is mostly Python between ops (about 0.6 ms of a 1.2 ms step at batch 1 on the project's
// 2-core machine): here the same ops run in the same order with the same roundings as arpg/model.py's
// decoding path with the step ops on (`arpg.model.step_ops`), called from C++. arpg/model.py's `cpu_decode_step`
// builds the arguments and decides where it applies.
//
// The ops are called through the dispatcher, so torch.profiler still sees each of them (arpg-bench's step
// breakdown) and each one keeps its own checks.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

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

// tokens, pos_in: int64 [T_in]; pos_q: int64 [T_q] (ARPG; unused by the raster model); rope_table: float32
// [P, head_dim / 2, 2]; weights: embedding, final norm, head, then kSelfWeights per self layer; cross_weights
// (ARPG; empty for the raster model): the shared K/V's norm, to_k, to_v, then kCrossWeights per cross layer;
// k_caches, v_caches: [num_pages, page_size, H, head_dim] per cache layer (self layers, then the shared one).
// guidance (optional): float32 [R / 2, 1] for the R rows of logits, the first R / 2 conditional and the rest their
// unconditional partners: the guided logits are made from the rows' normalized hidden states mixed before the
// head, u + (c - u) * scale in float (arpg.model.head_logits; the head is linear without a bias, so this is the
// original's mixing of the logits, rounded otherwise, at half the head's work).
// Returns float32 logits [T_q, V] (ARPG) or [T_in, V] (raster), [R / 2, V] with guidance.
Tensor DecodeStep(const Tensor& tokens, const Tensor& pos_in, const Tensor& pos_q, const Tensor& rope_table,
                  at::TensorList weights, at::TensorList cross_weights, at::TensorList k_caches,
                  at::TensorList v_caches, const Tensor& slot_mapping, const Tensor& block_table,
                  const Tensor& kv_lens, const Tensor& cu_in, const Tensor& cu_q, int64_t max_in, int64_t max_q,
                  int64_t n_head, double eps, bool causal, int64_t mask_token_id,
                  const c10::optional<Tensor>& guidance) {
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
  const Tensor bt = block_table.contiguous(), lens = kv_lens.contiguous(), slots = slot_mapping.contiguous();
  const Attend self_attend{bt, lens, cu_in.contiguous(), max_in, causal};

  Tensor x = at::embedding(embedding, tokens);
  for (int64_t i = 0; i < n_self; ++i) {
    x = SelfLayer(x, &weights[kHeadWeights + kSelfWeights * i], rope_in, k_caches[i], v_caches[i], slots,
                  self_attend, d);
  }
  if (arpg) {
    const Tensor xn = RmsNorm(x, cross_weights[0], eps);
    const Tensor& k_cache = k_caches[n_self];
    const Tensor& v_cache = v_caches[n_self];
    AppendKvRope(d.Heads(at::linear(xn, cross_weights[1])), d.Heads(at::linear(xn, cross_weights[2])), k_cache,
                 v_cache, slots, rope_in);
    const Attend cross_attend{bt, lens, cu_q.contiguous(), max_q, false};
    x = embedding.select(0, mask_token_id).expand({pos_q.size(0), embedding.size(1)});
    for (int64_t i = 0; i < n_cross; ++i) {
      x = CrossLayer(x, &cross_weights[kSharedWeights + kCrossWeights * i], rope_q, k_cache, v_cache, cross_attend, d);
    }
  }
  Tensor h = RmsNorm(x, weights[1], eps);
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
      "int mask_token_id, Tensor? guidance=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(arpg_cpu, CPU, m) { m.impl("decode_step", &arpg::DecodeStep); }
