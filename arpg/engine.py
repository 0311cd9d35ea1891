"""Paged decoding engine for ARPG (and the raster baseline, on the same machinery).

A generation is planned in full before the loop: tokens per step from the schedule, the order, every
step's positions, slot mappings, block table, KV lengths and cu_q_lens, all as device tensors. The
loop then only launches work: `model.decode_step` (or the replay of its CUDA graph), guidance, and
sampling. Each sample has its own plan (`make_plan`), so samples may differ in order, in known tokens
fed at the first step (editing, `arpg.edit`) and in tokens per step: rows are packed varlen. On CUDA
each distinct uniform step shape (grid, rows, tokens fed, queries) is captured once as a CUDA graph
with static input buffers and replayed, in this and later generations of the same engine. On the CPU
the whole loop, sampling included, is one op where the model offers it (`decode_loop`, `_run_loop`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch.profiler import record_function

import arpg_kernels as ak
from arpg_kernels.cache import int_tensor

from .model import GUIDED_HEAD, LoopStep, PagedBatch, guided_head_enabled
from .sampling import cfg_scales, draw_uniforms, make_generators, sample, token_schedule

__all__ = [
    "CacheBudgetError",
    "Engine",
    "Step",
    "check_labels",
    "draw_order",
    "draw_orders",
    "engine_for",
    "generate",
    "generation_plans",
    "make_plan",
    "model_engine",
    "sample_seeds",
    "set_cache_budget",
]


class CacheBudgetError(ValueError):
    """A request cannot run within a cache budget (`max_cache_bytes`) even one sample at a time."""



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


def check_labels(model, labels, bsz: Optional[int] = None) -> torch.Tensor:
    """Class labels as int64 [B] on the host side of the check: integers < num_classes (negative: no
    class). A single label is broadcast to `bsz` when given; otherwise the batch is len(labels)."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class labels, got dtype {labels.dtype}")
    labels = labels.long().reshape(-1)
    if bsz is not None:
        if labels.numel() == 1:
            labels = labels.expand(bsz)
        if labels.numel() != bsz:
            raise ValueError(f"labels has {labels.numel()} entries for a batch of {bsz}")
    n = model.config.num_classes
    if labels.numel() and int(labels.max()) >= n:
        raise ValueError(f"labels must be < num_classes = {n} (negative: no class), got {int(labels.max())}")
    return labels


