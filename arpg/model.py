"""The ARPG transformer: weight-compatible with the published checkpoints (DESIGN.md section 1).

Training runs dense causal attention through `ak.attention`; decoding runs the same layers on packed
token rows against a paged KV cache through `ak.append_kv` and `ak.paged_attention` (`decode_step`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import arpg_kernels as ak

from .config import ARPGConfig, get_config

__all__ = [
    "ARPG",
    "PagedBatch",
    "RMSNorm",
    "FeedForward",
    "SelfAttention",
    "CrossAttention",
    "SelfDecoder",
    "CrossDecoder",
    "TwoPassDecoder",
    "precompute_rope_2d",
    "apply_rope",
]


def precompute_rope_2d(grid_size, head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """2D RoPE table [H * W + 1, head_dim // 2, 2] (cos, sin), float32.

    grid_size: g for a g x g grid, or (H, W). Row 0 is the class token and is all zeros (its rotated q
    and k are zero vectors). Row p >= 1 is cell (row, col) = divmod(p - 1, W): the first head_dim // 4
    pairs rotate by row * f_k, the next head_dim // 4 by col * f_k, with f_k = base ** (-2k / (head_dim / 2))
    (LlamaGen's layout).
    """
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=device).float() / half))
    row_angles = torch.outer(torch.arange(rows, device=device), freqs)  # [H, head_dim // 4]
    col_angles = torch.outer(torch.arange(cols, device=device), freqs)  # [W, head_dim // 4]
    grid = torch.cat(
        [row_angles[:, None, :].expand(-1, cols, -1), col_angles[None, :, :].expand(rows, -1, -1)], dim=-1
    )  # [H, W, head_dim // 2]: row angles, then column angles
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(1, half, 2, device=device), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) in float32; returns x's dtype.

    x: [..., T, H, D]; rope: [..., T, D // 2, 2] (broadcast over heads).
    """
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return ak.reference.rope(x, rope)  # the original's real ops (also what append_kv_rope computes)
    xs = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2)  # not -1: x may have no rows
    r = rope.unsqueeze(-3).float()
    # Decoding on the CPU: one complex multiply, (x0 + i x1)(cos + i sin), is the same four products and two
    # sums (torch's CPU complex multiply does not fuse them) in three ops instead of ten: a CPU step's host
    # time is mostly op count. Training and compiled graphs keep real ops (autograd, inductor).
    out = torch.view_as_real(torch.view_as_complex(_complex_view(xs)) * torch.view_as_complex(_complex_view(r)))
    return out.flatten(-2).type_as(x)


def _complex_view(t: torch.Tensor) -> torch.Tensor:
    """t [..., 2] float32, made viewable as complex (pairs contiguous, even strides and offset)."""
    ok = t.stride(-1) == 1 and t.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in t.stride()[:-1])
    return t if ok else t.contiguous()


# Devices where the decoding step appends K through `ak.append_kv_rope` (RoPE inside the append) rather than
# RoPE then `ak.append_kv`: where arpg-bench measured it no slower (the CPU: fewer ops a step; the
# generation part's arpg-engine-unfused provider). CUDA joins when a GPU run has measured it there.
FUSED_ROPE_APPEND = {"cpu"}
# Devices where the engine guides before the head (`head_logits` with guidance): where arpg-bench measured it
# faster (the CPU: the generation part's arpg-engine-logit-guidance provider). CUDA joins when a GPU run has
# measured it there, and with its CUDA graphs taking the guidance as a static input.
GUIDED_HEAD = {"cpu"}
_fusions = threading.local()
_whole = threading.local()
_guided_switch = threading.local()
_groups_switch = threading.local()
_loop_switch = threading.local()


@contextlib.contextmanager
def _thread_switch(switch: threading.local, enabled: bool):
    """Set a per-thread on/off switch (on by default) until the block ends."""
    prev = getattr(switch, "enabled", True)
    switch.enabled = bool(enabled)
    try:
        yield
    finally:
        switch.enabled = prev


def step_fusions(enabled: bool):
    """Turn the decoding step's fused ops (RoPE inside the append, the one-op sampler) on or off in this
    thread until the block ends: off runs the same step as separate torch ops (benchmarks, debugging)."""
    return _thread_switch(_fusions, enabled)


def fusions_enabled() -> bool:
    return getattr(_fusions, "enabled", True)


_cpu_step_ops = None  # arpg_kernels.cpu once its library is known to have the step ops, else False


