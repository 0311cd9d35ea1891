"""`GenerationQueue`: many callers, one model, continuous batching on the paged KV cache.

Callers `submit` requests (class labels, steps, guidance, seed, ...) and get futures. One worker thread
owns an `Engine`'s cache and runs one packed decoding step at a time over every running request. At each
step boundary it retires the requests that finished (their pages go back to the free list at once),
drops cancelled ones, and admits waiting requests, first come first served, while their rows and pages
fit. Requests at different steps, with different step counts, guidance on or off, share one varlen step
(`cu_in` / `cu_q`, per-row KV lengths): the rows of all requests' conditional samples, then the
unconditional rows of those under guidance.

Same tokens as alone: a request is planned at `submit` exactly as `generate` plans it (its own generator
or generators, its orders drawn first), its samples advance together, and each step samples its guided
logits with one draw over the request's queries (or one per sample with a list of seeds), as `generate`
does. Every row's arithmetic is that row's alone (the kernels attend per sequence; norms and matmuls
are row-wise), so a request gets the tokens `generate(model, labels, ...)` gives it with the same seed.
One caveat, as for any batch-size change (chunks, per-sample seeds in a larger batch): a matmul's
blocking can depend on the number of rows, so a logit may differ from the lone run's in its last bits
(measured on the CPU: up to 2e-6), which changes a token only when a draw falls within that margin of a
tie (never seen in the tests, which compare every token).

CUDA graphs: on CUDA each step is padded to a bucket (rows, packed tokens fed, packed queries, and the
longest row of each, rounded up to powers of two; the padding is one extra row with no keys whose token
writes are skipped, slot -1) and replayed from a graph captured once per bucket, up to `max_graphs`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

import arpg_kernels as ak

from .engine import Engine, Step, _graph_step, _sample, check_labels, generation_plans
from .model import PagedBatch
from .sampling import make_generators

__all__ = ["GenerationQueue", "QueueClosedError", "QueueFullError", "RequestError"]


class RequestError(ValueError):
    """A request `GenerationQueue.submit` refused (bad labels, steps, sizes); the queue is unaffected."""


class QueueFullError(RuntimeError):
    """`submit` found the queue's waiting list full (block=False, or the timeout passed)."""


class QueueClosedError(RuntimeError):
    """`submit` on a queue that was shut down."""


