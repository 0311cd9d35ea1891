"""Decoding schedules, classifier-free guidance scales and token sampling.

Everything here is shared by the paged engine and the eager oracle, so both make the same plan and
draw the same tokens from the same logits.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

import arpg_kernels as ak
from arpg_kernels import checks, reference

from .model import fusions_enabled

__all__ = ["SCHEDULES", "token_schedule", "cfg_scales", "guide", "filter_logits", "draw_uniforms", "sample", "make_generator", "make_generators"]

SCHEDULES = ("arccos", "cosine")


def _mask_ratio(schedule: str, step: int, num_steps: int) -> float:
    # The original's arithmetic to the last bit (numpy's arccos/cos, its order of operations): a rounding
    # difference moves int(L * ratio) across an integer for some (L, N), e.g. L=64, N=39 (cosine).
    if schedule == "arccos":
        return float(np.arccos(1.0 * (step + 1) / num_steps) / (math.pi * 0.5))
    if schedule == "cosine":
        return float(np.cos(math.pi / 2.0 * (step + 1) / num_steps))
    raise ValueError(f"schedule must be one of {SCHEDULES} or a list of counts, got {schedule!r}")


def token_schedule(num_steps: int, seq_len: int = 256, schedule: Union[str, Sequence[int]] = "arccos") -> list[int]:
    """Tokens predicted at each of `num_steps` steps (DESIGN.md section 1); the counts sum to seq_len.

    Step s: `r = arccos((s+1)/N) / (pi/2)` (or `cos(pi/2 (s+1)/N)`), `mask_len = max(1, min(L - done - 1,
    int(L r)))`, `n_s = L - done - mask_len`, and the last step takes all that is left. The cap
    `mask_len <= L - done - 1` makes every n_s >= 1, so any N in 1..L gives exactly N steps. A list of
    counts (zeros allowed) is checked and returned as is.
    """
    if not isinstance(schedule, str):
        counts = [int(c) for c in schedule]
        if any(c < 0 for c in counts) or sum(counts) != seq_len:
            raise ValueError(f"explicit schedule must be non-negative counts summing to {seq_len}, got {counts}")
        return counts
    if not isinstance(num_steps, int) or not 1 <= num_steps <= seq_len:
        raise ValueError(f"num_steps must be an int in [1, {seq_len}], got {num_steps!r}")
    counts, done = [], 0
    for s in range(num_steps):
        if s == num_steps - 1:
            n = seq_len - done
        else:
            mask_len = max(1, min(seq_len - done - 1, int(seq_len * _mask_ratio(schedule, s, num_steps))))
            n = seq_len - done - mask_len
        counts.append(n)
        done += n
    return counts


def cfg_scales(counts: Sequence[int], seq_len: int, cfg_scale: float, cfg_schedule: str = "constant") -> list[float]:
    """Guidance scale per step: constant, or linear `1 + (g - 1) * done / L` with done counting the step's tokens."""
    if cfg_schedule == "constant":
        return [float(cfg_scale)] * len(counts)
    if cfg_schedule != "linear":
        raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {cfg_schedule!r}")
    out, done = [], 0
    for n in counts:
        done += n
        out.append(1.0 + (cfg_scale - 1.0) * done / seq_len)
    return out


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: `uncond + (cond - uncond) * scale`, the original's expression and order.

    cond, uncond: logits [..., V] of the conditional and unconditional rows; scale: a float or a tensor
    that broadcasts against them (e.g. float32 [T_q, 1], one scale per query).
    """
    return uncond + (cond - uncond) * scale


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering along the last dim; removed entries become -inf
    (`arpg_kernels.reference.filter_logits`, the semantics every sampler backend follows)."""
    return reference.filter_logits(logits, top_k, top_p)


def draw_uniforms(n: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """The random numbers of n draws: float64 [n] in [0, 1) from `generator` (None: the global RNG)."""
    return torch.rand(n, dtype=torch.float64, generator=generator, device=device)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    uncond: Optional[torch.Tensor] = None,
    cfg_scale=None,
    uniforms: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Draw one token per row from logits [..., V]; returns int64 [...].

    With uncond (same shape) and cfg_scale (a float, or a tensor that broadcasts to [..., 1]) the rows are
    guided first, `uncond + (logits - uncond) * cfg_scale` (`guide`). temperature <= 0 is greedy. The
    draw is by inverse CDF: one float64 uniform per row (from `generator`, or `uniforms` [N] when given),
    scaled by the row's total, picks the first token whose cumulative probability exceeds it, an exact
    categorical draw (a token of probability 0 is never picked) that never synchronizes with the host.
    All of it is one op, `arpg_kernels.sample_tokens` (on the CPU a sort-free C++ kernel; the reference
    elsewhere); the eager path and the engine share it, so they draw the same tokens.
    """
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, vocab).float().contiguous()
    n = x.shape[0]
    un = scale = None
    if uncond is not None:
        un = uncond.reshape(-1, vocab).float().contiguous()
        scale = torch.as_tensor(cfg_scale, dtype=torch.float32, device=x.device)
        scale = scale.broadcast_to((*lead, 1)).reshape(n).contiguous()
    if temperature <= 0:
        uniforms = torch.zeros(n, dtype=torch.float64, device=x.device)  # unused: greedy draws nothing
    elif uniforms is None:
        uniforms = draw_uniforms(n, generator, x.device)
    if fusions_enabled():  # the model's switch (`arpg.model.step_fusions`) covers the sampler too
        out = ak.sample_tokens(x, uniforms, un, scale, float(temperature), int(top_k or 0), float(top_p))
    else:  # the same steps as separate torch ops
        checks.check_sample_tokens(x, un, scale, uniforms, float(temperature), int(top_k or 0), float(top_p))
        out = reference.sample_tokens(x, un, scale, uniforms, float(temperature), int(top_k or 0), float(top_p))
    return out.view(lead)


def make_generator(device, seed: Optional[int] = None, generator: Optional[torch.Generator] = None):
    """The generator to sample with: the given one, a new one seeded with `seed`, or None (global RNG)."""
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def make_generators(device, bsz: int, seed=None, generator=None):
    """`make_generator`, also taking one generator or one seed per sample (a list of B)."""
    if isinstance(generator, (list, tuple)) or (generator is None and isinstance(seed, (list, tuple))):
        gens = list(generator) if generator is not None else [make_generator(device, s) for s in seed]
        if len(gens) != bsz:
            name = "generator" if generator is not None else "seed"
            raise ValueError(f"{name} has {len(gens)} entries for a batch of {bsz}")
        return gens
    return make_generator(device, seed, generator)
