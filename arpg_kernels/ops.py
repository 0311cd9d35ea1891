"""The `torch.ops.arpg.*` custom ops: schemas (declared once, here), fakes, autograd, backend dispatch.

Each op's real implementation validates its inputs and then calls the selected backend module
(`reference`, `triton` or `cuda`); every backend module exposes the same functions with the
signatures of `arpg_kernels.reference`. The choice happens at call time, so `set_backend` also
applies to ops already traced into a graph. The CUDA extension registers its kernels in the
private `arpg_cuda` namespace and is reached through the `cuda` backend module, so it never
competes with these schemas for the CUDA dispatch key.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import checks
from ._build import warn_once
from . import reference

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

_backend = os.environ.get("ARPG_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"ARPG_BACKEND={_backend!r} is not one of {BACKENDS}")


# Ops whose Triton kernel no GPU run has timed yet: on CUDA tensors `auto` keeps the reference for them
# until `arpg-bench` (kernels: sample_tokens, arpg-triton vs torch-ops) shows the kernel faster there;
# set_backend("triton") selects it.
GPU_UNMEASURED = ("sample_tokens",)


def set_backend(name: str) -> None:
    """Select the backend for every op in this process: 'auto', 'reference', 'triton', 'cuda' or 'cpu'.

    'auto' picks cuda (when the extension is built and handles the inputs), else triton, for CUDA
    tensors, and cpu (the C++ kernels, where built and they have the op) else the reference for CPU
    tensors. The ARPG_BACKEND environment variable sets the start value.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of `set_backend`."""
    prev = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton() -> ModuleType:
    from . import triton as triton_backend

    return triton_backend


def _cuda() -> ModuleType:
    from . import cuda as cuda_backend

    return cuda_backend


def _cpu() -> ModuleType:
    from . import cpu as cpu_backend

    return cpu_backend


def resolve_backend(op: str, *tensors: Tensor) -> ModuleType:
    """The backend module that runs `op` on these inputs under the current setting."""
    device = tensors[0].device
    name = _backend
    if name == "reference":
        return reference
    if name == "triton":
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
        triton_backend = _triton()
        return triton_backend if hasattr(triton_backend, op) else reference
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got {device}")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"the cpu backend needs CPU tensors, got {device}")
    if device.type != "cuda":
        cpu_backend = _cpu()
        if cpu_backend.supports(op, *tensors):
            return cpu_backend
        if name == "cpu" and hasattr(cpu_backend, op):
            warn_once(f"arpg: the cpu backend cannot run {op} ({cpu_backend.load_error() or 'these inputs'}); "
                       "using the reference")
        return reference
    if name == "auto" and op in GPU_UNMEASURED:
        return reference
    cuda_backend = _cuda()
    if cuda_backend.is_available() and hasattr(cuda_backend, op) and cuda_backend.supports(op, *tensors):
        return cuda_backend
    if name == "cuda":
        why = "arpg_kernels._C is not built" if not cuda_backend.is_available() else "these inputs"
        warn_once(f"arpg: the cuda backend has no {op} kernel for {why}; using triton instead")
    triton_backend = _triton()
    if not hasattr(triton_backend, op):  # no GPU kernel for this op yet: the reference is its CUDA path
        return reference
    if triton_backend.supports(op, *tensors):
        return triton_backend
    warn_once(f"arpg: no fast {op} kernel for head_dim {tensors[0].shape[-1]} / these shapes; using the reference")
    return reference


def _scale(scale: Optional[float], head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


# Schemas, declared once. Registration goes through torch.library's low-level API rather than
# `custom_op`, whose eager dispatch imports torch._dynamo on the first call (seconds per process).
_lib = torch.library.Library("arpg", "DEF")
_lib.define(
    "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor kv_lens, "
    "Tensor cu_q_lens, int max_q_len, bool causal=False, float? scale=None, bool return_lse=False) -> (Tensor, Tensor)"
)
_lib.define("append_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()")
_lib.define(
    "append_kv_rope(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor rope) -> ()"
)
_lib.define("attention(Tensor q, Tensor k, Tensor v, bool causal=True, float? scale=None) -> (Tensor, Tensor)")
_lib.define(
    "attention_backward(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "bool causal, float? scale=None) -> (Tensor, Tensor, Tensor)"
)
_lib.define("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)")
_lib.define(
    "sample_tokens(Tensor logits, Tensor? uncond, Tensor? cfg_scale, Tensor uniforms, float temperature=1.0, "
    "int top_k=0, float top_p=1.0) -> Tensor"
)

_DEVICES = ("cpu", "cuda")


def _impl(name: str):
    return torch.library.impl(f"arpg::{name}", _DEVICES, lib=_lib)


def _fake(name: str):
    return torch.library.register_fake(f"arpg::{name}", lib=_lib)


@_impl("paged_attention")
def _paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal=False, scale=None,
                     return_lse=False):
    checks.check_paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale, return_lse)
    impl = resolve_backend("paged_attention", q, k_cache, block_table)
    return impl.paged_attention(
        q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, _scale(scale, q.shape[-1]), return_lse
    )


@_fake("paged_attention")
def _(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal=False, scale=None, return_lse=False):
    checks.check_paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale, return_lse)
    lse_shape = q.shape[:2] if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@_impl("append_kv")
def _append_kv(k, v, k_cache, v_cache, slot_mapping):
    checks.check_append_kv(k, v, k_cache, v_cache, slot_mapping)
    resolve_backend("append_kv", k, k_cache, slot_mapping).append_kv(k, v, k_cache, v_cache, slot_mapping)


@_fake("append_kv")
def _(k, v, k_cache, v_cache, slot_mapping):
    checks.check_append_kv(k, v, k_cache, v_cache, slot_mapping)


@_impl("append_kv_rope")
def _append_kv_rope(k, v, k_cache, v_cache, slot_mapping, rope):
    checks.check_append_kv(k, v, k_cache, v_cache, slot_mapping)
    checks.check_rope_table(k, rope)
    resolve_backend("append_kv_rope", k, k_cache, slot_mapping).append_kv_rope(k, v, k_cache, v_cache, slot_mapping,
                                                                               rope)


@_fake("append_kv_rope")
def _(k, v, k_cache, v_cache, slot_mapping, rope):
    checks.check_append_kv(k, v, k_cache, v_cache, slot_mapping)
    checks.check_rope_table(k, rope)


@_impl("attention")
def _attention(q, k, v, causal=True, scale=None):
    checks.check_attention(q, k, v, causal, scale)
    impl = resolve_backend("attention_forward", q, k, v)
    return impl.attention_forward(q, k, v, causal, _scale(scale, q.shape[-1]))


@_fake("attention")
def _(q, k, v, causal=True, scale=None):
    checks.check_attention(q, k, v, causal, scale)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@_impl("attention_backward")
def _attention_backward(dout, dlse, q, k, v, out, lse, causal, scale=None):
    impl = resolve_backend("attention_backward", q, k, v)
    return impl.attention_backward(
        dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, causal, _scale(scale, q.shape[-1])
    )


@_fake("attention_backward")
def _(dout, dlse, q, k, v, out, lse, causal, scale=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _attention_grad(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = torch.ops.arpg.attention_backward(dout, dlse, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("arpg::attention", _attention_grad, setup_context=_attention_setup_context, lib=_lib)


@_impl("merge_attention_states")
def _merge_attention_states(out_a, lse_a, out_b, lse_b):
    checks.check_merge(out_a, lse_a, out_b, lse_b)
    return resolve_backend("merge_attention_states", out_a).merge_attention_states(out_a, lse_a, out_b, lse_b)


@_fake("merge_attention_states")
def _(out_a, lse_a, out_b, lse_b):
    checks.check_merge(out_a, lse_a, out_b, lse_b)
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


@_impl("sample_tokens")
def _sample_tokens(logits, uncond, cfg_scale, uniforms, temperature=1.0, top_k=0, top_p=1.0):
    checks.check_sample_tokens(logits, uncond, cfg_scale, uniforms, temperature, top_k, top_p)
    impl = resolve_backend("sample_tokens", logits)
    return impl.sample_tokens(logits, uncond, cfg_scale, uniforms, float(temperature), int(top_k), float(top_p))


@_fake("sample_tokens")
def _(logits, uncond, cfg_scale, uniforms, temperature=1.0, top_k=0, top_p=1.0):
    checks.check_sample_tokens(logits, uncond, cfg_scale, uniforms, temperature, top_k, top_p)
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)


# typed public wrappers -----------------------------------------------------------------------


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    kv_lens: Tensor,
    cu_q_lens: Tensor,
    max_q_len: int,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention of packed varlen queries against a paged KV cache.

    Args:
        q: [T, H, D] fp16/bf16/fp32; sequence b owns rows cu_q_lens[b]:cu_q_lens[b+1].
        k_cache, v_cache: [num_pages, page_size, Hkv, D], same dtype as q (a layer `pool[l]` of a pool).
        block_table: int32 [B, max_pages], logical page i of sequence b -> physical page.
        kv_lens: int32 [B], valid keys per sequence (0 allowed).
        cu_q_lens: int32 [B + 1], starts at 0, non-decreasing, ends at T.
        max_q_len: int >= the longest query span (a host value, so no sync is needed).
        causal: bottom-right aligned: query i of b sees keys j < kv_lens[b] - q_len_b + i + 1.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the log-sum-exp.

    Returns:
        out [T, H, D] in q's dtype (0 for a query that sees no key) and lse [T, H] float32
        (-inf for such a query; an empty tensor unless return_lse).
    """
    return torch.ops.arpg.paged_attention(
        q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale, return_lse
    )


