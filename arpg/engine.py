"""Paged decoding engine for ARPG (and the raster baseline, on the same machinery).

A generation is planned in full before the loop: tokens per step from the schedule, the order, every
step's positions, slot mappings, block table, KV lengths and cu_q_lens, all as device tensors. The
loop then only launches work: `model.decode_step` (or the replay of its CUDA graph), guidance, and
sampling. On CUDA each distinct step shape (rows, tokens fed, queries) is captured once as a CUDA
graph with static input buffers and replayed, in this and later generations of the same engine.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

import arpg_kernels as ak

from .model import PagedBatch
from .sampling import cfg_scales, make_generator, sample, token_schedule

__all__ = ["Step", "make_plan", "draw_order", "Engine", "generate"]


@dataclass(frozen=True)
class Step:
    """One decoding step (host values).

    pos_in: content positions of the tokens fed (0 = class token, p = token p - 1);
    targets: token indices (0..L-1) predicted by this step, whose query positions are targets + 1;
    kv_len: cache length per sequence after the step; cfg: guidance scale of the step.
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
) -> list[Step]:
    """The steps of a generation that predicts `order` (token indices) in schedule-sized groups.

    Step s feeds the tokens step s-1 predicted (step 0 the class token) and predicts the next n_s of
    the order. Steps with n_s = 0 (only possible in an explicit list of counts) are dropped: running
    one would only move the feeding of the previous tokens one step later, with the same keys, values
    and logits.
    """
    counts = token_schedule(num_steps, seq_len, schedule)
    scales = cfg_scales(counts, seq_len, cfg_scale, cfg_schedule)
    order = [int(i) for i in order]
    if sorted(order) != list(range(seq_len)):
        raise ValueError(f"order must be a permutation of 0..{seq_len - 1}")
    steps, done, pos_in, kv_len = [], 0, (0,), 0
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


@dataclass
class _StepInputs:
    pos_in: torch.Tensor  # int64 [R * n_in]
    pos_q: torch.Tensor  # int64 [R * n_q]
    targets: torch.Tensor  # int64 [n_q]
    batch: PagedBatch


class _GraphStep:
    """A CUDA graph of `model.decode_step` for one step shape, with static input buffers."""

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

    def capture(self, model, cache, pool) -> None:
        # The warm-up writes this step's real K/V (the replay writes the same values again).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.decode_step(self.tokens, self.pos_in, self.pos_q, cache, self.batch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = model.decode_step(self.tokens, self.pos_in, self.pos_q, cache, self.batch)

    def __call__(self, tokens: torch.Tensor, inp: _StepInputs) -> torch.Tensor:
        self.load(tokens, inp)
        self.graph.replay()
        return self.out


