"""Triton sample_tokens: guidance, temperature, top-k/top-p and the inverse-CDF draw, one program per row.

Sort-free: each threshold is found by bisection on the float's bits (32 passes over the row, each a
count or a mass), which lands exactly on a value of the row:
  - top-k: the largest key t with count(x >= t) >= k is the k-th largest logit (ties kept, as torch.topk's
    threshold does);
  - top-p: the smallest t with mass(p > t) <= top_p * total is the smallest kept probability (token j stays
    when the mass strictly above it is within the budget: the reference's sorted exclusive cumsum; tied
    tokens at the boundary all stay).
The draw: the first token (vocabulary order) whose float64 running sum of kept probabilities exceeds
uniform * total, as torch.searchsorted on the reference's cumulative sum. Nothing syncs with the host, so
a CUDA graph captures it; the draw is a function of the given uniforms, so a seeded generator repeats it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sample_tokens"]


@triton.jit
def _ordered(x):
    """float32 -> int32 keys in the floats' order (-inf lowest)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _sample_kernel(
    logits, uncond, scale, uniforms, scratch, out,
    stride_l, stride_u, stride_s,
    V, temperature, top_k, top_p,
    HAS_CFG: tl.constexpr,
    GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    p_l = logits + row * stride_l
    p_u = uncond + row * stride_u
    p_s = scratch + row * stride_s
    if HAS_CFG:
        s = tl.load(scale + row)
    # Pass 1: the guided (tempered) logits into the scratch row; the largest (first index) and NaNs.
    mx = tl.full([], -float("inf"), tl.float32)
    arg = tl.full([], 0, tl.int32)
    nan = tl.full([], 0, tl.int32)
    first_nan = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        m = idx < V
        x = tl.load(p_l + idx, mask=m, other=-float("inf"))
        if HAS_CFG:
            u = tl.load(p_u + idx, mask=m, other=0.0)
            x = tl.where(m, u + (x - u) * s, -float("inf"))
        is_nan = x != x
        first_nan = tl.where(nan > 0, first_nan, tl.min(tl.where(is_nan, idx, V), 0))
        nan += tl.sum(is_nan.to(tl.int32), 0)
        x = tl.where(is_nan, -float("inf"), x)
        cmx = tl.max(x, 0)
        carg = tl.argmax(x, 0) + start
        arg = tl.where(cmx > mx, carg, arg)
        mx = tl.maximum(mx, cmx)
        if not GREEDY:
            tl.store(p_s + idx, x / temperature, mask=m)
    if GREEDY:
        tok = tl.where(nan > 0, first_nan, arg)  # a NaN counts as largest, as torch.argmax
    else:
        mx = mx / temperature
        bad = (nan > 0) | (mx == float("inf")) | (mx == -float("inf"))
        # Top-k: bisection on keys; lo satisfies count >= k, hi does not.
        kth = tl.full([], -2147483648, tl.int32)  # every key passes
        if (top_k > 0) & (top_k < V):
            lo = kth.to(tl.int64)
            hi = _ordered(mx).to(tl.int64) + 1
            for _ in range(33):
                mid = lo + (hi - lo) // 2
                count = 0
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    x = tl.load(p_s + idx, mask=idx < V, other=-float("inf"))
                    count += tl.sum((_ordered(x).to(tl.int64) >= mid).to(tl.int32), 0)
                ok = count >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            kth = lo.to(tl.int32)
        # Probabilities (unnormalised, the largest 1) of what top-k keeps; their total in float64.
        total = tl.zeros([], tl.float64)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(p_s + idx, mask=idx < V, other=-float("inf"))
            p = tl.where(_ordered(x) >= kth, tl.exp(x - mx), 0.0)
            total += tl.sum(p.to(tl.float64), 0)
        tau = tl.zeros([], tl.float32)
        if top_p < 1.0:
            budget = total * top_p
            lo = (kth * 0 - 1).to(tl.int64)  # mass(p > -0) > budget: false
            hi = (tl.full([], 1.0, tl.float32).to(tl.int32, bitcast=True)).to(tl.int64)  # mass(p > 1) = 0: true
            for _ in range(33):
                mid = lo + (hi - lo) // 2
                t = mid.to(tl.int32).to(tl.float32, bitcast=True)
                mass = tl.zeros([], tl.float64)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    x = tl.load(p_s + idx, mask=idx < V, other=-float("inf"))
                    p = tl.where(_ordered(x) >= kth, tl.exp(x - mx), 0.0)
                    mass += tl.sum(tl.where(p > t, p, 0.0).to(tl.float64), 0)
                ok = mass <= budget
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid)
            tau = hi.to(tl.int32).to(tl.float32, bitcast=True)
            total = tl.zeros([], tl.float64)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = tl.load(p_s + idx, mask=idx < V, other=-float("inf"))
                p = tl.where(_ordered(x) >= kth, tl.exp(x - mx), 0.0)
                total += tl.sum(tl.where(p >= tau, p, 0.0).to(tl.float64), 0)
        # The draw: the first index whose running float64 sum exceeds uniform * total.
        target = tl.load(uniforms + row) * total
        run = tl.zeros([], tl.float64)
        tok = tl.full([], V, tl.int32)
        last = tl.full([], -1, tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(p_s + idx, mask=idx < V, other=-float("inf"))
            p = tl.where(_ordered(x) >= kth, tl.exp(x - mx), 0.0)
            p = tl.where(p >= tau, p, 0.0).to(tl.float64)
            csum = tl.cumsum(p, 0) + run
            hit = (csum > target) & (p > 0)
            tok = tl.minimum(tok, tl.min(tl.where(hit, idx, V), 0))
            last = tl.maximum(last, tl.max(tl.where(p > 0, idx, -1), 0))
            run += tl.sum(p, 0)
        tok = tl.where(tok < V, tok, tl.where(last >= 0, last, V - 1))
        tok = tl.where(bad, V - 1, tok)
    tl.store(out + row, tok.to(tl.int64))


def sample_tokens(logits, uncond, cfg_scale, uniforms, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row, semantics of `arpg_kernels.reference.sample_tokens` (sort-free thresholds).

    logits, uncond: float32 [T, V] (rows contiguous); cfg_scale: float32 [T]; uniforms: float64 [T].
    Returns int64 [T].
    """
    t, v = logits.shape
    out = torch.empty(t, dtype=torch.int64, device=logits.device)
    if t == 0:
        return out
    greedy = temperature <= 0
    scratch = logits if greedy else torch.empty_like(logits)  # greedy reads nothing back
    has_cfg = uncond is not None
    block = min(triton.next_power_of_2(v), 1024)
    _sample_kernel[(t,)](
        logits, uncond if has_cfg else logits, cfg_scale.contiguous() if has_cfg else logits,
        uniforms.contiguous(), scratch, out,
        logits.stride(0), (uncond if has_cfg else logits).stride(0), scratch.stride(0),
        v, float(temperature) if not greedy else 1.0, int(top_k), float(top_p),
        HAS_CFG=has_cfg, GREEDY=greedy, BLOCK=block,
    )
    return out