def append_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter new rows into the paged cache, in place.

    Args:
        k, v: [T, Hkv, D] in the cache's dtype.
        k_cache, v_cache: [num_pages, page_size, Hkv, D] (mutated).
        slot_mapping: int64 [T], slot = page * page_size + offset; -1 skips the row.
    """
    torch.ops.arpg.append_kv(k, v, k_cache, v_cache, slot_mapping)


def append_kv_rope(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, rope: Tensor) -> None:
    """`append_kv` with RoPE applied to k on the way into the cache, in one op.

    Args:
        k, v: [T, Hkv, D] in the cache's dtype (k not yet rotated; D even).
        k_cache, v_cache, slot_mapping: as `append_kv`.
        rope: float32 [T, D // 2, 2], (cos, sin) of each pair (k[2i], k[2i+1]) of row t, which becomes
            (k0 cos - k1 sin, k1 cos + k0 sin) in float32, then the cache's dtype (the original's RoPE).
    """
    torch.ops.arpg.append_kv_rope(k, v, k_cache, v_cache, slot_mapping, rope)


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None, return_lse: bool = False
):
    """Dense attention for training, differentiable in q, k, v.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D] (H % Hkv == 0), fp16/bf16/fp32.
        causal: bottom-right aligned: query i sees keys j < Lk - Lq + i + 1.
        scale: default D ** -0.5.

    Returns:
        out [B, Lq, H, D] in q's dtype, or (out, lse [B, Lq, H] float32) when return_lse.
    """
    out, lse = torch.ops.arpg.attention(q, k, v, causal, scale)
    return (out, lse) if return_lse else out


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact combination of two attentions over disjoint key sets.

    Args:
        out_a, out_b: [T, H, D]; lse_a, lse_b: [T, H] float32.

    Returns:
        out [T, H, D] in out_a's dtype and lse [T, H] float32 (0 and -inf where both sides are empty).
    """
    return torch.ops.arpg.merge_attention_states(out_a, lse_a, out_b, lse_b)


