"""Paged decoding engine for ARPG (and the raster baseline, on the same machinery).

A generation is planned in full before the loop: tokens per step from the schedule, the order, every
step's positions, slot mappings, block table, KV lengths and cu_q_lens, all as device tensors. The
loop then only launches work: `model.decode_step` (or the replay of its CUDA graph), guidance, and
sampling. Each sample has its own plan (`make_plan`), so samples may differ in order, in known tokens
fed at the first step (editing, `arpg.edit`) and in tokens per step: rows are packed varlen. On CUDA
each distinct uniform step shape (grid, rows, tokens fed, queries) is captured once as a CUDA graph
with static input buffers and replayed, in this and later generations of the same engine.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch.profiler import record_function

import arpg_kernels as ak

from .model import PagedBatch
from .sampling import cfg_scales, guide, make_generators, sample, token_schedule

__all__ = ["Step", "make_plan", "draw_order", "draw_orders", "Engine", "engine_for", "generate", "sample_seeds"]


@dataclass(frozen=True)
class Step:
    """One decoding step of one sample (host values).

    pos_in: content positions of the tokens fed (0 = class token, p = token p - 1; step 0 feeds the
    class token and any known tokens); targets: token indices (0..L-1) predicted by this step, whose
    query positions are targets + 1; kv_len: cache length of the sample's sequence after the step;
    cfg: guidance scale of the step.
    """

    pos_in: tuple[int, ...]
    targets: tuple[int, ...]
    kv_len: int
    cfg: float

    @property
    def n_in(self) -> int:
        return len(self.pos_in)

    @property
    def n_q(self) -> int:
        return len(self.targets)


def make_plan(
    seq_len: int,
    num_steps: int,
    order: Sequence[int],
    schedule: Union[str, Sequence[int]] = "arccos",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    known: Sequence[int] = (),
) -> list[Step]:
    """The steps of a generation that predicts `order` (token indices) in schedule-sized groups.

    Step s feeds the tokens step s-1 predicted (step 0 the class token) and predicts the next n_s of
    the order. known: token indices given in advance (editing); step 0 feeds them after the class
    token, in the order given, attending each other causally as in training (`decode_step(causal=True)`),
    and `order` must be a permutation of the other indices. The
    schedule and the linear guidance ramp run over the U = len(order) predicted tokens (L of
    DESIGN.md section 1 becomes U). An empty order gives no steps. Steps with n_s = 0 (only possible
    in an explicit list of counts) are dropped: running one would only move the feeding of the
    previous tokens one step later, with the same keys, values and logits.
    """
    order = [int(i) for i in order]
    known = [int(i) for i in known]
    if sorted(order + known) != list(range(seq_len)):
        what = "order and known together" if known else "order"
        raise ValueError(f"{what} must be a permutation of 0..{seq_len - 1}")
    if not order:
        return []
    counts = token_schedule(num_steps, len(order), schedule)
    scales = cfg_scales(counts, len(order), cfg_scale, cfg_schedule)
    steps, done, pos_in, kv_len = [], 0, (0, *(k + 1 for k in known)), 0
    for n, g in zip(counts, scales):
        if n == 0:
            continue
        targets = tuple(order[done : done + n])
        kv_len += len(pos_in)
        steps.append(Step(pos_in=pos_in, targets=targets, kv_len=kv_len, cfg=g))
        done += n
        pos_in = tuple(t + 1 for t in targets)
    return steps


def draw_order(seq_len: int, device, generator: Optional[torch.Generator] = None, order=None) -> list[int]:
    """The generation order as host ints: `order` checked, or a permutation drawn from `generator`."""
    if order is None:
        dev = generator.device if generator is not None else torch.device(device)
        order = torch.randperm(seq_len, generator=generator, device=dev)
    if isinstance(order, torch.Tensor):
        order = order.flatten().tolist()
    order = [int(i) for i in order]
    if sorted(order) != list(range(seq_len)):
        raise ValueError(f"order must be a permutation of 0..{seq_len - 1}")
    return order


def draw_orders(seq_len: int, bsz: int, device, generator=None, order=None) -> list[list[int]]:
    """One order (a permutation of 0..seq_len-1) per sample, as host ints.

    order: [L] (shared by the batch) or [B, L] (one per sample); else drawn: one shared permutation
    from a single generator (or the global RNG), or one per sample from a list of B generators.
    """
    if order is not None:
        rows = torch.as_tensor(order)
        if rows.dim() == 2:
            if rows.shape[0] != bsz:
                raise ValueError(f"order has {rows.shape[0]} rows for a batch of {bsz}")
            return [draw_order(seq_len, device, None, r) for r in rows]
        return [draw_order(seq_len, device, None, order)] * bsz
    if isinstance(generator, (list, tuple)):
        return [draw_order(seq_len, device, g) for g in generator]
    return [draw_order(seq_len, device, generator)] * bsz


@dataclass
class _StepInputs:
    in_index: torch.Tensor  # int64 [T_in], where the fed tokens sit in the token buffer
    pos_in: torch.Tensor  # int64 [T_in]
    pos_q: torch.Tensor  # int64 [T_q]
    out_index: torch.Tensor  # int64 [T_q of the conditional rows], where the sampled tokens go
    cfg: torch.Tensor  # float32 [T_q of the conditional rows, 1], the guidance scale per query
    q_counts: tuple[int, ...]  # queries per sample (host)
    uniform: bool  # every row feeds the same number of tokens and sends the same number of queries
    batch: PagedBatch
    causal: bool  # the fed tokens attend each other causally (step 0 of an edit: class + known tokens)


class _GraphStep:
    """A CUDA graph of `model.decode_step` for one uniform step shape, with static input buffers."""

    def __init__(self, rows: int, n_in: int, n_q: int, max_pages: int, device):
        def z(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens = z(rows * n_in)
        self.pos_in = z(rows * n_in)
        self.pos_q = z(rows * n_q)
        self.batch = PagedBatch(
            slot_mapping=z(rows * n_in),
            block_table=z(rows, max_pages, dtype=torch.int32),
            kv_lens=z(rows, dtype=torch.int32),
            cu_in=torch.arange(0, rows * n_in + 1, n_in, dtype=torch.int32, device=device),
            cu_q=torch.arange(0, rows * n_q + 1, n_q, dtype=torch.int32, device=device),
            max_in=n_in,
            max_q=n_q,
        )
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[torch.Tensor] = None

    def load(self, tokens: torch.Tensor, inp: _StepInputs) -> None:
        self.tokens.copy_(tokens)
        self.pos_in.copy_(inp.pos_in)
        self.pos_q.copy_(inp.pos_q)
        self.batch.slot_mapping.copy_(inp.batch.slot_mapping)
        self.batch.block_table.copy_(inp.batch.block_table)
        self.batch.kv_lens.copy_(inp.batch.kv_lens)

    def capture(self, model, cache, pool, kwargs) -> None:
        # The warm-up writes this step's real K/V (the replay writes the same values again).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.decode_step(self.tokens, self.pos_in, self.pos_q, cache, self.batch, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = model.decode_step(self.tokens, self.pos_in, self.pos_q, cache, self.batch, **kwargs)

    def __call__(self, tokens: torch.Tensor, inp: _StepInputs) -> torch.Tensor:
        self.load(tokens, inp)
        self.graph.replay()
        return self.out


def _sample(logits, inp: _StepInputs, temperature, top_k, top_p, generator) -> torch.Tensor:
    """Sample every query; with a list of generators each sample draws from its own."""
    if not isinstance(generator, (list, tuple)):
        return sample(logits, temperature, top_k, top_p, generator)
    parts, start = [], 0
    for g, n in zip(generator, inp.q_counts):
        if n:
            parts.append(sample(logits[start : start + n], temperature, top_k, top_p, g))
        start += n
    return torch.cat(parts)


class Engine:
    """Owns a paged KV cache (and CUDA graphs) sized for up to `max_rows` sequences of one model.

    A row is one sequence in the cache: with classifier-free guidance a batch of B images uses 2B rows.
    max_seq_len: image tokens per sequence the cache holds (default the model's grid_size**2; larger
    for resolution expansion). The model's weights are used in place. `model` is an `ARPG` or a
    `RasterLM` (any module with `config`, `num_cache_layers` and `decode_step`; `decode_order =
    "raster"` selects one token per step).

    Every generation runs per-sample plans (`run`): samples may feed and predict different numbers of
    tokens per step (packed varlen rows, `cu_in` / `cu_q`). Steps where every row has the same shape
    (all of `generate`, and edits whose samples share a mask) replay CUDA graphs; other steps launch
    directly, as their shapes rarely recur.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_rows: int,
        page_size: int = 16,
        use_cuda_graphs: bool = True,
        max_seq_len: Optional[int] = None,
        _weak_model: bool = False,
    ):
        param = next(model.parameters())
        cfg = model.config
        # `generate` keeps its engines in a weak-keyed table, so those must not keep the model alive.
        self._model = weakref.ref(model) if _weak_model else (lambda: model)
        self.device, self.dtype = param.device, param.dtype
        self.max_rows = int(max_rows)
        self.page_size = int(page_size)
        self.max_seq_len = cfg.seq_len if max_seq_len is None else int(max_seq_len)
        # A sequence holds at most the class token and L - 1 image tokens.
        self.pages_per_seq = math.ceil((self.max_seq_len + 1) / page_size)
        self.cache = ak.PagedKVCache(
            model.num_cache_layers,
            self.max_rows * self.pages_per_seq,
            self.page_size,
            cfg.n_head,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.use_cuda_graphs = bool(use_cuda_graphs) and self.device.type == "cuda"
        self._graphs: dict[tuple, _GraphStep] = {}
        self._pool = None

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    @property
    def raster(self) -> bool:
        return getattr(self.model, "decode_order", "random") == "raster"

    def matches(self, model, rows: int, page_size: int, use_cuda_graphs: bool, seq_len: Optional[int] = None) -> bool:
        param = next(model.parameters())
        return (
            model is self.model
            and rows <= self.max_rows
            and (model.config.seq_len if seq_len is None else seq_len) <= self.max_seq_len
            and page_size == self.page_size
            and (bool(use_cuda_graphs) and param.device.type == "cuda") == self.use_cuda_graphs
            and (param.device, param.dtype) == (self.device, self.dtype)
        )

    def _prepare(self, plans: list[list[Step]], rows: int, seq_len: int):
        """Reserve the whole generation in the cache and build every step's device tensors.

        Row r serves sample r % B. The token buffer holds the rows' class ids, then the samples'
        tokens: position p > 0 of row r is slot rows + (r % B) * seq_len + p - 1, position 0 slot r.
        """
        bsz = len(plans)
        num_steps = max(len(p) for p in plans)
        idle = Step((), (), 0, 1.0)
        by_step = [[p[s] if s < len(p) else idle for p in plans] for s in range(num_steps)]  # [step][sample]
        seq_ids = self.cache.add_sequences(rows)
        try:
            cache_plans = self.cache.plan(seq_ids, [[st[r % bsz].n_in for r in range(rows)] for st in by_step])
            block_table = self.cache.block_table(seq_ids, self.pages_per_seq)
        except Exception:
            self.cache.free(seq_ids)
            raise

        def slot(r: int, p: int) -> int:
            return r if p == 0 else rows + (r % bsz) * seq_len + p - 1

        # One host-to-device copy for all indices and positions, one for the scales, then views.
        flat, spans, scales = [], [], []
        for st in by_step:
            rows_st = [st[r % bsz] for r in range(rows)]
            parts = (
                [slot(r, p) for r, x in enumerate(rows_st) for p in x.pos_in],
                [p for x in rows_st for p in x.pos_in],
                [t + 1 for x in rows_st for t in x.targets],
                [slot(b, t + 1) for b, x in enumerate(st) for t in x.targets],
            )
            for part in parts:
                spans.append((len(flat), len(part)))
                flat.extend(part)
            scales.extend(x.cfg for x in st for _ in x.targets)
        flat_t = torch.tensor(flat, dtype=torch.int64, device=self.device)
        views = [flat_t[a : a + n] for a, n in spans]
        scales_t = torch.tensor(scales, dtype=torch.float32, device=self.device)[:, None]

        def cu(counts) -> torch.Tensor:
            return torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=self.device)

        inputs, done = [], 0
        for i, (st, plan) in enumerate(zip(by_step, cache_plans)):
            q_counts = tuple(x.n_q for x in st)
            n_q = [q_counts[r % bsz] for r in range(rows)]
            batch = PagedBatch(
                slot_mapping=plan.slot_mapping,
                block_table=block_table,
                kv_lens=plan.kv_lens,
                cu_in=plan.cu_new,
                cu_q=cu(n_q),
                max_in=max(plan.num_new),
                max_q=max(n_q),
            )
            uniform = len(set(plan.num_new)) == 1 and len(set(n_q)) == 1
            in_index, pos_in, pos_q, out_index = views[4 * i : 4 * i + 4]
            inputs.append(
                _StepInputs(in_index, pos_in, pos_q, out_index, scales_t[done : done + sum(q_counts)], q_counts,
                            uniform, batch, causal=i == 0 and max(plan.num_new) > 1)
            )
            done += sum(q_counts)
        return seq_ids, inputs

    def _run(self, tokens: torch.Tensor, inp: _StepInputs, rows: int, grid) -> torch.Tensor:
        b = inp.batch
        kwargs = {} if grid is None else {"grid": grid}
        if inp.causal:
            kwargs["causal"] = True
        if not (self.use_cuda_graphs and inp.uniform):
            return self.model.decode_step(tokens, inp.pos_in, inp.pos_q, self.cache, b, **kwargs)
        key = (grid, rows, b.max_in, b.max_q, inp.causal)
        runner = self._graphs.get(key)
        if runner is None:
            runner = _GraphStep(rows, b.max_in, b.max_q, self.pages_per_seq, self.device)
            runner.load(tokens, inp)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            runner.capture(self.model, self.cache, self._pool, kwargs)
            self._graphs[key] = runner
        return runner(tokens, inp)

    @torch.inference_mode()
    def run(
        self,
        plans: Sequence[Sequence[Step]],
        labels: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        grid: Optional[tuple[int, int]] = None,
        use_cfg: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator=None,
        return_logits: bool = False,
        teacher_tokens: Optional[torch.Tensor] = None,
    ):
        """Decode B samples, each by its own plan (`make_plan`), in one packed batch.

        plans: B lists of steps; they may differ in length and in tokens fed and predicted per step
        (a sample whose plan is shorter idles, with no rows, in the last steps). labels: [B] class
        labels (negative = no class). tokens: [B, L] starting tokens (L = H * W of grid): the known
        tokens the plans feed at step 0 are read from here, every predicted position is overwritten.
        grid: (H, W) of the RoPE positions (default the model's grid; passed to `decode_step`).
        use_cfg: run an unconditional row per sample and guide with each step's `cfg`. generator: a
        generator (or None: global RNG) for the whole batch, or a list of B, one per sample.
        teacher_tokens [B, L]: feed these instead of samples.

        Returns tokens int64 [B, L], and with return_logits also every step's model logits, packed
        float32 [T_q, V]: the conditional rows' queries sample by sample, then the unconditional rows'.
        """
        model = self.model
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        bsz = labels.shape[0]
        g = model.config.grid_size
        grid = None if grid is None or tuple(grid) == (g, g) else (int(grid[0]), int(grid[1]))
        seq_len = g * g if grid is None else grid[0] * grid[1]
        if len(plans) != bsz:
            raise ValueError(f"{len(plans)} plans for {bsz} labels")
        if seq_len > self.max_seq_len:
            raise ValueError(f"{seq_len} tokens per image do not fit an engine made for {self.max_seq_len}")
        rows = 2 * bsz if use_cfg else bsz
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows do not fit an engine made for {self.max_rows}")
        if tokens is None:
            tokens = torch.zeros(bsz, seq_len, dtype=torch.long, device=self.device)
        cls = model.class_ids(labels)
        if use_cfg:
            cls = torch.cat([cls, torch.full_like(cls, model.config.null_class_id)])
        buf = torch.cat([cls, tokens.to(self.device).long().reshape(bsz * seq_len)])
        if teacher_tokens is not None:
            teacher_tokens = torch.cat([cls, teacher_tokens.to(self.device).long().reshape(bsz * seq_len)])
        if not any(plans):
            return (buf[rows:].view(bsz, seq_len), []) if return_logits else buf[rows:].view(bsz, seq_len)

        seq_ids, inputs = self._prepare([list(p) for p in plans], rows, seq_len)
        all_logits = []
        # Named regions for torch.profiler (arpg-bench's step breakdown), entered only while it records.
        region = record_function if torch.autograd._profiler_enabled() else lambda name: contextlib.nullcontext()
        try:
            with ak.value_checks(False):
                for inp in inputs:
                    with region("arpg.model_step"):
                        logits = self._run(buf.index_select(0, inp.in_index), inp, rows, grid)
                    if return_logits:
                        all_logits.append(logits.clone())
                    with region("arpg.sample"):
                        if use_cfg:
                            logits = guide(*logits.chunk(2), inp.cfg)
                        if teacher_tokens is not None:
                            sampled = teacher_tokens.index_select(0, inp.out_index)
                        else:
                            sampled = _sample(logits, inp, temperature, top_k, top_p, generator)
                    buf.index_copy_(0, inp.out_index, sampled)
        finally:
            self.cache.free(seq_ids)
        out = buf[rows:].view(bsz, seq_len)
        return (out, all_logits) if return_logits else out

    def generate(
        self,
        labels: torch.Tensor,
        num_steps: Optional[int] = None,
        schedule: Union[str, Sequence[int]] = "arccos",
        cfg_scale: float = 1.0,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator=None,
        seed=None,
        order=None,
        return_logits: bool = False,
        teacher_tokens: Optional[torch.Tensor] = None,
    ):
        """See `generate`."""
        seq_len = self.model.config.seq_len
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        bsz = labels.shape[0]
        use_cfg = cfg_scale != 1.0
        rows = 2 * bsz if use_cfg else bsz
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows do not fit an engine made for {self.max_rows}")
        gen = make_generators(self.device, bsz, seed, generator)
        if self.raster:
            if num_steps not in (None, seq_len):
                raise ValueError(f"the raster model decodes one token per step: num_steps must be {seq_len}")
            plans = [make_plan(seq_len, seq_len, range(seq_len), [1] * seq_len, cfg_scale, cfg_schedule)] * bsz
        else:
            if num_steps is None:
                raise ValueError("num_steps is required for ARPG")
            orders = draw_orders(seq_len, bsz, self.device, gen, order)
            by_order = {id(o): make_plan(seq_len, num_steps, o, schedule, cfg_scale, cfg_schedule) for o in orders}
            plans = [by_order[id(o)] for o in orders]  # samples sharing an order share its plan
        if teacher_tokens is not None:
            teacher_tokens = teacher_tokens.to(self.device).long().reshape(bsz, seq_len)
        out = self.run(plans, labels, None, None, use_cfg, temperature, top_k, top_p, gen, return_logits,
                       teacher_tokens)
        if not return_logits:
            return out
        # The counts per step depend only on L, num_steps and the schedule: every row has n_s queries.
        out, logits = out
        return out, [x.view(rows, st.n_q, -1) for x, st in zip(logits, plans[0])]


