"""The CPU C++ backend: `arpg_kernels._cpu` (csrc/cpu/), reached through `torch.ops.arpg_cpu.*`.

Importing this module never fails: without the compiled library `is_available()` is False and `auto`
keeps the reference on CPU tensors. What the kernels handle (`supports`): paged attention on CPU
tensors in float32, float16 and bfloat16 (float accumulation), any head_dim and page size, GQA,
causal, varlen queries, kv_len 0; append_kv (only the written rows are touched);
merge_attention_states in the same dtypes. Dense attention (`attention_forward`, `attention_backward`) goes
to torch's flash-attention CPU kernels where their semantics are ours: float32 and bfloat16, non-causal or
causal with as many queries as keys (torch's causal mask is top-left, ours bottom-right), GQA by expanding
K/V; the backward takes the reference when the LSE itself carries a gradient. torch's bfloat16 kernel
returns an LSE within about 1e-4 of the exact one (float32: as exact as the reference).

The functions below have the signatures of `arpg_kernels.reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _build

__all__ = [
    "LOOP_OP", "PAGED_ATTENTION_DTYPES", "STEP_OPS", "WHOLE_STEP_OP", "add_rms_norm", "append_kv", "append_kv_rope",
    "attention_backward", "attention_forward", "decode_loop", "decode_loop_available", "decode_step",
    "decode_step_available", "is_available", "load_error",
    "merge_attention_states", "paged_attention", "rms_norm", "rope", "sample_tokens", "silu_mul",
    "step_ops_available", "supports",
]

PAGED_ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_OPS = ("paged_attention", "append_kv", "append_kv_rope", "merge_attention_states", "sample_tokens")  # the C++ ops of arpg_cpu
_DENSE_OPS = ("attention_forward", "attention_backward")  # torch's flash-attention CPU kernels
# A decoding step's elementwise chains in one op each (csrc/cpu/step_ops.cpp): not backend ops of
# torch.ops.arpg, helpers that arpg.model's decoding path calls on CPU tensors (`step_ops_available`).
STEP_OPS = ("rms_norm", "add_rms_norm", "silu_mul", "rope")
# A whole decoding step as one op (csrc/cpu/decode_step.cpp), built from the ops above: `arpg.model.cpu_decode_step`.
WHOLE_STEP_OP = "decode_step"
# The steps of a whole generation in one call (csrc/cpu/decode_step.cpp; `arpg.model.cpu_decode_loop`).
LOOP_OP = "decode_loop"


def _registered(ops=_OPS) -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"arpg_cpu::{op}", "CPU") for op in ops)
    except RuntimeError:
        return False


def _load() -> Optional[str]:
    """Import the library (checking first that it was built for this torch). Returns why the backend is
    unusable, or None; a library that is there but unusable is also said once as a warning."""
    if not _registered():
        why = _build.load_extension("_cpu", "CPU tensors use the reference ops")
        if why is not None:
            return why
    if not _registered():
        return "arpg_kernels._cpu is loaded but does not register the arpg_cpu ops (a stale build?)"
    return None


def _paged_attention_fake(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale,
                          return_lse):
    lse_shape = (q.shape[0], q.shape[1]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


_load_error = _load()
# A library built before the step ops lacks them: the backend still serves its ops, decoding runs the
# chains as torch ops.
_step_ops = _load_error is None and _registered(STEP_OPS)
_whole_step = _step_ops and _registered((WHOLE_STEP_OP,))
# A library built before the whole-step op took `guidance` serves steps without it.
_step_args = {arg.name for arg in torch.ops.arpg_cpu.decode_step.default._schema.arguments} if _whole_step else set()
_guided_step = "guidance" in _step_args
# A library built before `thread_groups` runs every step as one group.
_grouped_step = "thread_groups" in _step_args
_loop = _grouped_step and _registered((LOOP_OP,))


def _decode_step_fake(tokens, pos_in, pos_q, rope_table, weights, cross_weights, *args, guidance=None,
                      thread_groups=True):
    rows = pos_q.shape[0] if cross_weights else tokens.shape[0]
    if guidance is not None or (len(args) > 13 and args[13] is not None):
        rows //= 2
    return weights[0].new_empty((rows, weights[2].shape[0]), dtype=torch.float32)

if _load_error is None:
    for _name, _fake in (
        ("paged_attention", _paged_attention_fake),
        ("append_kv", lambda *args: None),
        ("append_kv_rope", lambda *args: None),
        ("merge_attention_states", lambda out_a, lse_a, out_b, lse_b: (out_a.new_empty(out_a.shape),
                                                                       lse_a.new_empty(lse_a.shape))),
        ("sample_tokens", lambda logits, *args: logits.new_empty(logits.shape[:1], dtype=torch.int64)),
        *((
            ("rms_norm", lambda x, weight, eps: x.new_empty(x.shape)),
            ("add_rms_norm", lambda x, y, weight, eps: (x.new_empty(x.shape), x.new_empty(x.shape))),
            ("silu_mul", lambda a, b: a.new_empty(a.shape)),
            ("rope", lambda x, rope: x.new_empty(x.shape)),
        ) if _step_ops else ()),
        *(((WHOLE_STEP_OP, _decode_step_fake),) if _whole_step else ()),
        *(((LOOP_OP, lambda *args, **kwargs: None),) if _loop else ()),
    ):
        try:
            torch.library.register_fake(f"arpg_cpu::{_name}", _fake)
        except RuntimeError as exc:  # already registered (this module was reloaded)
            if "already" not in str(exc):
                raise


def is_available() -> bool:
    """Whether the compiled library is loaded and registers the arpg_cpu ops."""
    return _load_error is None


def step_ops_available() -> bool:
    """Whether the library has the decoding step's fused elementwise ops (rms_norm, add_rms_norm, silu_mul,
    rope)."""
    return _step_ops


def decode_step_available(guidance: bool = False) -> bool:
    """Whether the library has the whole-step op (`decode_step`), with its `guidance` argument if asked."""
    return _guided_step if guidance else _whole_step


def decode_loop_available() -> bool:
    """Whether the library has the whole-generation op (`decode_loop`)."""
    return _loop


def load_error() -> Optional[str]:
    """Why the backend is unavailable, or None."""
    return _load_error


def supports(op: str, *tensors: Tensor) -> bool:
    """Whether the kernels handle these inputs: (q, k_cache, ...) for paged_attention, (k, k_cache, ...) for
    append_kv, (out_a, ...) for merge_attention_states (what `arpg_kernels.ops.resolve_backend` passes)."""
    if op in _DENSE_OPS:
        return _dense_supported(*tensors[:3])
    if not is_available() or op not in _OPS or not tensors:
        return False
    if op == "sample_tokens":
        return tensors[0].device.type == "cpu"
    if op == "merge_attention_states":
        x = tensors[0]
        return x.device.type == "cpu" and x.dtype in PAGED_ATTENTION_DTYPES and x.dim() == 3 and x.stride(-1) == 1
    if len(tensors) < 2:
        return False
    x, k_cache = tensors[0], tensors[1]
    return (x.device.type == "cpu" and x.dtype in PAGED_ATTENTION_DTYPES and k_cache.dtype == x.dtype
            and x.dim() == 3 and k_cache.dim() == 4 and k_cache.stride(-1) == 1)


def _dense_supported(q: Tensor, k: Tensor, v: Tensor, causal: Optional[bool] = None) -> bool:
    """Inputs torch's CPU flash attention computes with our semantics (causal=None: either way)."""
    # float16: torch rounds its scores to 16 bits (LSE errors ~100x the reference's); the reference serves it.
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or q.dim() != 4 or k.dim() != 4:
        return False
    lq, lk = q.shape[1], k.shape[1]
    if lq == 0 or lk == 0 or q.shape[0] == 0:  # torch gives NaN rows for no keys; ours are 0 and -inf
        return False
    return causal is not True or lq == lk