def step_ops(x: torch.Tensor, weight: torch.Tensor):
    """The CPU's one-op elementwise chains for a decoding step (`arpg_kernels.cpu`: rms_norm, add_rms_norm,
    silu_mul, rope), or None where they do not apply: they serve CPU tensors in the weights' dtype, with the
    step fusions on (`step_fusions`), under the auto or cpu backend, outside autograd and compilation
    (inductor fuses on its own). A CPU step's host time is mostly its number of ops: RMSNorm alone is eight."""
    global _cpu_step_ops
    if (x.device.type != "cpu" or x.dtype not in ak.checks.SUPPORTED_DTYPES or x.dtype is not weight.dtype
            or not fusions_enabled() or ak.get_backend() not in ("auto", "cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.compiler.is_compiling()):
        return None
    if _cpu_step_ops is None:
        from arpg_kernels import cpu

        _cpu_step_ops = cpu if cpu.step_ops_available() else False
    return _cpu_step_ops or None


def whole_step(enabled: bool):
    """Turn the CPU's whole-step op (`arpg_cpu::decode_step`, see `cpu_decode_step`) on or off in this thread
    until the block ends: off runs the step op by op from Python (benchmarks, debugging), the same ops."""
    return _thread_switch(_whole, enabled)


def step_groups(enabled: bool):
    """Turn the CPU's whole-step op's thread groups (`arpg_cpu::decode_step`'s `thread_groups`: the layers and
    the head of a group of sequences per thread, each group on its one thread; for models of up to 16 MiB of
    weights, which every group reads) on or off in this thread until the block ends. Off, a step runs as one
    group with every op on all threads, and its logits are the op-by-op path's bit for bit; on (the default),
    rounded as matmuls of fewer rows round (float32: about 1e-7 of the values apart)."""
    return _thread_switch(_groups_switch, enabled)


def step_loop(enabled: bool):
    """Turn the CPU's whole-generation op (`arpg_cpu::decode_loop`, see `cpu_decode_loop`: every step of a
    generation and its sampling in one call) on or off in this thread until the block ends: off, the engine
    calls the whole-step op once a step from Python and samples there (benchmarks, debugging); the same ops
    in the same order, the same tokens."""
    return _thread_switch(_loop_switch, enabled)


def guided_head(enabled: bool):
    """Turn guidance before the head (`head_logits`, on the devices of `GUIDED_HEAD`) on or off in this thread
    until the block ends: off, the engine guides the logits of both rows, the original's order (benchmarks,
    debugging)."""
    return _thread_switch(_guided_switch, enabled)


def guided_head_enabled() -> bool:
    return getattr(_guided_switch, "enabled", True)


def _self_modules(layer: "SelfDecoder") -> tuple[nn.Module, ...]:
    a, f = layer.attn, layer.ffn
    return (layer.attn_norm, a.to_q, a.to_k, a.to_v, a.proj, layer.ffn_norm, f.w1, f.w3, f.w2)


def _cross_modules(layer: "CrossDecoder") -> tuple[nn.Module, ...]:
    a, f = layer.attn, layer.ffn
    return (layer.attn_norm, a.to_q, a.proj, layer.ffn_norm, f.w1, f.w3, f.w2)


# Every parameter or module registration anywhere bumps this count: `_step_weights` then rebuilds its lists.
_registrations = [0]


def _count_registration(*args) -> None:
    _registrations[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)
_STEP_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _build_step_weights(model, layers, two_pass) -> tuple:
    count = _registrations[0]  # before reading: a registration meanwhile makes the next step rebuild
    mods = [model.embeddings, model.norm, model.head]
    for layer in layers[0]:
        mods += _self_modules(layer)
    n_self = len(mods)
    if two_pass is not None:
        mods += (two_pass.norm, two_pass.to_k, two_pass.to_v)
        for layer in layers[1]:
            mods += _cross_modules(layer)
    weights = [m.weight for m in mods]
    return count, layers, mods, weights, n_self, [m for m in mods if isinstance(m, RMSNorm)]


def _step_weights(model, self_layers, two_pass) -> Optional[tuple[list, list, list]]:
    """The weight lists of `arpg_cpu::decode_step` and the model's norms, or None where the op would skip
    something the modules do (a bias, forward hooks, a module of another type, a max_norm embedding).

    Kept per model (reading some fifty attributes cost a step about 70 us) and rebuilt when any parameter or
    module is registered, when the layers are not the same objects, or when a module holds another weight:
    the lists hold the parameters themselves, so in-place updates and `.to()` show through them."""
    layers = (tuple(self_layers), () if two_pass is None else tuple(two_pass.cross_dec))
    hit = _STEP_WEIGHTS.get(model)
    for attempt in range(2):
        if hit is None or hit[0] != _registrations[0] or hit[1] != layers or attempt:
            hit = _STEP_WEIGHTS[model] = _build_step_weights(model, layers, two_pass)
        _, _, mods, weights, n_self, norms = hit
        if all(m._parameters.get("weight") is w for m, w in zip(mods, weights)):
            break
    else:
        return None  # a weight that is not a parameter of its module (a parametrization, a plain tensor)
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    for m in mods:
        t = type(m)
        if t is RMSNorm:
            continue
        if ((t is not nn.Linear and t is not nn.Embedding) or m._forward_hooks or m._forward_pre_hooks
                or m._parameters.get("bias") is not None or (t is nn.Embedding and m.max_norm is not None)):
            return None
    return weights[:n_self], weights[n_self:], norms


def _whole_step_args(model, self_layers, two_pass, cache, guided: bool):
    """(ops, weights, cross weights, K caches, V caches) of `arpg_cpu::decode_step` for this model and cache, or
    None where the op does not apply (`cpu_decode_step`)."""
    emb = model.embeddings.weight
    ops = step_ops(emb, emb)
    if (ops is None or not getattr(_whole, "enabled", True) or not ops.decode_step_available(guided)
            or "cpu" not in FUSED_ROPE_APPEND):  # step_ops is None with the fusions off
        return None
    found = _step_weights(model, self_layers, two_pass)
    if found is None:
        return None
    weights, cross, norms = found
    eps, dtype, every = model.norm.eps, emb.dtype, (*weights, *cross)
    if (any(n.eps != eps for n in norms) or any(w.dtype is not dtype for w in every)
            or (torch.is_grad_enabled() and any(w.requires_grad for w in every))):
        return None
    n_caches = len(self_layers) + (two_pass is not None)
    k_caches, v_caches = zip(*(cache.layer(i) for i in range(n_caches)))
    return ops, weights, cross, list(k_caches), list(v_caches)


def _check_whole_step(model, k_caches, v_caches, n_in: int, n_q: int, batch: "PagedBatch", causal: bool,
                      arpg: bool) -> None:
    """The checks the ops' wrappers run, once per kind of call, on stand-ins of a step's q and k."""
    c = model.config
    emb = model.embeddings.weight
    rows_in = emb.new_empty((n_in, c.n_head, c.head_dim))
    ak.checks.check_append_kv(rows_in, rows_in, k_caches[0], v_caches[0], batch.slot_mapping)
    ak.checks.check_paged_attention(rows_in, k_caches[0], v_caches[0], batch.block_table, batch.kv_lens, batch.cu_in,
                                    batch.max_in, causal, None, False)
    if arpg:
        rows_q = emb.new_empty((n_q, c.n_head, c.head_dim))
        ak.checks.check_paged_attention(rows_q, k_caches[-1], v_caches[-1], batch.block_table, batch.kv_lens,
                                        batch.cu_q, batch.max_q, False, None, False)


def cpu_decode_step(model, self_layers, tokens, pos_in, pos_q, table, cache, batch: PagedBatch, causal: bool,
                    two_pass: Optional["TwoPassDecoder"] = None,
                    guidance: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """A whole decoding step as one op, `arpg_cpu::decode_step` (csrc/cpu/decode_step.cpp): the ops of the
    step-op path (`step_ops`, RoPE inside the append) in the same order, called from C++. On a CPU a step's
    host time is mostly Python between its ops. With several threads the op runs the layers and the head in
    groups of sequences, one per thread, rounded as matmuls of fewer rows round; as one group (with
    `step_groups(False)`, one thread, one sequence, or over 16 MiB of weights) it gives the logits of the step
    op by op bit for bit. Returns None where it
    does not apply (then the caller runs the step op by op): outside `step_ops`' conditions (autograd
    included: any weight that requires grad while grad is on), with `whole_step(False)`, without RoPE inside
    the append (`FUSED_ROPE_APPEND`), with a library built before the op, with weights of mixed dtypes or
    norms of different eps, or with modules that do more than the plain layers (`_step_weights`).

    model: ARPG or RasterLM (embeddings, norm, head); self_layers: its SelfDecoders; two_pass: ARPG's
    TwoPassDecoder (shared K/V and cross layers; None: the raster model, whose logits are those of the fed
    tokens); table: the RoPE table that pos_in and pos_q index; guidance: as `head_logits` (checked by the
    caller), which the op follows.
    """
    found = _whole_step_args(model, self_layers, two_pass, cache, guidance is not None)
    if found is None:
        return None
    ops, weights, cross, k_caches, v_caches = found
    _check_whole_step(model, k_caches, v_caches, tokens.shape[0], pos_q.shape[0], batch, causal, two_pass is not None)
    c = model.config
    return ops.decode_step(tokens, pos_in, pos_q, table, weights, cross, k_caches, v_caches, batch, c.n_head,
                           model.norm.eps, causal, c.mask_token_id, guidance, getattr(_groups_switch, "enabled", True))


# Seconds under which `cpu_decode_loop` doubles its chunk of steps per op call.
LOOP_CHUNK_S = 0.1


@dataclass
class LoopStep:
    """One step of `cpu_decode_loop` (tensors as `decode_step` takes them; raster: pos_q = pos_in).

    in_index: int64 [T_in], where the fed tokens sit in the token buffer; out_index: int64 [the sampled
    rows], where the step's drawn tokens go; guidance: float32 [T_q / 2, 1] or None (on every step or none).
    """

    in_index: torch.Tensor
    pos_in: torch.Tensor
    pos_q: torch.Tensor
    out_index: torch.Tensor
    batch: PagedBatch
    causal: bool
    guidance: Optional[torch.Tensor] = None


def cpu_decode_loop(model, self_layers, two_pass: Optional["TwoPassDecoder"], table, cache, buf: torch.Tensor,
                    steps: list[LoopStep], draw, temperature: float, top_k: int, top_p: float) -> bool:
    """Every step of a generation and its sampling in one op, `arpg_cpu::decode_loop`: for each step, the
    whole-step op on buf[in_index], one token per row of its logits drawn as `arpg.sampling.sample` draws
    them, written to buf[out_index]. The same ops in the same order as the engine's loop of `decode_step`
    and `sample` calls, without the host's return to Python twice a step.

    Returns False, having drawn and changed nothing, where it does not apply: where `cpu_decode_step` would
    not, with `step_loop(False)`, with the sampler's fusions off, under torch.profiler (whose step and
    sampling regions the engine's loop marks), or with a library built before the op. Else checks every
    step as `cpu_decode_step` does, its indices' and positions' shapes and ranges (out_index: one place per
    row of logits), its metadata's row counts (cu_in, cu_q) and block table (one for all steps); then calls
    `draw()` for the steps' uniforms (a list of float64 [rows of step s's logits]; it is called only here, so
    an unused generator is left as it was), checks them, and runs the steps in chunks of 1, 2, 4, ... steps
    per op call while a chunk takes under `LOOP_CHUNK_S` (so that Python, and Ctrl-C, get the host back
    between chunks). A step that fails these checks, or bad uniforms, raise before
    anything runs, leaving buf and the cache as they were; metadata wrong in other ways (kv_lens, the slots,
    the block table's pages) fails where it fails in the step loop.
    """
    if not steps or not getattr(_loop_switch, "enabled", True) or torch.autograd._profiler_enabled():
        return False
    guided = steps[0].guidance is not None
    if any((st.guidance is not None) != guided for st in steps):
        raise ValueError("cpu_decode_loop: guidance on every step or on none")
    found = _whole_step_args(model, self_layers, two_pass, cache, guided)
    if found is None or not found[0].decode_loop_available():
        return False
    ops, weights, cross, k_caches, v_caches = found
    arpg = two_pass is not None
    seen = set()
    drawn_rows = []  # per step: rows of logits, one token drawn for each
    for s, st in enumerate(steps):
        rows = st.pos_q.shape[0] if arpg else st.in_index.shape[0]
        check_guidance(st.guidance, rows, buf.device)
        drawn_rows.append(rows // 2 if guided else rows)
        b = st.batch
        n_in, n_q = st.in_index.shape[0], st.pos_q.shape[0]
        for name, index, n in (("in_index", st.in_index, None), ("out_index", st.out_index, drawn_rows[-1]),
                               ("pos_in", st.pos_in, n_in), ("pos_q", st.pos_q, None)):
            if index.dtype != torch.int64 or index.dim() != 1 or (n is not None and index.shape[0] != n):
                want = "int64 [T]" if n is None else f"int64 [{n}]"
                raise ValueError(f"cpu_decode_loop: step {s}'s {name} must be {want}, got {index.dtype} "
                                 f"{tuple(index.shape)}")
        if b.block_table is not steps[0].batch.block_table:
            raise ValueError(f"cpu_decode_loop: step {s} has another block_table tensor than step 0 (the op takes one)")
        # The rows the metadata counts (a value each, read on the host; with the value checks off the ops' own
        # checks do not read them), so that a step cannot fail in the op after the steps before it ran.
        counts = [(b.cu_in, n_in, "cu_in", "fed tokens")] + ([(b.cu_q, n_q, "cu_q", "queries")] if arpg else [])
        for cu, n, name, what in counts:
            if cu.numel() == 0 or int(cu[-1]) != n:
                raise ValueError(f"cpu_decode_loop: step {s}'s {name} must end at its {n} {what}, got {cu.tolist()}")
        # Shapes alone (the engine turns value checks off): once per kind of step.
        key = (st.in_index.shape[0], st.pos_q.shape[0], int(b.max_in), int(b.max_q), bool(st.causal),
               *((t.shape, t.dtype, t.stride()) for t in (b.slot_mapping, b.kv_lens, b.cu_in, b.cu_q, b.block_table)))
        if key not in seen or ak.checks.value_checks_enabled():
            seen.add(key)
            _check_whole_step(model, k_caches, v_caches, st.in_index.shape[0], st.pos_q.shape[0], b, st.causal, arpg)
    stand_in = torch.empty((drawn_rows[0], model.config.vocab_size))
    ak.checks.check_sample_tokens(stand_in, None, None, torch.empty(drawn_rows[0], dtype=torch.float64),
                                  float(temperature), int(top_k or 0), float(top_p))
    # The op checks its steps' indices too, but a chunk at a time (below): all of them first, here, and the
    # positions against the RoPE table.
    for what, tensors, size in (("index buf", [t for st in steps for t in (st.in_index, st.out_index)], buf.shape[0]),
                                ("have RoPE positions", [t for st in steps for t in (st.pos_in, st.pos_q)],
                                 table.shape[0])):
        values = torch.cat(tensors)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= size):
            raise ValueError(f"cpu_decode_loop: the steps {what} [{int(values.min())}..{int(values.max())}], outside "
                             f"its {size} rows")
    uniforms = list(draw())
    if len(uniforms) != len(steps) or any(
            not isinstance(u, torch.Tensor) or u.dtype != torch.float64 or tuple(u.shape) != (n,) or u.device != buf.device
            for u, n in zip(uniforms, drawn_rows)):
        got = [f"{u.dtype} {tuple(u.shape)}" if isinstance(u, torch.Tensor) else type(u).__name__ for u in uniforms]
        raise ValueError(f"cpu_decode_loop: draw() must give one float64 tensor per step on {buf.device}, of the "
                         f"step's rows of logits {drawn_rows}, got {got}")
    c = model.config
    groups = getattr(_groups_switch, "enabled", True)
    # In chunks of steps, doubling while a chunk takes under LOOP_CHUNK_S: Python (Ctrl-C, other threads) gets
    # the host back that often even for a model whose generation takes minutes, at a few calls per generation.
    done, chunk = 0, 1
    while done < len(steps):
        part = slice(done, done + chunk)
        t0 = time.perf_counter()
        ops.decode_loop(buf, [(st.in_index, st.pos_in, st.pos_q, st.out_index, st.batch, st.causal, st.guidance)
                              for st in steps[part]], uniforms[part], table, weights, cross, k_caches, v_caches,
                        c.n_head, model.norm.eps, c.mask_token_id, temperature, int(top_k or 0), top_p, groups)
        done += len(steps[part])
        if time.perf_counter() - t0 < LOOP_CHUNK_S:
            chunk *= 2
    return True


def check_guidance(guidance: Optional[torch.Tensor], rows: int, device: torch.device) -> None:
    """Refuse a guidance that `head_logits` could not use for `rows` rows of logits on `device`, before
    anything runs (a step appends to the cache before it reaches the head)."""
    if guidance is None:
        return
    if (rows % 2 or not isinstance(guidance, torch.Tensor) or guidance.dtype != torch.float32
            or tuple(guidance.shape) != (rows // 2, 1) or guidance.device != device):
        got = (f"{guidance.dtype} {tuple(guidance.shape)} on {guidance.device}" if isinstance(guidance, torch.Tensor)
               else type(guidance))
        raise ValueError(f"guidance must be float32 [rows / 2, 1] on {device} for an even number of rows of logits "
                         f"({rows} rows: conditional, then their unconditional partners), got {got}")


def head_logits(head: nn.Linear, h: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 logits [R, V] of the normalized rows h [R, dim].

    With guidance (float32 [R / 2, 1], `check_guidance`) the first R / 2 rows are conditional and the rest their
    unconditional partners, and the result is the guided logits [R / 2, V]: the rows mixed in float before the
    head, `head(u + (c - u) * scale)` (`arpg.sampling.guide`'s expression), cast back to h's dtype. The head is
    linear and the guidance an affine mix (weights 1 - scale and scale), so these are the original's guided
    logits `u' + (c' - u') * scale`, rounded
    otherwise (float32: about 1e-6 of the logits' size apart), at half the head's work and with no second row of
    logits for the sampler to read.
    """
    if guidance is not None:
        from .sampling import guide  # sampling imports this module

        c, u = h.float().chunk(2)
        h = guide(c, u, guidance).to(h.dtype)
    return head(h).float()


def _per_row(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a row-wise fn on x [R, dim]; when x is one row broadcast (stride 0: the [MASK] query
    stream of the first cross layer), fn of that row, broadcast."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        y = fn(x[:1])
        return y.expand(x.shape[0], *y.shape[1:])
    return fn(x)


def _norm(norm: "RMSNorm", x: torch.Tensor, ops) -> torch.Tensor:
    return norm(x) if ops is None else ops.rms_norm(x, norm.weight, norm.eps)


def append_rotated(k, v, k_cache, v_cache, slot_mapping, rope) -> None:
    """Append rope(k) and v ([T, Hkv, D]) at slot_mapping: one op where FUSED_ROPE_APPEND says so."""
    if k.device.type in FUSED_ROPE_APPEND and fusions_enabled():
        ak.append_kv_rope(k, v, k_cache, v_cache, slot_mapping, rope)
    else:
        ak.append_kv(apply_rope(k, rope), v, k_cache, v_cache, slot_mapping)


@dataclass
class PagedBatch:
    """Attention metadata of one decoding step for R sequences (rows of the batch).

    Every cache layer of a sequence uses the same pages, so one slot mapping and one block table serve
    all of them. Content tokens (fed through the self layers) are packed by `cu_in`, position queries
    (cross layers, or the raster model's outputs) by `cu_q`.
    """

    slot_mapping: torch.Tensor  # int64 [T_in]
    block_table: torch.Tensor  # int32 [R, max_pages]
    kv_lens: torch.Tensor  # int32 [R], after this step's tokens are appended
    cu_in: torch.Tensor  # int32 [R + 1]
    cu_q: torch.Tensor  # int32 [R + 1]
    max_in: int
    max_q: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward_step(self, x: torch.Tensor, ops) -> torch.Tensor:
        """`forward` for decoding, with silu * w3 as one op where `step_ops` gives them."""
        return self.forward(x) if ops is None else self.w2(ops.silu_mul(self.w1(x), self.w3(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random fraction p of the samples (dim 0), scale the
    rest by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class SelfAttention(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.resid_dropout = config.resid_dropout
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def _qkv(self, x: torch.Tensor, rope: torch.Tensor):
        shape = (*x.shape[:-1], self.n_head, self.head_dim)
        q = apply_rope(self.to_q(x).view(shape), rope)
        k = apply_rope(self.to_k(x).view(shape), rope)
        return q, k, self.to_v(x).view(shape)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Causal attention. x: [B, L, dim]; rope: [B, L, head_dim // 2, 2]."""
        q, k, v = self._qkv(x, rope)
        o = ak.attention(q, k, v, causal=True)
        return F.dropout(self.proj(o.flatten(-2)), self.resid_dropout, self.training)

    def forward_paged(
        self, x: torch.Tensor, rope: torch.Tensor, k_cache, v_cache, batch: PagedBatch, causal: bool = False, ops=None
    ) -> torch.Tensor:
        """Append the rows' K/V, then attend the whole cache. x: [T_in, dim]; rope: [T_in, head_dim // 2, 2];
        ops: `step_ops` (RoPE on q as one op)."""
        shape = (*x.shape[:-1], self.n_head, self.head_dim)
        q = self.to_q(x).view(shape)
        q = apply_rope(q, rope) if ops is None else ops.rope(q, rope)
        append_rotated(self.to_k(x).view(shape), self.to_v(x).view(shape), k_cache, v_cache, batch.slot_mapping, rope)
        o, _ = ak.paged_attention(
            q, k_cache, v_cache, batch.block_table, batch.kv_lens, batch.cu_in, batch.max_in, causal=causal
        )
        return self.proj(o.flatten(-2))


class CrossAttention(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.resid_dropout = config.resid_dropout
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def _q(self, x: torch.Tensor, rope: torch.Tensor, ops=None) -> torch.Tensor:
        """q of x [..., T, dim], RoPE'd. ops (`step_ops`, decoding): RoPE as one op, and the rows of a
        broadcast x (the first layer's [MASK] stream) projected once."""
        if ops is None:
            return apply_rope(self.to_q(x).view(*x.shape[:-1], self.n_head, self.head_dim), rope)
        return ops.rope(_per_row(self.to_q, x).view(*x.shape[:-1], self.n_head, self.head_dim), rope)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Query j sees keys 0..j. x: [B, L, dim]; k, v: [B, L, H, D]; rope: [B, L, head_dim // 2, 2]."""
        o = ak.attention(self._q(x, rope), k, v, causal=True)
        return F.dropout(self.proj(o.flatten(-2)), self.resid_dropout, self.training)

    def forward_paged(self, x: torch.Tensor, rope: torch.Tensor, k_cache, v_cache, batch: PagedBatch, ops=None):
        """Every query sees the whole shared cache. x: [T_q, dim]; rope: [T_q, head_dim // 2, 2]; ops:
        `step_ops` (RoPE on q as one op)."""
        o, _ = ak.paged_attention(
            self._q(x, rope, ops), k_cache, v_cache, batch.block_table, batch.kv_lens, batch.cu_q, batch.max_q
        )
        return self.proj(o.flatten(-2))


class _Regularised(nn.Module):
    """The training-time regularisation of a decoder layer: FFN dropout, and drop path on both branches."""

    def _init_regularisation(self, config: ARPGConfig, drop_path_rate: float) -> None:
        self.ffn_dropout = config.ffn_dropout
        self.drop_path = drop_path_rate

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        return drop_path(y, self.drop_path, self.training)

    def _ffn_branch(self, h: torch.Tensor) -> torch.Tensor:
        return self._branch(F.dropout(self.ffn(self.ffn_norm(h)), self.ffn_dropout, self.training))


class SelfDecoder(_Regularised):
    def __init__(self, config: ARPGConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ffn = FeedForward(config)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self._init_regularisation(config, drop_path_rate)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x + self._branch(self.attn(self.attn_norm(x), rope))
        return h + self._ffn_branch(h)

    def forward_paged(self, x, rope, k_cache, v_cache, batch: PagedBatch, causal: bool = False):
        ops = step_ops(x, self.attn_norm.weight)
        if ops is None:
            h = x + self.attn.forward_paged(self.attn_norm(x), rope, k_cache, v_cache, batch, causal)
            return h + self.ffn(self.ffn_norm(h))
        a = self.attn.forward_paged(_norm(self.attn_norm, x, ops), rope, k_cache, v_cache, batch, causal, ops)
        h, hn = ops.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)
        return h + self.ffn.forward_step(hn, ops)


class CrossDecoder(_Regularised):
    def __init__(self, config: ARPGConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.attn = CrossAttention(config)
        self.ffn = FeedForward(config)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self._init_regularisation(config, drop_path_rate)

    def forward(self, x, k, v, rope):
        h = x + self._branch(self.attn(self.attn_norm(x), k, v, rope))
        return h + self._ffn_branch(h)

    def forward_paged(self, x, rope, k_cache, v_cache, batch: PagedBatch):
        ops = step_ops(x, self.attn_norm.weight)
        if ops is None:
            h = x + self.attn.forward_paged(self.attn_norm(x), rope, k_cache, v_cache, batch)
            return h + self.ffn(self.ffn_norm(h))
        xn = _per_row(lambda r: _norm(self.attn_norm, r, ops), x)
        a = self.attn.forward_paged(xn, rope, k_cache, v_cache, batch, ops)
        h, hn = ops.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)
        return h + self.ffn.forward_step(hn, ops)


class TwoPassDecoder(nn.Module):
    """Self layers, then one shared K/V projection, then cross layers (`layers.*` in the checkpoints).

    Drop path rises linearly from 0 at the first self layer to `config.drop_path` at the last cross layer
    (LlamaGen's schedule; the original ARPG takes `drop_path_rate` but applies it nowhere).
    """

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        n_self = config.n_self_layers
        rates = [config.drop_path * i / max(1, config.n_layer - 1) for i in range(config.n_layer)]
        self.self_dec = nn.ModuleList([SelfDecoder(config, rates[i]) for i in range(n_self)])
        self.cross_dec = nn.ModuleList([CrossDecoder(config, rates[n_self + i])
                                        for i in range(config.n_cross_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)

    def shared_kv(self, x: torch.Tensor, rope: torch.Tensor, rotate: bool = True, ops=None):
        """The K/V every cross layer attends: x [..., T, dim] -> k (RoPE'd unless not rotate), v [..., T, H, D].
        ops: `step_ops` (the norm as one op)."""
        xn = _norm(self.norm, x, ops)
        shape = (*x.shape[:-1], self.n_head, self.head_dim)
        k = self.to_k(xn).view(shape)
        return apply_rope(k, rope) if rotate else k, self.to_v(xn).view(shape)

    def forward(self, x, q, rope_in, rope_q):
        for layer in self.self_dec:
            x = layer(x, rope_in)
        k, v = self.shared_kv(x, rope_in)
        for layer in self.cross_dec:
            q = layer(q, k, v, rope_q)
        return q


class ARPG(nn.Module):
    """Class-conditional randomized parallel autoregressive image model.

    Parameters carry the published names (`embeddings`, `layers.self_dec.{i}...`, `layers.cross_dec.{i}...`,
    `layers.norm`, `layers.to_k`, `layers.to_v`, `norm`, `head`). The RoPE table is not a parameter or
    buffer: it is kept in float32 per device, whatever the model's dtype.
    """

    def __init__(self, config: "ARPGConfig | str"):
        super().__init__()
        config = get_config(config)
        if config.n_layer % 2:
            raise ValueError(f"ARPG needs an even n_layer (got {config.n_layer})")
        self.config = config
        self.embeddings = nn.Embedding(config.num_embeddings, config.dim)
        self.layers = TwoPassDecoder(config)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: dict[tuple[torch.device, tuple[int, int]], torch.Tensor] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @property
    def num_cache_layers(self) -> int:
        """Paged cache layers for decoding: one per self layer, plus one for the shared cross K/V."""
        return self.config.n_self_layers + 1

    def reset_parameters(self, std: float = 0.02, zero_head: bool = True) -> None:
        """The original initialization: normal(0, std) linears and embeddings, unit norms, zero head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if zero_head:
            nn.init.zeros_(self.head.weight)

    def rope_table(self, device, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Float32 2D RoPE table [H * W + 1, head_dim // 2, 2] on `device`, made once per (device, grid).

        grid: the (H, W) token grid, default the model's (grid_size, grid_size); larger grids serve
        resolution expansion (`arpg.edit.expand`).
        """
        c = self.config
        key = (torch.device(device), (c.grid_size, c.grid_size) if grid is None else (int(grid[0]), int(grid[1])))
        table = self._rope.get(key)
        if table is None:
            table = precompute_rope_2d(key[1], c.head_dim, c.rope_base).to(key[0])
            self._rope[key] = table
        return table

    def class_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels -> token ids (`V + 1 + c`); a negative label means "no class" (`V + C + 1`)."""
        c = self.config
        labels = labels.long()
        return torch.where(labels < 0, torch.full_like(labels, c.null_class_id), labels + c.vocab_size + 1)

    def mask_queries(self, *shape: int) -> torch.Tensor:
        """[MASK] embeddings broadcast to [*shape, dim]: the start of the query stream."""
        return self.embeddings.weight[self.config.mask_token_id].expand(*shape, self.config.dim)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        orders: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        context: Optional[torch.Tensor] = None,
        class_dropout: Optional[float] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced training step.

        tokens: [B, L] image token ids in [0, V), L = grid_size**2, image (raster) order.
        labels: [B] class labels (negative = no class); in train mode each is dropped to "no class"
            with probability `class_dropout` (default `config.class_dropout`; the trainer draws its own
            drops and passes 0).
        orders: [B, L] per-sample permutations of the token indices 0..L-1 (drawn if None).
        context: [B, L] the tokens fed as context, if not `tokens` themselves (a training run may corrupt
            some, so that the model learns to recover from its own sampling errors); targets stay `tokens`.
        Returns logits float32 [B, L, V] in generation order (logits[b, j] predicts
        tokens[b, orders[b, j]]) and the mean cross-entropy.
        """
        c = self.config
        bsz, seq = tokens.shape
        if seq != c.seq_len:
            raise ValueError(f"tokens has {seq} positions, config expects grid_size**2 = {c.seq_len}")
        device = tokens.device
        cls = self.class_ids(labels.to(device))
        p_drop = c.class_dropout if class_dropout is None else class_dropout
        if self.training and p_drop > 0:
            drop = torch.rand(bsz, device=device, generator=generator) < p_drop
            cls = torch.where(drop, torch.full_like(cls, c.null_class_id), cls)
        if orders is None:
            orders = torch.rand(bsz, seq, device=device, generator=generator).argsort(dim=1)
        orders = orders.to(device=device, dtype=torch.long)
        targets = tokens.gather(1, orders)
        pos_q = orders + 1
        pos_in = torch.cat([torch.zeros_like(pos_q[:, :1]), pos_q[:, :-1]], dim=1)
        rope = self.rope_table(device)

        inputs = targets if context is None else context.to(device).gather(1, orders)
        x = self.embeddings(torch.cat([cls[:, None], inputs[:, :-1]], dim=1))
        x = F.dropout(x, c.token_dropout, self.training)  # the original's token dropout (not on the queries)
        q = self.layers(x, self.mask_queries(bsz, seq), rope[pos_in], rope[pos_q])
        logits = self.head(self.norm(q)).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def decode_step(
        self,
        tokens: torch.Tensor,
        pos_in: torch.Tensor,
        pos_q: torch.Tensor,
        cache,
        batch: PagedBatch,
        grid: Optional[tuple[int, int]] = None,
        causal: bool = False,
        guidance: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One decoding step on packed rows.

        tokens, pos_in: [T_in] ids and content positions of the tokens sampled last step (the class
        token at position 0, and any known tokens, on the first step); they attend the whole cache and
        each other. pos_q: [T_q] target positions of this step's queries. cache: an `ak.PagedKVCache`
        with `num_cache_layers` layers. grid: the (H, W) token grid whose RoPE positions pos_in and
        pos_q index (default the model's). causal: a row's fed tokens attend each other causally, in the
        order given, as in training (an edit's first step, which feeds the known tokens); else with no
        mask, as the original feeds each step's sampled tokens. guidance: float32 [T_q / 2, 1], the scales of
        the conditional queries (the first half; the second half their unconditional partners), to return
        the guided logits [T_q / 2, V] (`head_logits`). Returns float32 logits [T_q, V].
        """
        check_guidance(guidance, pos_q.shape[0], tokens.device)
        rope = self.rope_table(tokens.device, grid)
        logits = cpu_decode_step(self, self.layers.self_dec, tokens, pos_in, pos_q, rope, cache, batch, causal,
                                 self.layers, guidance)
        if logits is not None:
            return logits
        rope_in, rope_q = rope[pos_in], rope[pos_q]
        x = self.embeddings(tokens)
        for i, layer in enumerate(self.layers.self_dec):
            x = layer.forward_paged(x, rope_in, *cache.layer(i), batch, causal)
        ops = step_ops(x, self.norm.weight)
        k, v = self.layers.shared_kv(x, rope_in, rotate=False, ops=ops)
        k_cache, v_cache = cache.layer(len(self.layers.self_dec))
        append_rotated(k, v, k_cache, v_cache, batch.slot_mapping, rope_in)
        q = self.mask_queries(pos_q.shape[0])
        for layer in self.layers.cross_dec:
            q = layer.forward_paged(q, rope_q, k_cache, v_cache, batch)
        return head_logits(self.head, _norm(self.norm, q, ops), guidance)

    def decode_loop(self, buf: torch.Tensor, steps: list[LoopStep], cache, draw, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, grid: Optional[tuple[int, int]] = None) -> bool:
        """Every step of a generation and its sampling in one op where the CPU's whole-generation op applies
        (`cpu_decode_loop`: buf int64 [N] updated in place, steps of `LoopStep`, draw() -> the uniforms of every
        step); returns False, having drawn and changed nothing, where it does not (then the caller loops over
        `decode_step`). grid: as `decode_step`'s."""
        return cpu_decode_loop(self, self.layers.self_dec, self.layers, self.rope_table(buf.device, grid), cache, buf,
                               steps, draw, temperature, top_k, top_p)


# The decode_step that ARPG.decode_loop replays: the engine runs the loop only while it is still the model's
# (arpg.engine._loop_goes_with_step), not after a subclass, an instance or a patch of the class replaced it.
ARPG.decode_loop.decode_step = ARPG.decode_step
