"""The CUDA C++ backend: the compiled `arpg_kernels._C` (csrc/), reached through `torch.ops.arpg_cuda.*`.

Importing this module never fails. It loads the extension once; without it `is_available()` is
False, and the first call into this backend warns once and raises. The extension registers its own
private ops (`arpg_cuda::paged_attention`, `append_kv`, `merge_attention_states`); their fake
implementations live here, so `torch.compile` and `torch.library.opcheck` can trace them.

The functions below have the signatures of `arpg_kernels.reference`. What the kernels handle
(`supports`): fp16/bf16 paged attention with head_dim 64 or 128 and page sizes 16, 32, 64 on sm_80+;
append_kv and merge_attention_states in fp16, bf16 and fp32. There is no dense `attention` here:
the Triton backend covers it.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _build

__all__ = [
    "PAGED_ATTENTION_DTYPES",
    "PAGED_ATTENTION_HEAD_DIMS",
    "PAGED_ATTENTION_PAGE_SIZES",
    "append_kv",
    "is_available",
    "load_error",
    "merge_attention_states",
    "paged_attention",
    "supports",
]

PAGED_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
PAGED_ATTENTION_HEAD_DIMS = (64, 128)
PAGED_ATTENTION_PAGE_SIZES = (16, 32, 64)
COPY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with bf16, cp.async, ldmatrix

_OPS = ("paged_attention", "append_kv", "merge_attention_states")
_load_error: Optional[str] = None
_warned = False


def _op_registered(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"arpg_cuda::{name}", "CUDA")
    except RuntimeError:
        return False


def _load() -> Optional[str]:
    """Import the extension, or use the ops of a library already loaded with torch.ops.load_library
    (the CMake build; loading a second library that defines arpg_cuda would abort the process).
    Returns why the backend is unusable, or None."""
    if not all(_op_registered(op) for op in _OPS):
        why = _build.load_extension("_C", "CUDA tensors use the Triton kernels")
        if why is not None:
            return why
    if not all(_op_registered(op) for op in _OPS):
        return "arpg_kernels._C is loaded but does not register the arpg_cuda ops (a stale build?)"
    return None


def _paged_attention_fake(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale,
                          return_lse, num_splits=0):
    lse_shape = (q.shape[0], q.shape[1]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _append_kv_fake(k, v, k_cache, v_cache, slot_mapping):
    return None


def _merge_fake(out_a, lse_a, out_b, lse_b):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


def _register_fakes() -> None:
    for name, fn in (
        ("paged_attention", _paged_attention_fake),
        ("append_kv", _append_kv_fake),
        ("merge_attention_states", _merge_fake),
    ):
        try:
            torch.library.register_fake(f"arpg_cuda::{name}", fn)
        except RuntimeError as exc:  # already registered (this module was reloaded)
            if "already" not in str(exc):
                raise


_load_error = _load()
if _load_error is None:
    _register_fakes()


def is_available() -> bool:
    """Whether the compiled extension is loaded and registers the arpg_cuda ops."""
    return _load_error is None


def load_error() -> Optional[str]:
    """Why the extension is unavailable, or None."""
    return _load_error


def _require() -> None:
    global _warned
    if _load_error is None:
        return
    if not _warned:
        _warned = True
        warnings.warn(f"arpg: the cuda backend is unavailable: {_load_error}", RuntimeWarning, stacklevel=3)
    raise RuntimeError(f"arpg: the cuda backend is unavailable: {_load_error}")


def _capable(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= MIN_CAPABILITY


def _aligned(t: Tensor) -> bool:
    """16-byte aligned rows: strides of all but the last dim multiples of 8 elements, and the base address."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    if any(s % 8 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1):
        return False
    try:
        return t.data_ptr() % 16 == 0
    except RuntimeError:  # a fake tensor has no address
        return True


def supports(op: str, *tensors: Tensor) -> bool:
    """Whether the kernels handle these inputs.

    The tensors are those `arpg_kernels.ops.resolve_backend` passes: (q, k_cache, ...) for
    paged_attention, (k, k_cache, ...) for append_kv, (out_a, ...) for merge_attention_states.
    """
    if not is_available() or op not in _OPS or not tensors or not _capable(tensors[0]):
        return False
    if op == "paged_attention":
        q, k_cache = tensors[0], tensors[1]
        return (
            q.dtype in PAGED_ATTENTION_DTYPES
            and k_cache.dtype == q.dtype
            and q.dim() == 3
            and k_cache.dim() == 4
            and q.shape[-1] in PAGED_ATTENTION_HEAD_DIMS
            and k_cache.shape[1] in PAGED_ATTENTION_PAGE_SIZES
            and _aligned(q)
            and _aligned(k_cache)
        )
    if op == "append_kv":
        k_cache = tensors[1]
        return k_cache.dtype in COPY_DTYPES and (k_cache.shape[-1] <= 1 or k_cache.stride(-1) == 1)
    return tensors[0].dtype in COPY_DTYPES


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
    *,
    num_splits: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Paged attention, semantics of `arpg_kernels.reference.paged_attention`.

    q: [T, H, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D]; block_table: int32 [B, max_pages];
    kv_lens: int32 [B]; cu_q_lens: int32 [B + 1]. Returns out [T, H, D] and lse [T, H] float32 (shape
    [0] unless return_lse). num_splits: KV splits per (sequence, KV head, row block); None chooses
    from the shapes and the SM count.
    """
    _require()
    return torch.ops.arpg_cuda.paged_attention(
        q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, int(max_q_len), bool(causal), float(scale),
        bool(return_lse), 0 if num_splits is None else int(num_splits),
    )


def append_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k, v: [T, Hkv, D] into slots slot_mapping: int64 [T] of the caches (-1 skips a row), in place."""
    _require()
    torch.ops.arpg_cuda.append_kv(k, v, k_cache, v_cache, slot_mapping)


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attentions over disjoint key sets. out_*: [T, H, D]; lse_*: [T, H] float32."""
    _require()
    return torch.ops.arpg_cuda.merge_attention_states(out_a, lse_a, out_b, lse_b)