@dataclass
class _Request:
    future: Future
    labels: torch.Tensor  # int64 [B] on the model's device
    plans: list[list[Step]]
    generator: object  # None, a generator, or a list of B
    use_cfg: bool
    temperature: float
    top_k: int
    top_p: float
    step: int = 0
    seq_ids: list[int] = field(default_factory=list)  # conditional rows, then unconditional rows
    row_slots: list[int] = field(default_factory=list)  # per row: where its class id sits in the token buffer
    sample_slots: list[int] = field(default_factory=list)  # per sample: where its tokens sit
    pages: list[list[int]] = field(default_factory=list)  # per row: its cache pages

    @property
    def bsz(self) -> int:
        return len(self.plans)

    @property
    def rows(self) -> int:
        return 2 * self.bsz if self.use_cfg else self.bsz

    @property
    def num_steps(self) -> int:
        return len(self.plans[0])  # counts depend only on L, steps and schedule: equal for every sample


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class GenerationQueue:
    """Serve `generate` requests from many threads on one model, batched step by step.

    model: an `ARPG` (or `RasterLM`) in eval mode. max_rows: cache rows (sequences) the running batch may
    hold; a request of B images takes B rows, 2B under guidance. max_cache_bytes: a cap on the cache
    instead of (or as well as) max_rows. max_waiting: requests that may wait for admission; then `submit`
    blocks or raises `QueueFullError`. use_cuda_graphs: bucketed graphs on CUDA (ignored on CPU).

    `submit(...)` returns a `concurrent.futures.Future` whose result is int64 [B, L] tokens on the model's
    device. `future.cancel()` works until the result is set, waiting or running (a running request's
    pages are freed at the next step boundary); the future reports `running() == False` throughout, so
    that it stays cancellable. `shutdown(cancel=False)` finishes everything submitted, `cancel=True`
    cancels it; `with GenerationQueue(...) as q:` shuts down (draining) at the end of the block.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_rows: Optional[int] = 64,
        max_cache_bytes: Optional[int] = None,
        max_waiting: int = 256,
        page_size: int = 16,
        use_cuda_graphs: bool = True,
        max_graphs: int = 64,
        _pad_steps: Optional[bool] = None,
    ):
        if not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be an int >= 1, got {max_waiting!r}")
        self._engine = Engine(model, max_rows, page_size=page_size, use_cuda_graphs=use_cuda_graphs,
                              max_cache_bytes=max_cache_bytes)
        self.model = model
        self.device = self._engine.device
        self.max_rows = self._engine.max_rows
        self.max_waiting = max_waiting
        self.max_graphs = int(max_graphs)
        self._seq_len = model.config.seq_len
        cache = self._engine.cache
        self._ps = cache.page_size
        # Padding keeps step shapes few; it is what graphs need, and tests force it on the CPU.
        self._pad = self._engine.use_cuda_graphs if _pad_steps is None else bool(_pad_steps)
        self._graphs: dict[tuple, object] = {}
        self._pool = None
        # Token buffer: the rows' class ids, then max_rows samples' tokens (position p > 0 at p - 1).
        self._buf = torch.zeros(self.max_rows * (1 + self._seq_len), dtype=torch.long, device=self.device)
        self._free_rows = list(range(self.max_rows - 1, -1, -1))
        self._free_samples = list(range(self.max_rows - 1, -1, -1))
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._cancel_all = False
        self.steps_run = 0  # decoding steps the worker has run
        self.peak_rows = 0  # most cache rows held at once
        self._worker = threading.Thread(target=_work, args=(weakref.ref(self),), name="arpg-generation-queue",
                                        daemon=True)
        self._worker.start()

    # the callers' side ----------------------------------------------------------------------------

    def submit(
        self,
        labels,
        num_steps: Optional[int] = None,
        cfg_scale: float = 1.0,
        seed=None,
        *,
        schedule: Union[str, Sequence[int]] = "arccos",
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator=None,
        order=None,
        block: bool = True,
        timeout: Optional[float] = None,
    ) -> Future:
        """Queue a request with `generate`'s arguments (same meaning, same tokens for the same seed).

        Bad arguments raise `RequestError` here, before anything is queued. With the waiting list full,
        block (up to `timeout` seconds; None: no limit) or, with block=False, raise `QueueFullError`.
        A generator passed in is drawn from by the worker: do not use it elsewhere meanwhile.
        """
        req = self._request(labels, num_steps, cfg_scale, seed, schedule, cfg_schedule, temperature, top_k, top_p,
                            generator, order)
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or len(self._waiting) < self.max_waiting,
                                       timeout if block else 0):
                raise QueueFullError(f"the queue has {len(self._waiting)} requests waiting (max_waiting = "
                                     f"{self.max_waiting})")
            if self._closed:
                raise QueueClosedError("the queue was shut down")
            self._waiting.append(req)
            self._cond.notify_all()
        return req.future

    def _request(self, labels, num_steps, cfg_scale, seed, schedule, cfg_schedule, temperature, top_k, top_p,
                 generator, order) -> _Request:
        try:
            if torch.as_tensor(labels).numel() == 0:
                raise ValueError("labels is empty: a request needs at least one class label")
            labels = check_labels(self.model, labels).to(self.device)
            for name, value in (("cfg_scale", cfg_scale), ("temperature", temperature), ("top_p", top_p)):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                    raise ValueError(f"{name} must be a number, got {value!r}")
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
                raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
            bsz = labels.shape[0]
            use_cfg = cfg_scale != 1.0
            rows = 2 * bsz if use_cfg else bsz
            if rows > self.max_rows:
                raise ValueError(f"the request needs {rows} cache rows ({bsz} images{' with guidance' if use_cfg else ''}) "
                                 f"but the queue holds {self.max_rows}: split it, or make the queue larger")
            gen = make_generators(self.device, bsz, seed, generator)
            plans = generation_plans(self.model, bsz, num_steps, schedule, float(cfg_scale), cfg_schedule, gen, order)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return _Request(Future(), labels, plans, gen, use_cfg, float(temperature), int(top_k), float(top_p))

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Refuse new requests; finish the submitted ones (or, with cancel, cancel them all). With wait,
        return once the worker has stopped, every page back in the free list."""
        with self._cond:
            self._closed = True
            if cancel:
                self._cancel_all = True
                for req in self._waiting:
                    req.future.cancel()
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> "GenerationQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=True, cancel=exc[0] is not None)

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def cache(self) -> ak.PagedKVCache:
        return self._engine.cache

    # the worker's side ----------------------------------------------------------------------------

    def _run_once(self) -> bool:
        """One turn of the worker: tidy up, admit, run a step (or wait a while when idle). False once
        the queue is shut down and drained."""
        with self._cond:
            if self._cancel_all:
                for req in self._active:
                    req.future.cancel()
            self._retire([r for r in self._active if r.future.cancelled()])
            if any(r.future.cancelled() for r in self._waiting):
                self._waiting = deque(r for r in self._waiting if not r.future.cancelled())
                self._cond.notify_all()  # room in the waiting list
            self._admit()
            if not self._active:
                if self._closed and not self._waiting:
                    return False
                self._cond.wait(timeout=_IDLE_POLL_S)
                return True
        try:
            self._step()
        except BaseException as e:  # the step's requests fail; the queue goes on
            failed, self._active = self._active, []
            for req in failed:
                self._release(req)
                if req.future.set_running_or_notify_cancel():
                    req.future.set_exception(e)
        return True

    def _admit(self) -> None:
        """Move waiting requests into the running batch, first come first served, while they fit."""
        cache = self._engine.cache
        while self._waiting:
            req = self._waiting[0]
            totals = [p[-1].kv_len for p in req.plans]  # tokens each row holds at the end
            totals = totals + totals if req.use_cfg else totals
            need = sum(-(-n // self._ps) for n in totals)
            if req.rows > len(self._free_rows) or need > cache.num_free_pages:
                break
            self._waiting.popleft()
            req.seq_ids = cache.add_sequences(req.rows)
            cache.reserve(req.seq_ids, totals)
            req.pages = [cache.pages(i) for i in req.seq_ids]
            req.row_slots = [self._free_rows.pop() for _ in range(req.rows)]
            req.sample_slots = [self._free_samples.pop() for _ in range(req.bsz)]
            cls = self.model.class_ids(req.labels)
            if req.use_cfg:
                cls = torch.cat([cls, torch.full_like(cls, self.model.config.null_class_id)])
            self._buf.index_copy_(0, torch.tensor(req.row_slots, device=self.device), cls)
            self._active.append(req)
            self._cond.notify_all()  # room in the waiting list
        self.peak_rows = max(self.peak_rows, self.max_rows - len(self._free_rows))

    def _release(self, req: _Request) -> None:
        if req.seq_ids:
            self._engine.cache.free(req.seq_ids)
            self._free_rows.extend(req.row_slots)
            self._free_samples.extend(req.sample_slots)
            req.seq_ids, req.row_slots, req.sample_slots, req.pages = [], [], [], []

    def _retire(self, done: list[_Request]) -> None:
        for req in done:
            self._active.remove(req)
            self._release(req)

    def _slot(self, row_slot: int, sample_slot: int, p: int) -> int:
        return row_slot if p == 0 else self.max_rows + sample_slot * self._seq_len + p - 1

    def _step(self) -> None:
        """One packed decoding step over every running request, then sampling and retirement."""
        ps, width = self._ps, self._engine.pages_per_seq
        in_index, pos_in, slots, pos_q, kv_lens, n_in, n_q, table, out_index = ([] for _ in range(9))

        def add_row(req: _Request, row: int, sample: int, st: Step) -> None:
            pages, first = req.pages[row], st.kv_len - st.n_in
            for k, p in enumerate(st.pos_in):
                in_index.append(self._slot(req.row_slots[row], req.sample_slots[sample], p))
                j = first + k
                slots.append(pages[j // ps] * ps + j % ps)
            pos_in.extend(st.pos_in)
            pos_q.extend(t + 1 for t in st.targets)
            kv_lens.append(st.kv_len)
            n_in.append(st.n_in)
            n_q.append(st.n_q)
            table.append(pages + [0] * (width - len(pages)))

        spans = []  # per request: (first conditional query, first unconditional query - T_cond, queries)
        for req in self._active:
            start, steps = len(pos_q), [p[req.step] for p in req.plans]
            for i, st in enumerate(steps):
                add_row(req, i, i, st)
                out_index.extend(self._slot(0, req.sample_slots[i], t + 1) for t in st.targets)
            spans.append([start, 0, len(pos_q) - start])
        t_cond = len(pos_q)
        for req, span in zip(self._active, spans):
            if req.use_cfg:
                span[1] = len(pos_q) - t_cond
                for i, p in enumerate(req.plans):
                    add_row(req, req.bsz + i, i, p[req.step])
        rows, t_in, t_q = len(kv_lens), len(in_index), len(pos_q)
        if self._pad:  # one extra row with no keys owns the padding; its writes are skipped (slot -1)
            pad_rows, pad_in, pad_q = _pow2(rows + 1) - rows, _pow2(t_in) - t_in, _pow2(t_q) - t_q
            in_index += [0] * pad_in
            pos_in += [0] * pad_in
            slots += [-1] * pad_in
            pos_q += [1] * pad_q
            kv_lens += [0] * pad_rows
            n_in += [pad_in] + [0] * (pad_rows - 1)
            n_q += [pad_q] + [0] * (pad_rows - 1)
            table += [[0] * width] * pad_rows
            max_in, max_q = _pow2(max(n_in)), _pow2(max(n_q))
        else:
            max_in, max_q = max(n_in), max(n_q)

        dev = self.device
        ints = torch.tensor(in_index + pos_in + slots + pos_q + out_index, dtype=torch.int64, device=dev)
        a, b, c, d = len(in_index), 2 * len(in_index), 3 * len(in_index), 3 * len(in_index) + len(pos_q)
        small = torch.tensor(kv_lens + _cumsum(n_in) + _cumsum(n_q), dtype=torch.int32, device=dev)
        r = len(kv_lens)
        batch = PagedBatch(
            slot_mapping=ints[b:c],
            block_table=torch.tensor(table, dtype=torch.int32, device=dev),
            kv_lens=small[:r],
            cu_in=small[r : 2 * r + 1],
            cu_q=small[2 * r + 1 :],
            max_in=max_in,
            max_q=max_q,
        )
        tokens = self._buf.index_select(0, ints[:a])
        key = (r, len(in_index), len(pos_q), max_in, max_q)
        graphs = self._engine.use_cuda_graphs and (key in self._graphs or len(self._graphs) < self.max_graphs)
        if graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            logits = _graph_step(self._graphs, key, self.model, self._engine.cache, self._pool, width, dev, tokens,
                                 ints[a:b], ints[c:d], batch, {})
        else:
            logits = self.model.decode_step(tokens, ints[a:b], ints[c:d], self._engine.cache, batch)

        # Guidance and sampling per request, as `generate` does for that request alone.
        cfgs = [req.plans[0][req.step].cfg for req in self._active]
        scales = torch.tensor(cfgs, dtype=torch.float32, device=dev)
        sampled = []
        for k, (req, (qa, qb, n)) in enumerate(zip(self._active, spans)):
            counts = [p[req.step].n_q for p in req.plans]
            uncond = logits[t_cond + qb : t_cond + qb + n] if req.use_cfg else None
            sampled.append(_sample(logits[qa : qa + n], counts, req.temperature, req.top_k, req.top_p, req.generator,
                                   uncond, scales[k].expand(n, 1) if req.use_cfg else None))
        self._buf.index_copy_(0, ints[d:], torch.cat(sampled))
        self.steps_run += 1

        done = []
        for req in self._active:
            req.step += 1
            if req.step == req.num_steps:
                done.append(req)
        for req in done:
            out = torch.stack([self._buf[self._slot(0, s, 1) : self._slot(0, s, 1) + self._seq_len]
                               for s in req.sample_slots])
            if req.future.set_running_or_notify_cancel():
                req.future.set_result(out)
        with self._cond:
            self._retire(done)


# An idle worker holds its queue only weakly between turns, so a queue dropped without `shutdown` is
# collected (cache and all) and its worker ends within this many seconds; a busy one finishes its work.
_IDLE_POLL_S = 0.5


def _work(ref: "weakref.ref[GenerationQueue]") -> None:
    with torch.inference_mode(), ak.value_checks(False):
        queue = ref()
        while queue is not None:
            if not queue._run_once():
                return
            if not (queue._active or queue._waiting):
                queue = None  # idle: let go, so that a queue nobody holds is collected
                queue = ref()


def _cumsum(counts: list[int]) -> list[int]:
    out, t = [0], 0
    for c in counts:
        t += c
        out.append(t)
    return out