def generation_plans(
    model, bsz: int, num_steps, schedule, cfg_scale: float, cfg_schedule: str, generator, order
) -> list[list[Step]]:
    """The plans of `generate` for B samples (ARPG: random or given orders; raster: one token per step).

    generator: the result of `make_generators` (None, one generator, or B of them); the orders are drawn
    from it here, before any token, as `generate` does.
    """
    seq_len = model.config.seq_len
    device = next(model.parameters()).device
    if getattr(model, "decode_order", "random") == "raster":
        if num_steps not in (None, seq_len):
            raise ValueError(f"the raster model decodes one token per step: num_steps must be {seq_len}")
        return [make_plan(seq_len, seq_len, range(seq_len), [1] * seq_len, cfg_scale, cfg_schedule)] * bsz
    if num_steps is None:
        raise ValueError("num_steps is required for ARPG")
    if isinstance(schedule, str) and (not isinstance(num_steps, int) or isinstance(num_steps, bool)
                                      or not 1 <= num_steps <= seq_len):
        raise ValueError(f"num_steps must be an int in [1, {seq_len}], got {num_steps!r}")
    orders = draw_orders(seq_len, bsz, device, generator, order)
    by_order = {id(o): make_plan(seq_len, num_steps, o, schedule, cfg_scale, cfg_schedule) for o in orders}
    return [by_order[id(o)] for o in orders]  # samples sharing an order share its plan


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
    """A CUDA graph of `model.decode_step` for one step shape, with static input buffers.

    The shape is (rows, packed tokens fed, packed queries, longest row of each): `Engine` captures its
    uniform steps, `GenerationQueue` its varlen steps padded to buckets; cu_in / cu_q are loaded with
    the rest, so one graph serves every step of its shape.
    """

    def __init__(self, rows: int, t_in: int, t_q: int, max_in: int, max_q: int, max_pages: int, device):
        def z(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens = z(t_in)
        self.pos_in = z(t_in)
        self.pos_q = z(t_q)
        self.batch = PagedBatch(
            slot_mapping=z(t_in),
            block_table=z(rows, max_pages, dtype=torch.int32),
            kv_lens=z(rows, dtype=torch.int32),
            cu_in=z(rows + 1, dtype=torch.int32),
            cu_q=z(rows + 1, dtype=torch.int32),
            max_in=max_in,
            max_q=max_q,
        )
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[torch.Tensor] = None

    def load(self, tokens: torch.Tensor, pos_in: torch.Tensor, pos_q: torch.Tensor, batch: PagedBatch) -> None:
        self.tokens.copy_(tokens)
        self.pos_in.copy_(pos_in)
        self.pos_q.copy_(pos_q)
        for name in ("slot_mapping", "block_table", "kv_lens", "cu_in", "cu_q"):
            getattr(self.batch, name).copy_(getattr(batch, name))

    def capture(self, model, cache, pool, kwargs) -> None:
        # The warm-up writes this step's real K/V (the replay writes the same values again).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.decode_step(self.tokens, self.pos_in, self.pos_q, cache, self.batch, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (other engines, the caller's own work) may use CUDA meanwhile.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = model.decode_step(self.tokens, self.pos_in, self.pos_q, cache, self.batch, **kwargs)

    def __call__(self, tokens: torch.Tensor, pos_in: torch.Tensor, pos_q: torch.Tensor, batch: PagedBatch):
        self.load(tokens, pos_in, pos_q, batch)
        self.graph.replay()
        return self.out


def _graph_step(graphs: dict, key, model, cache, pool, max_pages, device, tokens, pos_in, pos_q, batch, kwargs):
    """Replay the graph of `key` (captured from these inputs the first time) and return its logits."""
    runner = graphs.get(key)
    if runner is None:
        runner = _GraphStep(batch.kv_lens.shape[0], tokens.shape[0], pos_q.shape[0], batch.max_in, batch.max_q,
                            max_pages, device)
        runner.load(tokens, pos_in, pos_q, batch)
        runner.capture(model, cache, pool, kwargs)
        graphs[key] = runner
    return runner(tokens, pos_in, pos_q, batch)


def _sample(logits, q_counts, temperature, top_k, top_p, generator, uncond=None, cfg=None) -> torch.Tensor:
    """Sample every query (guided by uncond and cfg [T_q, 1] when given) in one op; with a list of
    generators each sample (q_counts[i] queries) draws its uniforms from its own."""
    uniforms = None
    if isinstance(generator, (list, tuple)):
        if temperature > 0:
            uniforms = torch.cat([draw_uniforms(n, g, logits.device) for g, n in zip(generator, q_counts)])
        generator = None
    return sample(logits, temperature, top_k, top_p, generator, uncond=uncond, cfg_scale=cfg, uniforms=uniforms)


def _loop_goes_with_step(model) -> bool:
    """Whether the model's `decode_loop` runs its `decode_step`. A `decode_loop` that names the `decode_step` it
    replays (`decode_loop.decode_step`, as ARPG's and RasterLM's do) goes with exactly that one: not where
    `decode_step` was replaced, on the instance, in a subclass or on the class itself. Else it goes with the
    `decode_step` of its own class or a base of it. A `decode_loop` set on the instance is the caller's own."""
    if "decode_loop" in vars(model):
        return True
    if "decode_step" in vars(model):
        return False
    cls = type(model)
    replays = getattr(cls.decode_loop, "decode_step", None)
    if replays is not None:
        return cls.decode_step is replays
    loop_owner = next(c for c in cls.__mro__ if "decode_loop" in vars(c))
    step_owner = next(c for c in cls.__mro__ if "decode_step" in vars(c))
    return issubclass(loop_owner, step_owner)


def _step_uniforms(q_counts, temperature, generator, device) -> list[torch.Tensor]:
    """Every step's uniforms as `_sample` draws them step after step: float64 [sum(q_counts[s])] per step s
    (q_counts[s]: queries per sample); zeros when greedy, as `sample`'s. Each random stream (a generator, or
    the global RNG for None) is drawn in one call and its numbers dealt out in the order the steps would
    draw them: step after step, and within a step sample after sample, where samples share a stream. A CPU
    stream's float64 draws come one after another, so one call gives the numbers of one call per step; on
    other devices the draws are made as `_sample` makes them, one call per step (and sample)."""
    totals = [sum(q) for q in q_counts]
    if temperature <= 0:
        return [torch.zeros(n, dtype=torch.float64, device=device) for n in totals]
    if torch.device(device).type != "cpu":  # other generators (CUDA's Philox) round their offset per call
        gens = generator if isinstance(generator, (list, tuple)) else None
        return [torch.cat([draw_uniforms(n, g, device) for g, n in zip(gens, q)]) if gens else
                draw_uniforms(sum(q), generator, device) for q in q_counts]
    if not isinstance(generator, (list, tuple)):
        return list(draw_uniforms(sum(totals), generator, device).split(totals))
    # The global RNG is one stream whether named None or by its generator object.
    default = torch.default_generator
    streams = [default if g is None else g for g in generator]
    keys = [id(g) for g in streams]
    need: dict[int, int] = {}
    for q in q_counts:
        for key, n in zip(keys, q):
            need[key] = need.get(key, 0) + n
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    drawn = {key: draw_uniforms(n, generator[first[key]], device) for key, n in need.items()}
    taken = dict.fromkeys(need, 0)
    out = []
    for q in q_counts:
        parts = []
        for key, n in zip(keys, q):
            parts.append(drawn[key][taken[key] : taken[key] + n])
            taken[key] += n
        out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device))
    return out


