"""Editing with ARPG: inpainting, outpainting and resolution expansion, on the paged engine.

An edit is a generation whose samples start with known tokens. Sample b's class token and its K_b
known tokens are fed together at the first step: one pass through the self layers in which they attend
the class token and each other causally, in the order the sample's permutation visits them (as in
training, where a random order's first K_b tokens see exactly that; with no mask among 48 known tokens
the digits model's class-guided inpainting fell from 1.0 to 0.43 judge accuracy), appending their K/V
and the shared cross-layer K/V to the paged cache. The U_b = L - K_b unknown positions are then predicted in a
random order, several per step, exactly as `generate` does, with the schedule of DESIGN.md section 1
run over U_b instead of L (the linear guidance ramp too: `1 + (g - 1) * done / U_b`). Known tokens are
never changed and every unknown position is predicted exactly once. Under guidance the unconditional
row of a sample sees the same known tokens with the no-class id.

Varlen step rule: sample b runs min(num_steps, U_b) steps of its own schedule (an explicit list of
counts must sum to every U_b), and the samples' steps are aligned at the start: step s of every sample
runs in the same packed batch. So rows feed and predict different numbers of tokens per step (packed
with cu_in / cu_q, with per-row KV lengths), and a sample with fewer steps idles, with no rows, in the
last ones. A sample with nothing unknown takes no step at all; if no sample has anything unknown the
input comes back unchanged.

Randomness: with one generator (or seed) for the batch, one permutation of the L positions is drawn and
every sample predicts its unknown positions in that permutation's order; with nothing known this is
`generate`'s order, so an edit with nothing known is `generate` with the same seed. With a list of B
generators (or B seeds) sample b draws its permutation and its tokens from its own generator, so its
result does not depend on the rest of the batch.

Grids: `inpaint` works on the model's grid; `outpaint` and `expand` on any (H, W) token grid, whose 2D
RoPE is the model's formula on that grid (position p in 1..H*W is cell divmod(p - 1, W); the row rotates
the first half of head_dim, the column the second; the class slot stays zero). The published models
were trained on 16 x 16 only, so larger grids extrapolate the positions.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .engine import check_labels, draw_orders, make_plan, model_engine
from .model import ARPG
from .sampling import make_generators

__all__ = ["inpaint", "outpaint", "expand"]


def _pair(name: str, value, low: int = 1) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of ints, got {value!r}") from None
    if a < low or b < low:
        raise ValueError(f"{name} must be ints >= {low}, got {value!r}")
    return a, b


def _int_tensor(name: str, t, shape: tuple) -> torch.Tensor:
    """An integer tensor of exactly `shape` (None entries match any size)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got {tuple(t.shape)}")
    return t


def _mask(name: str, m, shape: tuple[int, ...]) -> torch.Tensor:
    """A bool mask of `shape`, or of shape[1:] broadcast over the batch."""
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        what = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a torch.bool tensor, got {what}")
    if tuple(m.shape) == shape[1:]:
        m = m.expand(shape)
    if tuple(m.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} or {list(shape[1:])}, got {tuple(m.shape)}")
    return m


def _edit(
    model: ARPG,
    tokens: torch.Tensor,
    known: torch.Tensor,
    labels,
    grid: tuple[int, int],
    num_steps: int,
    schedule,
    cfg_scale: float,
    cfg_schedule: str,
    temperature: float,
    top_k: int,
    top_p: float,
    generator,
    seed,
    order,
    page_size: int,
    use_cuda_graphs: bool,
    return_logits: bool,
    teacher_tokens: Optional[torch.Tensor],
):
    """tokens [B, H*W] (only known entries are read), known bool [B, H*W] -> tokens [B, H*W]."""
    if not isinstance(model, ARPG):
        raise ValueError(f"model must be an ARPG model (fills positions in any order), got {type(model).__name__}")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    bsz, seq_len = tokens.shape
    labels = check_labels(model, labels, bsz)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    known = known.to(tokens.device)
    values = tokens[known]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab):
        raise ValueError(f"known tokens must be image token ids in [0, {vocab}), got [{int(values.min())}, "
                         f"{int(values.max())}]")
    if teacher_tokens is not None:
        teacher_tokens = torch.as_tensor(teacher_tokens)
        if teacher_tokens.numel() != bsz * seq_len:
            raise ValueError(f"teacher_tokens must hold {seq_len} tokens for each of {bsz} samples, got shape "
                             f"{tuple(teacher_tokens.shape)}")
        teacher_tokens = teacher_tokens.reshape(bsz, seq_len)

    known_rows = known.cpu().tolist()
    use_cfg = cfg_scale != 1.0
    if all(all(row) for row in known_rows):
        out = tokens.to(device=device, dtype=torch.long, copy=True)
        return (out, []) if return_logits else out
    gens = make_generators(device, bsz, seed, generator)
    orders = draw_orders(seq_len, bsz, device, gens, order)
    plans = []
    for row, perm in zip(known_rows, orders):
        todo = [i for i in perm if not row[i]]
        steps = min(num_steps, len(todo)) if isinstance(schedule, str) else num_steps
        plans.append(make_plan(seq_len, steps, todo, schedule, cfg_scale, cfg_schedule,
                               known=[i for i in perm if row[i]]))
    with model_engine(model, bsz * (2 if use_cfg else 1), page_size, use_cuda_graphs, seq_len) as engine:
        return engine.run(plans, labels, tokens.to(device), grid, use_cfg, temperature, top_k, top_p, gens,
                          return_logits, teacher_tokens)


