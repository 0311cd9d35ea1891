"""Input validation for the ops, in one place.

Metadata checks (rank, shape, dtype, device, strides) cost nothing and always run, in the real and
in the fake implementations. Value checks (cu_q_lens monotone, page ids in range, ...) need the
index tensors' contents; they run while `set_checks(True)` (the default), on CUDA only outside
CUDA-graph capture (they read the tensors back, a host sync). On CPU they cost tens of microseconds
a call, which a decoding loop that built its own indices (the engine) turns off. With value checks
off no kernel reads or writes outside its tensors: page ids are clamped, the CPU kernels refuse a
cu_q_lens that leaves the queries and skip slots outside the cache.
"""

from __future__ import annotations

import contextlib
import threading

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_value_checks = True
_thread = threading.local()  # `value_checks` overrides, per thread


def set_checks(enabled: bool) -> None:
    """Turn the value checks on or off (process-wide; on by default)."""
    global _value_checks
    _value_checks = bool(enabled)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the value checks on or off in this thread until the block ends (the engine's decoding loop
    turns them off for its own indices; other threads keep the process-wide setting)."""
    prev = getattr(_thread, "enabled", None)
    _thread.enabled = bool(enabled)
    try:
        yield
    finally:
        _thread.enabled = prev


def value_checks_enabled() -> bool:
    """Whether the value checks run in this thread (`set_checks`, `value_checks`)."""
    return _checks_on()


def _checks_on() -> bool:
    local = getattr(_thread, "enabled", None)
    return _value_checks if local is None else local


def _values_checkable(t: torch.Tensor) -> bool:
    if not _checks_on():  # first: the engine's loop turns the checks off, and this is the cheapest test
        return False
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return not torch.compiler.is_compiling()


def _tensor(name: str, t, rank: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")


def _float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _index(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")


def _same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share a device")


def _last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def _scale(scale) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def _heads(q_heads: int, kv_heads: int, q_name: str, kv_name: str) -> None:
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"the number of heads of {q_name} ({q_heads}) must be a multiple of the KV heads of {kv_name} ({kv_heads})"
        )


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _tensor("k_cache", k_cache, 4)
    _tensor("v_cache", v_cache, 4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same shape")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must have the same dtype")
    _float("k_cache", k_cache)
    _same_device("k_cache", k_cache, v_cache=v_cache)
    _last_dim_contiguous(k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape[1] == 0:
        raise ValueError("k_cache must have page_size >= 1 (dimension 1)")


def _paged_attention_metadata_ok(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale,
                                 return_lse) -> bool:
    """True only if every check of `_check_paged_attention_metadata` passes, tested in one expression: a
    decoding step calls the op a few times a layer, and the named checks cost several microseconds a call.
    False decides nothing: the named checks then run and name the problem."""
    T = torch.Tensor
    if not (isinstance(q, T) and isinstance(k_cache, T) and isinstance(v_cache, T) and isinstance(block_table, T)
            and isinstance(kv_lens, T) and isinstance(cu_q_lens, T)):
        return False
    dev, dt, ks = q.device, q.dtype, k_cache.shape
    return (q.dim() == 3 and len(ks) == 4 and v_cache.shape == ks and block_table.dim() == 2 and kv_lens.dim() == 1
            and cu_q_lens.dim() == 1 and dt in SUPPORTED_DTYPES and k_cache.dtype is dt and v_cache.dtype is dt
            and k_cache.device == dev and v_cache.device == dev and block_table.device == dev
            and kv_lens.device == dev and cu_q_lens.device == dev
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and ks[1] != 0 and ks[3] == q.shape[2] and ks[2] != 0 and q.shape[1] % ks[2] == 0
            and block_table.dtype is torch.int32 and kv_lens.dtype is torch.int32 and cu_q_lens.dtype is torch.int32
            and kv_lens.shape[0] == block_table.shape[0] and cu_q_lens.shape[0] == block_table.shape[0] + 1
            and type(max_q_len) is int and max_q_len >= 0 and type(causal) is bool and type(return_lse) is bool
            and (scale is None or type(scale) is float))


def check_paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale, return_lse):
    if not _paged_attention_metadata_ok(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal,
                                        scale, return_lse):
        _check_paged_attention_metadata(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal,
                                        scale, return_lse)
    if not _values_checkable(cu_q_lens):
        return
    b = block_table.shape[0]
    cu = cu_q_lens.cpu().long()
    if cu[0].item() != 0:
        raise ValueError(f"cu_q_lens must start at 0, got {cu[0].item()}")
    q_lens = cu[1:] - cu[:-1]
    if (q_lens < 0).any():
        bad = int(torch.nonzero(q_lens < 0)[0])
        raise ValueError(f"cu_q_lens must be non-decreasing (cu_q_lens[{bad + 1}] < cu_q_lens[{bad}])")
    if cu[-1].item() != q.shape[0]:
        raise ValueError(f"cu_q_lens[-1] = {cu[-1].item()} must equal the number of query rows {q.shape[0]}")
    if b and q_lens.max().item() > max_q_len:
        raise ValueError(f"max_q_len = {max_q_len} is smaller than the longest query span {q_lens.max().item()}")
    _check_pages(block_table, kv_lens, k_cache.shape[0], k_cache.shape[1])


def _check_paged_attention_metadata(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, causal, scale,
                                    return_lse):
    _tensor("q", q, 3)
    check_cache(k_cache, v_cache)
    _tensor("block_table", block_table, 2)
    _tensor("kv_lens", kv_lens, 1)
    _tensor("cu_q_lens", cu_q_lens, 1)
    _float("q", q)
    if k_cache.dtype != q.dtype:
        raise ValueError(f"k_cache dtype {k_cache.dtype} must match q dtype {q.dtype}")
    _same_device("q", q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, kv_lens=kv_lens, cu_q_lens=cu_q_lens)
    _last_dim_contiguous(q=q)
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} must match q head_dim {q.shape[2]}")
    _heads(q.shape[1], k_cache.shape[2], "q", "k_cache")
    _index("block_table", block_table, torch.int32)
    _index("kv_lens", kv_lens, torch.int32)
    _index("cu_q_lens", cu_q_lens, torch.int32)
    b = block_table.shape[0]
    if kv_lens.shape[0] != b:
        raise ValueError(f"kv_lens has {kv_lens.shape[0]} entries but block_table has {b} rows")
    if cu_q_lens.shape[0] != b + 1:
        raise ValueError(f"cu_q_lens must have B + 1 = {b + 1} entries, got {cu_q_lens.shape[0]}")
    if not isinstance(max_q_len, int) or isinstance(max_q_len, bool) or max_q_len < 0:
        raise ValueError(f"max_q_len must be a non-negative int, got {max_q_len!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    _scale(scale)


def _check_pages(block_table: torch.Tensor, kv_lens: torch.Tensor, num_pages: int, page_size: int) -> None:
    lens = kv_lens.cpu().long()
    if (lens < 0).any():
        raise ValueError(f"kv_lens must be >= 0, got {lens[lens < 0][0].item()}")
    capacity = block_table.shape[1] * page_size
    if lens.numel() and lens.max().item() > capacity:
        b = int(torch.argmax(lens))
        raise ValueError(
            f"block_table too short for kv_lens: sequence {b} has kv_len {lens[b].item()} but block_table has "
            f"{block_table.shape[1]} pages of {page_size} tokens ({capacity})"
        )
    used = (lens + page_size - 1) // page_size  # pages each sequence reads
    table = block_table.cpu().long()
    live = torch.arange(table.shape[1])[None, :] < used[:, None]
    bad = live & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, i = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(
            f"block_table[{b}, {i}] = {table[b, i].item()} is not a page id in [0, {num_pages}) (num_pages of k_cache)"
        )


def _append_kv_metadata_ok(k, v, k_cache, v_cache, slot_mapping) -> bool:
    """True only if every check of `_check_append_kv_metadata` passes (see `_paged_attention_metadata_ok`)."""
    T = torch.Tensor
    if not (isinstance(k, T) and isinstance(v, T) and isinstance(k_cache, T) and isinstance(v_cache, T)
            and isinstance(slot_mapping, T)):
        return False
    dev, dt, ks, shape = k.device, k.dtype, k_cache.shape, k.shape
    return (len(shape) == 3 and len(ks) == 4 and v.shape == shape and v_cache.shape == ks and slot_mapping.dim() == 1
            and dt in SUPPORTED_DTYPES and v.dtype is dt and k_cache.dtype is dt and v_cache.dtype is dt
            and v.device == dev and k_cache.device == dev and v_cache.device == dev and slot_mapping.device == dev
            and k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and ks[1] != 0 and shape[1] == ks[2] and shape[2] == ks[3]
            and slot_mapping.dtype is torch.int64 and slot_mapping.shape[0] == shape[0])


def check_append_kv(k, v, k_cache, v_cache, slot_mapping):
    if not _append_kv_metadata_ok(k, v, k_cache, v_cache, slot_mapping):
        _check_append_kv_metadata(k, v, k_cache, v_cache, slot_mapping)
    if not _values_checkable(slot_mapping) or slot_mapping.numel() == 0:
        return
    slots = slot_mapping.cpu()
    n_slots = k_cache.shape[0] * k_cache.shape[1]
    bad = (slots < -1) | (slots >= n_slots)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"slot_mapping[{i}] = {slots[i].item()} is out of range [-1, {n_slots}) (num_pages * page_size)")


def _check_append_kv_metadata(k, v, k_cache, v_cache, slot_mapping):
    _tensor("k", k, 3)
    _tensor("v", v, 3)
    check_cache(k_cache, v_cache)
    _tensor("slot_mapping", slot_mapping, 1)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    _float("k", k)
    _float("v", v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match the cache dtype {k_cache.dtype}")
    _same_device("k", k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _last_dim_contiguous(k=k, v=v)
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"k rows {tuple(k.shape[1:])} must match the cache's [Hkv, D] = {tuple(k_cache.shape[2:])}")
    _index("slot_mapping", slot_mapping, torch.int64)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but k has {k.shape[0]} rows")


def check_attention(q, k, v, causal, scale):
    _tensor("q", q, 4)
    _tensor("k", k, 4)
    _tensor("v", v, 4)
    _float("q", q)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _same_device("q", q, k=k, v=v)
    _last_dim_contiguous(q=q, k=k, v=v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head_dim {k.shape[3]} must match q head_dim {q.shape[3]}")
    _heads(q.shape[2], k.shape[2], "q", "k")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _scale(scale)


def check_merge(out_a, lse_a, out_b, lse_b):
    for name, t, rank in (("out_a", out_a, 3), ("lse_a", lse_a, 2), ("out_b", out_b, 3), ("lse_b", lse_b, 2)):
        _tensor(name, t, rank)
    _float("out_a", out_a)
    if out_b.shape != out_a.shape or out_b.dtype != out_a.dtype:
        raise ValueError(
            f"out_b {tuple(out_b.shape)} {out_b.dtype} must match out_a {tuple(out_a.shape)} {out_a.dtype}"
        )
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        _index(name, t, torch.float32)
        if tuple(t.shape) != tuple(out_a.shape[:2]):
            raise ValueError(f"{name} must have shape [T, H] = {tuple(out_a.shape[:2])}, got {tuple(t.shape)}")
    _same_device("out_a", out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    _last_dim_contiguous(out_a=out_a, out_b=out_b)


def check_sample_tokens(logits, uncond, cfg_scale, uniforms, temperature, top_k, top_p):
    _tensor("logits", logits, 2)
    if logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have a vocabulary of at least one token (dimension 1)")
    if (uncond is None) != (cfg_scale is None):
        raise ValueError("uncond and cfg_scale go together: pass both for guidance, or neither")
    _tensor("uniforms", uniforms, 1)
    _index("uniforms", uniforms, torch.float64)
    t = logits.shape[0]
    if uniforms.shape[0] != t:
        raise ValueError(f"uniforms has {uniforms.shape[0]} entries but logits has {t} rows")
    others = {"uniforms": uniforms}
    if uncond is not None:
        _tensor("uncond", uncond, 2)
        _tensor("cfg_scale", cfg_scale, 1)
        if uncond.shape != logits.shape or uncond.dtype != logits.dtype:
            raise ValueError(f"uncond {tuple(uncond.shape)} {uncond.dtype} must match logits {tuple(logits.shape)} "
                             f"{logits.dtype}")
        _index("cfg_scale", cfg_scale, torch.float32)
        if cfg_scale.shape[0] != t:
            raise ValueError(f"cfg_scale has {cfg_scale.shape[0]} entries but logits has {t} rows")
        others.update(uncond=uncond, cfg_scale=cfg_scale)
    _same_device("logits", logits, **others)
    _last_dim_contiguous(logits=logits, **({} if uncond is None else {"uncond": uncond}))
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature != temperature:
        raise ValueError(f"temperature must be a number (<= 0: greedy), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p!r}")


def check_rope_table(k: torch.Tensor, table) -> None:
    """k: [T, Hkv, D] (checked before); table: float32 [T, D // 2, 2] on k's device."""
    if (isinstance(table, torch.Tensor) and table.dtype is torch.float32 and table.dim() == 3 and k.shape[-1] % 2 == 0
            and table.shape[0] == k.shape[0] and 2 * table.shape[1] == k.shape[-1] and table.shape[2] == 2
            and table.device == k.device):
        return
    _tensor("rope", table, 3)
    if table.dtype != torch.float32:
        raise ValueError(f"rope must be float32 (cos, sin pairs), got {table.dtype}")
    d = k.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    want = (k.shape[0], d // 2, 2)
    if tuple(table.shape) != want:
        raise ValueError(f"rope must have shape [T, D // 2, 2] = {want}, got {tuple(table.shape)}")
    _same_device("k", k, rope=table)