_ENGINES: "weakref.WeakKeyDictionary[torch.nn.Module, Engine]" = weakref.WeakKeyDictionary()


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-sample seeds `seed * 1_000_003 + i` for sample i: passed to `generate` as `seed=`, they make a
    sample's tokens independent of the batch it is drawn in (the digits helpers and `ARPGPipeline`)."""
    return [int(seed) * 1_000_003 + i for i in range(n)]


def generate(
    model: torch.nn.Module,
    labels: torch.Tensor,
    num_steps: Optional[int] = None,
    schedule: Union[str, Sequence[int]] = "arccos",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator=None,
    seed=None,
    use_cuda_graphs: bool = True,
    order=None,
    return_logits: bool = False,
    teacher_tokens: Optional[torch.Tensor] = None,
    page_size: int = 16,
):
    """Generate image tokens for class `labels` [B] (negative = unconditional).

    num_steps: decoding steps (1..L; ignored/L for the raster model). schedule: "arccos", "cosine" or
    an explicit list of tokens per step. cfg_scale != 1 doubles the batch with the no-class id and
    guides `u + (c - u) * scale`; cfg_schedule "linear" ramps the scale as `1 + (g - 1) * done / L`.
    temperature (<= 0: greedy), top_k (0: off) and top_p (1: off) apply per position. Randomness
    (the order and the samples) comes from `generator`, else a generator seeded with `seed`, else
    the global RNG: the same seed gives the same tokens. A list of B generators (or seeds) gives
    every sample its own order and draws, so a sample's tokens do not depend on the rest of the
    batch. order: token indices [L] (one order for the whole batch) or [B, L], drawn if None.
    teacher_tokens [B, L]: feed these instead of samples (scoring and tests). use_cuda_graphs:
    capture each step shape once and replay (CUDA only; ignored on CPU).

    Returns tokens int64 [B, L] in image order, and with return_logits also the list of every step's
    model logits, float32 [R, n_s, V] (R = 2B under CFG: conditional rows first, then unconditional).
    The engine (cache and graphs) is kept with the model and reused by later calls that fit it.
    """
    labels = torch.as_tensor(labels)
    engine = engine_for(model, labels.numel() * (2 if cfg_scale != 1.0 else 1), page_size, use_cuda_graphs)
    return engine.generate(
        labels,
        num_steps,
        schedule=schedule,
        cfg_scale=cfg_scale,
        cfg_schedule=cfg_schedule,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        seed=seed,
        order=order,
        return_logits=return_logits,
        teacher_tokens=teacher_tokens,
    )


def engine_for(
    model: torch.nn.Module, rows: int, page_size: int = 16, use_cuda_graphs: bool = True, seq_len: Optional[int] = None
) -> Engine:
    """The engine kept with `model`, replaced by a fitting one when it is too small or set up otherwise."""
    engine = _ENGINES.get(model)
    if engine is None or not engine.matches(model, rows, page_size, use_cuda_graphs, seq_len):
        _ENGINES.pop(model, None)
        engine = Engine(model, rows, page_size=page_size, use_cuda_graphs=use_cuda_graphs, max_seq_len=seq_len,
                        _weak_model=True)
        _ENGINES[model] = engine
    return engine