def inpaint(
    model: ARPG,
    tokens: torch.Tensor,
    known: torch.Tensor,
    labels,
    num_steps: int,
    schedule: Union[str, Sequence[int]] = "arccos",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator=None,
    seed=None,
    order=None,
    page_size: int = 16,
    use_cuda_graphs: bool = True,
    return_logits: bool = False,
    teacher_tokens: Optional[torch.Tensor] = None,
):
    """Regenerate the unknown tokens of B token grids, keeping the known ones.

    tokens: int [B, L] (L = grid_size**2, raster order); entries where `known` is False are ignored.
    known: bool [B, L], or [L] for the whole batch; samples may know different numbers of tokens.
    labels: [B] class labels (negative: no class), or one label for all. num_steps: decoding steps,
    clamped per sample to its number of unknown tokens (see the module docstring for the step rule).
    schedule, cfg_scale, cfg_schedule, temperature, top_k, top_p: as in `generate`, over the unknowns.
    generator / seed: one for the batch, or a list of B (one per sample; see the module docstring).
    order: [L] or [B, L] permutations of 0..L-1; each sample predicts its unknown positions in that
    order (known entries are skipped). teacher_tokens [B, L]: feed these instead of samples (tests).

    Returns tokens int64 [B, L] on the model's device, and with return_logits every step's packed
    logits (see `Engine.run`).
    """
    grid = (model.config.grid_size, model.config.grid_size)
    tokens = _int_tensor("tokens", tokens, (None, grid[0] * grid[1]))
    known = _mask("known", known, tuple(tokens.shape))
    return _edit(model, tokens, known, labels, grid, num_steps, schedule, cfg_scale, cfg_schedule, temperature,
                 top_k, top_p, generator, seed, order, page_size, use_cuda_graphs, return_logits, teacher_tokens)


def outpaint(
    model: ARPG,
    known_tokens: torch.Tensor,
    canvas: tuple[int, int],
    offset: tuple[int, int],
    labels,
    num_steps: int,
    schedule: Union[str, Sequence[int]] = "arccos",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator=None,
    seed=None,
    order=None,
    page_size: int = 16,
    use_cuda_graphs: bool = True,
    return_logits: bool = False,
    teacher_tokens: Optional[torch.Tensor] = None,
):
    """Place a known tile inside a larger canvas and generate the rest of the canvas.

    known_tokens: int [B, h, w]. canvas: (H, W) in tokens; the model's (grid_size, grid_size) uses the
    normal positions, any other size the RoPE of that grid (as `expand`). offset: (row, col) of the
    tile's top-left cell; the tile must lie inside the canvas. order / teacher_tokens index the canvas
    ([H*W] or [B, H*W]; [B, H, W]). Other arguments as in `inpaint`. Returns tokens int64 [B, H, W].
    """
    known_tokens = _int_tensor("known_tokens", known_tokens, (None, None, None))
    rows, cols = _pair("canvas", canvas)
    r, c = _pair("offset", offset, low=0)
    bsz, h, w = known_tokens.shape
    if r + h > rows or c + w > cols:
        raise ValueError(f"a {h}x{w} tile at offset ({r}, {c}) does not fit the {rows}x{cols} canvas")
    tokens = known_tokens.new_zeros(bsz, rows, cols)
    tokens[:, r : r + h, c : c + w] = known_tokens
    known = torch.zeros(bsz, rows, cols, dtype=torch.bool, device=known_tokens.device)
    known[:, r : r + h, c : c + w] = True
    out = _edit(model, tokens.reshape(bsz, -1), known.reshape(bsz, -1), labels, (rows, cols), num_steps, schedule,
                cfg_scale, cfg_schedule, temperature, top_k, top_p, generator, seed, order, page_size,
                use_cuda_graphs, return_logits, teacher_tokens)
    if return_logits:
        return out[0].view(bsz, rows, cols), out[1]
    return out.view(bsz, rows, cols)


def expand(
    model: ARPG,
    labels,
    grid: tuple[int, int],
    known: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    *,
    num_steps: int,
    schedule: Union[str, Sequence[int]] = "arccos",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator=None,
    seed=None,
    order=None,
    page_size: int = 16,
    use_cuda_graphs: bool = True,
    return_logits: bool = False,
    teacher_tokens: Optional[torch.Tensor] = None,
):
    """Resolution expansion: generate B token grids of (H, W) = grid with that grid's 2D RoPE.

    labels: [B] class labels (negative: no class). known: None, or (tokens int [B, H, W], mask bool
    [B, H, W] or [H, W]) to seed the generation with known tokens (say, a generated tile). The cache
    holds H*W + 1 tokens per sequence. order / teacher_tokens index the grid ([H*W] or [B, H*W];
    [B, H, W]). Other arguments as in `inpaint`. Returns tokens int64 [B, H, W].
    """
    rows, cols = _pair("grid", grid)
    if known is None:
        bsz = torch.as_tensor(labels).numel()
        tokens = torch.zeros(bsz, rows * cols, dtype=torch.long)
        mask = torch.zeros(bsz, rows * cols, dtype=torch.bool)
    else:
        if not isinstance(known, (tuple, list)) or len(known) != 2:
            raise ValueError("known must be None or a pair (tokens [B, H, W], mask [B, H, W] bool)")
        tokens = _int_tensor("known[0] (tokens)", known[0], (None, rows, cols))
        bsz = tokens.shape[0]
        mask = _mask("known[1] (mask)", known[1], (bsz, rows, cols)).reshape(bsz, -1)
        tokens = tokens.reshape(bsz, -1)
    out = _edit(model, tokens, mask, labels, (rows, cols), num_steps, schedule, cfg_scale, cfg_schedule, temperature,
                top_k, top_p, generator, seed, order, page_size, use_cuda_graphs, return_logits, teacher_tokens)
    if return_logits:
        return out[0].view(bsz, rows, cols), out[1]
    return out.view(bsz, rows, cols)