def _expand_kv(k: Tensor, v: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """[B, L, Hkv, D] -> [B, Hkv * group, L, D] views for SDPA (query head h reads KV head h // group)."""
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    return k.transpose(1, 2), v.transpose(1, 2)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Dense attention, semantics of `arpg_kernels.reference.attention_forward`. q: [B, Lq, H, D];
    k, v: [B, Lk, Hkv, D]. Returns out [B, Lq, H, D] (q.dtype) and lse [B, Lq, H] float32."""
    from . import reference

    if not _dense_supported(q, k, v, causal):
        return reference.attention_forward(q, k, v, causal, scale)
    kd, vd = _expand_kv(k, v, q.shape[2] // k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), kd, vd, 0.0, bool(causal), scale=float(scale)
    )
    return out.transpose(1, 2).contiguous(), lse.float().transpose(1, 2).contiguous()


def attention_backward(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `attention_forward`, semantics of `arpg_kernels.reference.attention_backward`.
    dout: [B, Lq, H, D]; dlse: [B, Lq, H] float32. Returns dq, dk, dv shaped and typed as q, k, v."""
    from . import reference

    # torch's kernel differentiates the output only; a gradient through the LSE takes the reference.
    if not _dense_supported(q, k, v, causal) or bool(dlse.ne(0).any()):
        return reference.attention_backward(dout, dlse, q, k, v, out, lse, causal, scale)
    b, lk, hkv, d = k.shape
    group = q.shape[2] // hkv
    kd, vd = _expand_kv(k, v, group)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), kd, vd, out.transpose(1, 2), lse.transpose(1, 2), 0.0,
        bool(causal), scale=float(scale),
    )
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)  # [B, Lk, H, D]
    if group > 1:  # sum each group's gradients in float, as the reference does
        dk = dk.float().reshape(b, lk, hkv, group, d).sum(3)
        dv = dv.float().reshape(b, lk, hkv, group, d).sum(3)
    return dq.transpose(1, 2).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    kv_lens: Tensor,
    cu_q_lens: Tensor,
    max_q_len: int,
    causal: bool,
    scale: float,
    return_lse: bool,
) -> tuple[Tensor, Tensor]:
    """Paged attention, semantics of `arpg_kernels.reference.paged_attention`.

    q: [T, H, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D]; block_table: int32 [B, max_pages];
    kv_lens: int32 [B]; cu_q_lens: int32 [B + 1]. Returns out [T, H, D] (q.dtype) and lse [T, H]
    float32 (shape [0] unless return_lse).
    """
    if _load_error is not None:
        raise RuntimeError(f"arpg: the cpu backend is unavailable: {_load_error}")
    return torch.ops.arpg_cpu.paged_attention(
        q, k_cache, v_cache, block_table.contiguous(), kv_lens.contiguous(), cu_q_lens.contiguous(),
        int(max_q_len), bool(causal), float(scale), bool(return_lse),
    )


