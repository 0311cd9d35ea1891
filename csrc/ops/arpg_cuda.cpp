// Schemas of the arpg_cuda ops: the private CUDA backend behind the public torch.ops.arpg.* ops, which
// arpg_kernels/ops.py declares and routes here (or to Triton). CUDA implementations live in
// csrc/cuda/*.cu; the fake (meta) implementations in arpg_kernels/cuda.py.
#include <torch/library.h>

TORCH_LIBRARY(arpg_cuda, m) {
  m.set_python_module("arpg_kernels.cuda");
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor kv_lens, "
      "Tensor cu_q_lens, int max_q_len, bool causal, float scale, bool return_lse, int num_splits=0) "
      "-> (Tensor out, Tensor lse)");
  m.def("append_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
      "-> (Tensor out, Tensor lse)");
}