def _row_bytes(model, page_size: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Cache bytes one sequence (row) of `Engine` takes: its pages in every cache layer, K and V."""
    cfg = model.config
    pages = math.ceil((max_seq_len + 1) / page_size)
    return 2 * model.num_cache_layers * pages * page_size * cfg.n_head * cfg.head_dim * dtype.itemsize


class Engine:
    """Owns a paged KV cache (and CUDA graphs) sized for up to `max_rows` sequences of one model.

    A row is one sequence in the cache: with classifier-free guidance a batch of B images uses 2B rows.
    max_seq_len: image tokens per sequence the cache holds (default the model's grid_size**2; larger
    for resolution expansion). The model's weights are used in place. `model` is an `ARPG` or a
    `RasterLM` (any module with `config`, `num_cache_layers` and `decode_step`; `decode_order =
    "raster"` selects one token per step; a `decode_step` without the `guidance` argument gets its logits
    guided in the sampler; an optional `decode_loop`, as `ARPG.decode_loop`, runs a whole generation).

    max_cache_bytes: a cap on the cache's bytes (K and V pools). The engine then holds as many rows as
    fit (at most `max_rows` when that is given too), and a batch with more rows runs in chunks of whole
    samples, one after another: with per-sample generators (a list of seeds) the tokens are those of
    the unchunked batch; with one generator for the batch, the chunks draw from it in turn. A sample
    that does not fit alone (2 rows under guidance) raises `CacheBudgetError`. Without a cap a batch
    over `max_rows` raises ValueError.

    Every generation runs per-sample plans (`run`): samples may feed and predict different numbers of
    tokens per step (packed varlen rows, `cu_in` / `cu_q`). Steps where every row has the same shape
    (all of `generate`, and edits whose samples share a mask) replay CUDA graphs; other steps launch
    directly, as their shapes rarely recur. `run` (and so `generate`) holds the engine's lock: threads
    sharing an engine take turns.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_rows: Optional[int] = None,
        page_size: int = 16,
        use_cuda_graphs: bool = True,
        max_seq_len: Optional[int] = None,
        max_cache_bytes: Optional[int] = None,
        _weak_model: bool = False,
    ):
        param = next(model.parameters())
        cfg = model.config
        try:
            self._step_takes_guidance = "guidance" in inspect.signature(model.decode_step).parameters
        except (TypeError, ValueError):  # a callable without a signature
            self._step_takes_guidance = False
        # `generate` keeps its engines in a weak-keyed table, so those must not keep the model alive.
        self._model = weakref.ref(model) if _weak_model else (lambda: model)
        self.device, self.dtype = param.device, param.dtype
        self.page_size = int(page_size)
        self.max_seq_len = cfg.seq_len if max_seq_len is None else int(max_seq_len)
        # A sequence holds at most the class token and L - 1 image tokens.
        self.pages_per_seq = math.ceil((self.max_seq_len + 1) / page_size)
        self.row_bytes = _row_bytes(model, self.page_size, self.max_seq_len, self.dtype)
        self.max_cache_bytes = None if max_cache_bytes is None else int(max_cache_bytes)
        if self.max_cache_bytes is None:
            if max_rows is None:
                raise ValueError("Engine needs max_rows, max_cache_bytes or both")
            self.max_rows = int(max_rows)
        else:
            fit = self.max_cache_bytes // self.row_bytes
            if fit < 1:
                raise CacheBudgetError(
                    f"a cache budget of {self.max_cache_bytes:,} bytes holds no sequence: one sequence of "
                    f"{self.max_seq_len} tokens takes {self.row_bytes:,} bytes ({self.dtype}, page size {page_size})")
            self.max_rows = fit if max_rows is None else min(int(max_rows), fit)
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
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
        self._lock = threading.RLock()

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    @property
    def raster(self) -> bool:
        return getattr(self.model, "decode_order", "random") == "raster"

    def matches(self, model, rows: int, page_size: int, use_cuda_graphs: bool, seq_len: Optional[int] = None,
                max_cache_bytes: Optional[int] = None) -> bool:
        """Whether this engine serves `rows` rows of `model` set up so (a budgeted engine: when its
        budget is the same and it holds the rows, or all the rows the budget allows)."""
        param = next(model.parameters())
        if max_cache_bytes is not None:
            max_cache_bytes = int(max_cache_bytes)
            fits = rows <= self.max_rows or self.max_rows == max_cache_bytes // self.row_bytes
        else:
            fits = rows <= self.max_rows
        return (
            model is self.model
            and fits
            and max_cache_bytes == self.max_cache_bytes
            and (model.config.seq_len if seq_len is None else seq_len) <= self.max_seq_len
            and page_size == self.page_size
            and (bool(use_cuda_graphs) and param.device.type == "cuda") == self.use_cuda_graphs
            and (param.device, param.dtype) == (self.device, self.dtype)
        )

    def chunk_samples(self, use_cfg: bool) -> int:
        """Samples one pass of this engine holds (with guidance each takes two rows)."""
        return self.max_rows // (2 if use_cfg else 1)

    def _check_fits(self, bsz: int, use_cfg: bool) -> None:
        rows = 2 * bsz if use_cfg else bsz
        if rows <= self.max_rows:
            return
        if self.max_cache_bytes is None:
            raise ValueError(f"{rows} rows do not fit an engine made for {self.max_rows}")
        if self.chunk_samples(use_cfg) == 0:
            raise CacheBudgetError(
                f"one sample needs {2 if use_cfg else 1} cache rows of {self.row_bytes:,} bytes (with guidance: "
                f"{'yes' if use_cfg else 'no'}) but the cache budget of {self.max_cache_bytes:,} bytes holds "
                f"{self.max_rows}")

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

        # Token p > 0 of row r sits at rows + (r % B) * seq_len + p - 1 (`tail[r % B] + p`), position 0 at r.
        tail = [rows + b * seq_len - 1 for b in range(bsz)]
        # One host-to-device copy for all indices and positions, one for the queries' prefix sums, one for the
        # scales, then views.
        flat, spans, scales, cu_q = [], [], [], []
        for st in by_step:
            rows_st = [st[r % bsz] for r in range(rows)]
            parts = (
                [tail[r % bsz] + p if p else r for r, x in enumerate(rows_st) for p in x.pos_in],
                [p for x in rows_st for p in x.pos_in],
                [t + 1 for x in rows_st for t in x.targets],
                [tail[b] + t + 1 for b, x in enumerate(st) for t in x.targets],
            )
            for part in parts:
                spans.append((len(flat), len(part)))
                flat.extend(part)
            cu_q.append([0, *itertools.accumulate(x.n_q for x in rows_st)])
            scales.extend(x.cfg for x in st for _ in x.targets)
        flat_t = int_tensor(flat, torch.int64, self.device)
        views = [flat_t[a : a + n] for a, n in spans]
        cu_q = torch.tensor(cu_q, dtype=torch.int32, device=self.device)  # [steps, rows + 1]
        scales_t = torch.tensor(scales, dtype=torch.float32, device=self.device)[:, None]

        inputs, done = [], 0
        for i, (st, plan) in enumerate(zip(by_step, cache_plans)):
            q_counts = tuple(x.n_q for x in st)
            batch = PagedBatch(
                slot_mapping=plan.slot_mapping,
                block_table=block_table,
                kv_lens=plan.kv_lens,
                cu_in=plan.cu_new,
                cu_q=cu_q[i],
                max_in=max(plan.num_new),
                max_q=max(q_counts),
            )
            uniform = len(set(plan.num_new)) == 1 and len(set(q_counts)) == 1
            in_index, pos_in, pos_q, out_index = views[4 * i : 4 * i + 4]
            inputs.append(
                _StepInputs(in_index, pos_in, pos_q, out_index, scales_t[done : done + sum(q_counts)], q_counts,
                            uniform, batch, causal=i == 0 and max(plan.num_new) > 1)
            )
            done += sum(q_counts)
        return seq_ids, inputs

    def _run(self, tokens: torch.Tensor, inp: _StepInputs, rows: int, grid, guided: bool = False) -> torch.Tensor:
        """The step's logits; guided: the guided logits of the conditional queries (`arpg.model.head_logits`),
        never from a CUDA graph (`_guided`)."""
        b = inp.batch
        kwargs = {} if grid is None else {"grid": grid}
        if inp.causal:
            kwargs["causal"] = True
        if guided:
            kwargs["guidance"] = inp.cfg
        if not (self.use_cuda_graphs and inp.uniform):
            return self.model.decode_step(tokens, inp.pos_in, inp.pos_q, self.cache, b, **kwargs)
        assert not guided, "a CUDA graph step takes no guidance"  # _guided keeps CUDA out of GUIDED_HEAD
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        key = (grid, rows, b.max_in, b.max_q, inp.causal)
        return _graph_step(self._graphs, key, self.model, self.cache, self._pool, self.pages_per_seq, self.device,
                           tokens, inp.pos_in, inp.pos_q, b, kwargs)

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
        labels = check_labels(model, labels).to(self.device)
        bsz = labels.shape[0]
        g = model.config.grid_size
        grid = None if grid is None or tuple(grid) == (g, g) else (int(grid[0]), int(grid[1]))
        seq_len = g * g if grid is None else grid[0] * grid[1]
        if len(plans) != bsz:
            raise ValueError(f"{len(plans)} plans for {bsz} labels")
        if seq_len > self.max_seq_len:
            raise ValueError(f"{seq_len} tokens per image do not fit an engine made for {self.max_seq_len}")
        self._check_fits(bsz, use_cfg)
        if isinstance(generator, (list, tuple)) and len(generator) != bsz:
            raise ValueError(f"generator has {len(generator)} entries for a batch of {bsz}")
        with self._lock:
            per = self.chunk_samples(use_cfg)
            if bsz <= per:
                return self._run_plans(plans, labels, tokens, grid, seq_len, use_cfg, temperature, top_k, top_p,
                                       generator, return_logits, teacher_tokens)
            outs, logits = [], []
            for a in range(0, bsz, per):
                part = slice(a, a + per)
                out = self._run_plans(
                    plans[part], labels[part], None if tokens is None else tokens[part], grid, seq_len, use_cfg,
                    temperature, top_k, top_p, generator[part] if isinstance(generator, (list, tuple)) else generator,
                    return_logits, None if teacher_tokens is None else teacher_tokens[part])
                if return_logits:
                    out, chunk_logits = out
                    logits.append(chunk_logits)
                outs.append(out)
            out = torch.cat(outs)
            return (out, _merge_chunk_logits(logits, use_cfg)) if return_logits else out

    def _run_plans(self, plans, labels, tokens, grid, seq_len, use_cfg, temperature, top_k, top_p, generator,
                   return_logits, teacher_tokens):
        model = self.model
        bsz = labels.shape[0]
        rows = 2 * bsz if use_cfg else bsz
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
        guided = use_cfg and self._guided() and not return_logits and teacher_tokens is None
        all_logits = []
        # Named regions for torch.profiler (arpg-bench's step breakdown), entered only while it records.
        region = record_function if torch.autograd._profiler_enabled() else lambda name: contextlib.nullcontext()
        try:
            with ak.value_checks(False):
                in_one_op = (not return_logits and teacher_tokens is None and (guided or not use_cfg)
                             and self._run_loop(buf, inputs, grid, guided, temperature, top_k, top_p, generator))
                for inp in () if in_one_op else inputs:
                    with region("arpg.model_step"):
                        logits = self._run(buf.index_select(0, inp.in_index), inp, rows, grid, guided)
                    if return_logits:
                        all_logits.append(logits.clone())
                    with region("arpg.sample"):
                        if teacher_tokens is not None:
                            sampled = teacher_tokens.index_select(0, inp.out_index)
                        elif guided:
                            sampled = _sample(logits, inp.q_counts, temperature, top_k, top_p, generator)
                        elif use_cfg:
                            cond, uncond = logits.chunk(2)
                            sampled = _sample(cond, inp.q_counts, temperature, top_k, top_p, generator, uncond,
                                              inp.cfg)
                        else:
                            sampled = _sample(logits, inp.q_counts, temperature, top_k, top_p, generator)
                    buf.index_copy_(0, inp.out_index, sampled)
        finally:
            self.cache.free(seq_ids)
        out = buf[rows:].view(bsz, seq_len)
        return (out, all_logits) if return_logits else out

    def _run_loop(self, buf, inputs, grid, guided, temperature, top_k, top_p, generator) -> bool:
        """Every step and its sampling in one call where the model has one that applies (`decode_loop`; on the
        CPU `arpg.model.cpu_decode_loop`), the same ops and draws as the loop of `_run_plans`; False where it
        does not, having drawn and changed nothing."""
        loop = getattr(self.model, "decode_loop", None)
        if loop is None or not _loop_goes_with_step(self.model):
            return False
        steps = [LoopStep(inp.in_index, inp.pos_in, inp.pos_q, inp.out_index, inp.batch, inp.causal,
                          inp.cfg if guided else None) for inp in inputs]

        def draw():
            return _step_uniforms([inp.q_counts for inp in inputs], temperature, generator, self.device)

        kwargs = {} if grid is None else {"grid": grid}
        return loop(buf, steps, self.cache, draw, temperature, top_k, top_p, **kwargs)

    def _guided(self) -> bool:
        """Whether guided steps mix the guidance before the head (`arpg.model.GUIDED_HEAD`, `guided_head`)."""
        return (self.device.type in GUIDED_HEAD and not self.use_cuda_graphs and self._step_takes_guidance
                and guided_head_enabled())

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
        labels = check_labels(self.model, labels).to(self.device)
        bsz = labels.shape[0]
        use_cfg = cfg_scale != 1.0
        self._check_fits(bsz, use_cfg)
        gen = make_generators(self.device, bsz, seed, generator)
        if teacher_tokens is not None:
            teacher_tokens = teacher_tokens.to(self.device).long().reshape(bsz, seq_len)
        with self._lock:  # the orders are drawn from `gen` in the same turn as the tokens
            plans = generation_plans(self.model, bsz, num_steps, schedule, cfg_scale, cfg_schedule, gen, order)
            out = self.run(plans, labels, None, None, use_cfg, temperature, top_k, top_p, gen, return_logits,
                           teacher_tokens)
        if not return_logits:
            return out
        # The counts per step depend only on L, num_steps and the schedule: every row has n_s queries.
        out, logits = out
        rows = 2 * bsz if use_cfg else bsz
        return out, [x.view(rows, st.n_q, -1) for x, st in zip(logits, plans[0])]