def sample_tokens(
    logits: Tensor,
    uniforms: Tensor,
    uncond: Optional[Tensor] = None,
    cfg_scale: Optional[Tensor] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """One token per row of logits, in one op: classifier-free guidance, temperature, top-k/top-p, draw.

    Args:
        logits: float32 [T, V], rows contiguous (the conditional rows under guidance).
        uniforms: float64 [T] in [0, 1), one per row (e.g. `torch.rand(T, dtype=torch.float64,
            generator=g)`): the draw is a function of them, so a seeded generator gives the same tokens
            and a CUDA graph can capture the step.
        uncond: float32 [T, V] unconditional rows, with cfg_scale float32 [T]: each row is
            `uncond + (logits - uncond) * cfg_scale` first. Both or neither.
        temperature: <= 0 is greedy (argmax, a NaN counting as largest; uniforms unused).
        top_k: keep the logits >= the k-th largest (0: off). top_p: then keep the smallest set of most
            likely tokens whose probability reaches top_p (1: off).

    Returns:
        int64 [T]: the first token whose cumulative (float64) probability exceeds `uniform * total`, an
        exact categorical draw of the filtered softmax (V - 1 for a row with a NaN). Backends differ from
        the reference only by float rounding of the probabilities (a draw within about 1e-7 of a boundary
        between two tokens may pick the neighbour).
    """
    return torch.ops.arpg.sample_tokens(logits, uncond, cfg_scale, uniforms, temperature, top_k, top_p)