def append_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k, v: [T, Hkv, D] into slots slot_mapping: int64 [T] of the caches (-1 skips a row), in place."""
    if _load_error is not None:
        raise RuntimeError(f"arpg: the cpu backend is unavailable: {_load_error}")
    torch.ops.arpg_cpu.append_kv(k, v, k_cache, v_cache, slot_mapping.contiguous())


def append_kv_rope(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                   rope: Tensor) -> None:
    """`append_kv` of k rotated by rope (float32 [T, D // 2, 2], (cos, sin)) and v, in place."""
    if _load_error is not None:
        raise RuntimeError(f"arpg: the cpu backend is unavailable: {_load_error}")
    torch.ops.arpg_cpu.append_kv_rope(k, v, k_cache, v_cache, slot_mapping.contiguous(), rope.contiguous())


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attentions over disjoint key sets, semantics of `arpg_kernels.reference.merge_attention_states`.
    out_*: [T, H, D]; lse_*: [T, H] float32. Returns out [T, H, D] (out_a.dtype), lse [T, H] float32."""
    if _load_error is not None:
        raise RuntimeError(f"arpg: the cpu backend is unavailable: {_load_error}")
    return torch.ops.arpg_cpu.merge_attention_states(out_a, lse_a, out_b, lse_b)


def sample_tokens(logits: Tensor, uncond: Optional[Tensor], cfg_scale: Optional[Tensor], uniforms: Tensor,
                  temperature: float, top_k: int, top_p: float) -> Tensor:
    """One token per row, semantics of `arpg_kernels.reference.sample_tokens` (sort-free top-k/top-p).
    logits, uncond: float32 [T, V]; cfg_scale: float32 [T]; uniforms: float64 [T]. Returns int64 [T]."""
    if _load_error is not None:
        raise RuntimeError(f"arpg: the cpu backend is unavailable: {_load_error}")
    return torch.ops.arpg_cpu.sample_tokens(
        logits, uncond, None if cfg_scale is None else cfg_scale.contiguous(), uniforms.contiguous(),
        float(temperature), int(top_k), float(top_p),
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of the rows of x [R, dim] (rows of any stride, last dim contiguous) with weight [dim] in x's
    dtype: `(x * rsqrt(mean(x^2) + eps)).type_as(x) * weight` in one op (arpg.model.RMSNorm's roundings).
    Returns [R, dim] contiguous."""
    return torch.ops.arpg_cpu.rms_norm(x, weight, float(eps))


def add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h = x + y and RMSNorm(h) in one op (a residual add and the norm after it); x, y [R, dim]. Returns
    (h, norm) [R, dim] contiguous, in x's dtype."""
    return torch.ops.arpg_cpu.add_rms_norm(x, y, weight, float(eps))


def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b (SwiGLU's activation, silu rounded to the dtype first as torch does); a, b [R, hidden]."""
    return torch.ops.arpg_cpu.silu_mul(a, b)


def rope(x: Tensor, table: Tensor) -> Tensor:
    """x [T, H, D] rotated pairwise by table float32 [T, D / 2, 2] (cos, sin), `arpg.model.apply_rope`'s
    float32 products and sums in one op. Rows and heads of x may have any stride. Returns [T, H, D]
    contiguous in x's dtype."""
    return torch.ops.arpg_cpu.rope(x, table.contiguous())


def decode_step(tokens: Tensor, pos_in: Tensor, pos_q: Tensor, rope_table: Tensor, weights, cross_weights, k_caches,
                v_caches, batch, n_head: int, eps: float, causal: bool, mask_token_id: int,
                guidance: Optional[Tensor] = None, thread_groups: bool = True) -> Tensor:
    """A whole decoding step of ARPG or the raster model as one op (`arpg.model.cpu_decode_step` builds the
    arguments). tokens, pos_in: int64 [T_in]; pos_q: int64 [T_q]; rope_table: float32 [P, D / 2, 2];
    weights: embedding, final norm, head, then 9 per self layer; cross_weights: the shared K/V's norm, to_k,
    to_v, then 7 per cross layer (empty: the raster model); k_caches, v_caches: one per cache layer; batch:
    an `arpg.model.PagedBatch`; guidance: float32 [R / 2, 1] or None (`arpg.model.head_logits`);
    thread_groups: run the layers in groups of sequences, one per thread (csrc/cpu/decode_step.cpp; rounded
    as matmuls of fewer rows round), else as one group (a library built before the argument always does).
    Returns float32 logits [R, V] for the R = T_q rows (raster: T_in), [R / 2, V] guided with guidance."""
    if guidance is not None and not _guided_step:
        raise RuntimeError("arpg: this build of arpg_kernels._cpu has no guidance argument in decode_step (rebuild)")
    args = (
        tokens, pos_in, pos_q, rope_table, list(weights), list(cross_weights), list(k_caches), list(v_caches),
        batch.slot_mapping, batch.block_table, batch.kv_lens, batch.cu_in, batch.cu_q, int(batch.max_in),
        int(batch.max_q), int(n_head), float(eps), bool(causal), int(mask_token_id),
    )
    if _grouped_step:
        return torch.ops.arpg_cpu.decode_step(*args, guidance, bool(thread_groups))
    # The call that a library built before `thread_groups` (and, without guidance, before `guidance`) takes.
    return torch.ops.arpg_cpu.decode_step(*args) if guidance is None else torch.ops.arpg_cpu.decode_step(*args, guidance)


def decode_loop(buf: Tensor, steps, uniforms, rope_table: Tensor, weights, cross_weights, k_caches, v_caches,
                n_head: int, eps: float, mask_token_id: int, temperature: float, top_k: int, top_p: float,
                thread_groups: bool = True) -> None:
    """The steps of a whole generation in one op (`arpg.model.cpu_decode_loop` builds the arguments): for each
    step, `decode_step` on the tokens buf[in_index], then one token per row of its logits drawn as
    `sample_tokens` draws (no guidance of its own) against that step's uniforms, written to buf[out_index].

    buf: int64 [N], updated in place; steps: per step (in_index, pos_in, pos_q, out_index, batch, causal,
    guidance or None), the tensors as `decode_step` takes them (guidance on every step or on none);
    uniforms: per step float64 [rows of its logits]. The rest as `decode_step` and `sample_tokens`."""
    if not steps:
        return
    in_index, pos_in, pos_q, out_index, batches, causal, guidance = zip(*steps)
    if any(g is None for g in guidance) != all(g is None for g in guidance):
        raise ValueError("decode_loop: guidance on every step or on none")
    if any(b.block_table is not batches[0].block_table for b in batches):
        raise ValueError("decode_loop: every step must use the same block_table tensor")
    torch.ops.arpg_cpu.decode_loop(
        buf, list(in_index), list(pos_in), list(pos_q), list(out_index), [b.slot_mapping for b in batches],
        batches[0].block_table, [b.kv_lens for b in batches], [b.cu_in for b in batches], [b.cu_q for b in batches],
        [int(b.max_in) for b in batches], [int(b.max_q) for b in batches], [int(bool(c)) for c in causal],
        [] if guidance[0] is None else list(guidance), list(uniforms), rope_table, list(weights), list(cross_weights),
        list(k_caches), list(v_caches), int(n_head), float(eps), int(mask_token_id), float(temperature), int(top_k),
        float(top_p), bool(thread_groups),
    )