def _merge_chunk_logits(chunks: list[list[torch.Tensor]], use_cfg: bool) -> list[torch.Tensor]:
    """The packed per-step logits of a batch run in chunks, as the unchunked run packs them: every
    chunk's conditional queries, then (under guidance) every chunk's unconditional ones."""
    out = []
    for s in range(max(len(c) for c in chunks)):
        parts = [c[s] for c in chunks if s < len(c)]
        if use_cfg:
            halves = [p.chunk(2) for p in parts]
            parts = [h[0] for h in halves] + [h[1] for h in halves]
        out.append(torch.cat(parts))
    return out


# The engine kept with each model, the model's cache budget, and the lock under which callers of
# `generate` and the edits pick (or replace) and use that engine: concurrent calls on one model take
# turns, so none can take the pages another reserved; calls on different models run side by side.
_ENGINES: "weakref.WeakKeyDictionary[torch.nn.Module, Engine]" = weakref.WeakKeyDictionary()
_BUDGETS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _model_lock(model: torch.nn.Module) -> threading.RLock:
    with _TABLES_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def set_cache_budget(model: torch.nn.Module, max_cache_bytes: Optional[int]) -> None:
    """Cap the KV cache that `generate`, `inpaint`, `outpaint` and `expand` keep for `model` at
    `max_cache_bytes` (None: no cap, the default). Larger batches then run in chunks that fit (see
    `Engine`); a sample that cannot fit alone raises `CacheBudgetError` naming the budget and its need."""
    if max_cache_bytes is not None and (not isinstance(max_cache_bytes, int) or isinstance(max_cache_bytes, bool)
                                        or max_cache_bytes < 1):
        raise ValueError(f"max_cache_bytes must be a positive int or None, got {max_cache_bytes!r}")
    with _model_lock(model):
        if max_cache_bytes is None:
            _BUDGETS.pop(model, None)
        else:
            _BUDGETS[model] = max_cache_bytes
        _ENGINES.pop(model, None)  # the next call makes an engine within the new budget


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
    The engine (cache and graphs) is kept with the model and reused by later calls that fit it; calls
    from several threads on one model take turns on it (each gets the tokens it would get alone), and
    `set_cache_budget` caps its memory. For many concurrent requests, `GenerationQueue` batches them.
    """
    labels = torch.as_tensor(labels)
    rows = labels.numel() * (2 if cfg_scale != 1.0 else 1)
    with model_engine(model, rows, page_size, use_cuda_graphs) as engine:
        return engine.generate(labels, num_steps, schedule=schedule, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                               temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, seed=seed,
                               order=order, return_logits=return_logits, teacher_tokens=teacher_tokens)


def engine_for(
    model: torch.nn.Module, rows: int, page_size: int = 16, use_cuda_graphs: bool = True, seq_len: Optional[int] = None
) -> Engine:
    """The engine kept with `model`, replaced by a fitting one when it is too small or set up otherwise.

    Callers that run on it from several threads hold `model_engine` instead, which also takes the lock."""
    with _model_lock(model):
        budget = _BUDGETS.get(model)
        engine = _ENGINES.get(model)
        if engine is None or not engine.matches(model, rows, page_size, use_cuda_graphs, seq_len, budget):
            _ENGINES.pop(model, None)
            del engine  # the old cache is released before the new one is made
            engine = Engine(model, rows, page_size=page_size, use_cuda_graphs=use_cuda_graphs, max_seq_len=seq_len,
                            max_cache_bytes=budget, _weak_model=True)
            _ENGINES[model] = engine
        return engine


@contextlib.contextmanager
def model_engine(model: torch.nn.Module, rows: int, page_size: int = 16, use_cuda_graphs: bool = True,
                 seq_len: Optional[int] = None):
    """`engine_for` with the model's lock held until the block ends (one caller at a time per model)."""
    with _model_lock(model):
        yield engine_for(model, rows, page_size, use_cuda_graphs, seq_len)