class Engine:
    """Owns a paged KV cache (and CUDA graphs) sized for up to `max_rows` sequences of one model.

    A row is one sequence in the cache: with classifier-free guidance a batch of B images uses 2B rows.
    The model's weights are used in place. `model` is an `ARPG` or a `RasterLM` (any module with
    `config`, `num_cache_layers` and `decode_step`; `decode_order = "raster"` selects one token per step).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_rows: int,
        page_size: int = 16,
        use_cuda_graphs: bool = True,
        _weak_model: bool = False,
    ):
        param = next(model.parameters())
        cfg = model.config
        # `generate` keeps its engines in a weak-keyed table, so those must not keep the model alive.
        self._model = weakref.ref(model) if _weak_model else (lambda: model)
        self.device, self.dtype = param.device, param.dtype
        self.max_rows = int(max_rows)
        self.page_size = int(page_size)
        # A sequence holds at most the class token and L - 1 image tokens.
        self.pages_per_seq = math.ceil((cfg.seq_len + 1) / page_size)
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
        self._graphs: dict[tuple[int, int, int], _GraphStep] = {}
        self._pool = None

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    @property
    def raster(self) -> bool:
        return getattr(self.model, "decode_order", "random") == "raster"

    def matches(self, model, rows: int, page_size: int, use_cuda_graphs: bool) -> bool:
        param = next(model.parameters())
        return (
            model is self.model
            and rows <= self.max_rows
            and page_size == self.page_size
            and (bool(use_cuda_graphs) and param.device.type == "cuda") == self.use_cuda_graphs
            and (param.device, param.dtype) == (self.device, self.dtype)
        )

    def _prepare(self, steps: list[Step], rows: int):
        """Reserve the whole generation in the cache and build every step's device tensors."""
        seq_ids = self.cache.add_sequences(rows)
        try:
            plans = self.cache.plan(seq_ids, [st.n_in for st in steps])
            block_table = self.cache.block_table(seq_ids, self.pages_per_seq)
        except Exception:
            self.cache.free(seq_ids)
            raise
        # One host-to-device copy for all positions and targets, then views per step.
        flat, spans = [], []
        for st in steps:
            for part in (st.pos_in * rows, tuple(t + 1 for t in st.targets) * rows, st.targets):
                spans.append((len(flat), len(part)))
                flat.extend(part)
        flat_t = torch.tensor(flat, dtype=torch.int64, device=self.device)
        views = [flat_t[a : a + n] for a, n in spans]
        cu_q: dict[int, torch.Tensor] = {}
        inputs = []
        for i, (st, plan) in enumerate(zip(steps, plans)):
            if st.n_q not in cu_q:
                cu_q[st.n_q] = torch.arange(0, rows * st.n_q + 1, st.n_q, dtype=torch.int32, device=self.device)
            batch = PagedBatch(
                slot_mapping=plan.slot_mapping,
                block_table=block_table,
                kv_lens=plan.kv_lens,
                cu_in=plan.cu_new,
                cu_q=cu_q[st.n_q],
                max_in=st.n_in,
                max_q=st.n_q,
            )
            inputs.append(_StepInputs(views[3 * i], views[3 * i + 1], views[3 * i + 2], batch))
        return seq_ids, inputs

    def _run(self, tokens: torch.Tensor, inp: _StepInputs, rows: int) -> torch.Tensor:
        b = inp.batch
        if not self.use_cuda_graphs:
            return self.model.decode_step(tokens, inp.pos_in, inp.pos_q, self.cache, b)
        key = (rows, b.max_in, b.max_q)
        runner = self._graphs.get(key)
        if runner is None:
            runner = _GraphStep(rows, b.max_in, b.max_q, self.pages_per_seq, self.device)
            runner.load(tokens, inp)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            runner.capture(self.model, self.cache, self._pool)
            self._graphs[key] = runner
        return runner(tokens, inp)

    @torch.inference_mode()
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
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        order=None,
        return_logits: bool = False,
        teacher_tokens: Optional[torch.Tensor] = None,
    ):
        """See `generate`."""
        model, cfg = self.model, self.model.config
        seq_len = cfg.seq_len
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        bsz = labels.shape[0]
        use_cfg = cfg_scale != 1.0
        rows = 2 * bsz if use_cfg else bsz
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows do not fit an engine made for {self.max_rows}")
        gen = make_generator(self.device, seed, generator)
        if self.raster:
            if num_steps not in (None, seq_len):
                raise ValueError(f"the raster model decodes one token per step: num_steps must be {seq_len}")
            steps = make_plan(seq_len, seq_len, range(seq_len), [1] * seq_len, cfg_scale, cfg_schedule)
        else:
            if num_steps is None:
                raise ValueError("num_steps is required for ARPG")
            steps = make_plan(seq_len, num_steps, draw_order(seq_len, self.device, gen, order), schedule,
                              cfg_scale, cfg_schedule)
        if teacher_tokens is not None:
            teacher_tokens = teacher_tokens.to(self.device).long().reshape(bsz, seq_len)

        seq_ids, inputs = self._prepare(steps, rows)
        out = torch.zeros(bsz, seq_len, dtype=torch.long, device=self.device)
        all_logits = []
        cls = model.class_ids(labels)
        tokens = torch.cat([cls, torch.full_like(cls, cfg.null_class_id)]) if use_cfg else cls
        try:
            with ak.value_checks(False):
                for st, inp in zip(steps, inputs):
                    logits = self._run(tokens, inp, rows).view(rows, st.n_q, -1)
                    if return_logits:
                        all_logits.append(logits.clone())
                    if use_cfg:
                        cond, uncond = logits[:bsz], logits[bsz:]
                        logits = uncond + (cond - uncond) * st.cfg
                    if teacher_tokens is not None:
                        sampled = teacher_tokens.index_select(1, inp.targets)
                    else:
                        sampled = sample(logits, temperature, top_k, top_p, gen)
                    out.index_copy_(1, inp.targets, sampled)
                    tokens = (sampled.repeat(2, 1) if use_cfg else sampled).reshape(-1)
        finally:
            self.cache.free(seq_ids)
        return (out, all_logits) if return_logits else out


_ENGINES: "weakref.WeakKeyDictionary[torch.nn.Module, Engine]" = weakref.WeakKeyDictionary()


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
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
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
    the global RNG: the same seed gives the same tokens. order: token indices (one order for the
    whole batch), drawn if None. teacher_tokens [B, L]: feed these instead of samples (scoring and
    tests). use_cuda_graphs: capture each step shape once and replay (CUDA only; ignored on CPU).

    Returns tokens int64 [B, L] in image order, and with return_logits also the list of every step's
    model logits, float32 [R, n_s, V] (R = 2B under CFG: conditional rows first, then unconditional).
    The engine (cache and graphs) is kept with the model and reused by later calls that fit it.
    """
    labels = torch.as_tensor(labels)
    rows = labels.numel() * (2 if cfg_scale != 1.0 else 1)
    engine = _ENGINES.get(model)
    if engine is None or not engine.matches(model, rows, page_size, use_cuda_graphs):
        _ENGINES.pop(model, None)
        engine = Engine(model, rows, page_size=page_size, use_cuda_graphs=use_cuda_graphs, _weak_model=True)
        _ENGINES[model] = engine
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
