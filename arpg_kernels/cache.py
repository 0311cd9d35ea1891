"""`PagedKVCache`: multi-layer K/V pools and a reference-counted page allocator.

The allocator's bookkeeping lives on the host (plain Python lists); the pools and every tensor it
hands out (slot mappings, block tables, lengths) live on the cache's device. A whole generation's
reservations can be made before the decoding loop with `plan`, so the loop itself does no host work.
"""

from __future__ import annotations

import array
import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


class CacheFullError(RuntimeError):
    """Raised when a reservation needs more free pages than the cache has; nothing was changed."""


_ARRAY_CODES = {torch.int64: "q", torch.int32: "i"}


def int_tensor(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D int64 or int32 tensor of a flat list of Python ints on `device`: through `array.array`, 3x faster
    than `torch.tensor` on the tens of thousands of indices a generation's plan holds."""
    buf = array.array(_ARRAY_CODES[dtype], values)
    t = torch.frombuffer(buf, dtype=dtype) if len(buf) else torch.empty(0, dtype=dtype)
    return t.to(device)


@dataclass(frozen=True)
class StepPlan:
    """The tensors of one planned reservation step, all on the cache's device.

    slot_mapping: int64 [sum(num_new)], the new tokens' slots packed in sequence order.
    block_table: int32 [B, max_pages] after the step; kv_lens: int32 [B] after the step.
    cu_new: int32 [B + 1], prefix sums of num_new (the cu_q_lens of the new tokens).
    num_new: new tokens per sequence (host ints).
    """

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    kv_lens: torch.Tensor
    cu_new: torch.Tensor
    num_new: tuple[int, ...]


class PagedKVCache:
    """K/V pools `[num_layers, num_pages, page_size, Hkv, D]` with a page allocator.

    Sequences are named by integer ids from `add_sequences`. Pages are reference counted: `fork`
    shares all of a sequence's pages, and a sequence that grows into a shared, partially filled
    last page first gets a private copy of it (copy-on-write), so a fork's writes never change
    what another sequence sees. Every method validates its arguments before changing anything.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ):
        for name, value, low in (
            ("num_layers", num_layers, 1),
            ("num_pages", num_pages, 1),
            ("page_size", page_size, 1),
            ("num_kv_heads", num_kv_heads, 1),
            ("head_dim", head_dim, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = torch.device(device)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_pool = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=self.device)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # a stack: low ids come out first
        self._refs: list[int] = [0] * num_pages
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0

    # introspection ------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.k_pool.shape[0]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes held by the two pools."""
        return 2 * self.k_pool.numel() * self.k_pool.element_size()

    @property
    def sequences(self) -> list[int]:
        return list(self._pages)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k_cache, v_cache) views `[num_pages, page_size, Hkv, D]` of one layer."""
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.num_layers} layers")
        return self.k_pool[layer], self.v_pool[layer]

    def seq_len(self, seq_id: int) -> int:
        self._check_ids([seq_id])
        return self._lens[seq_id]

    def pages(self, seq_id: int) -> list[int]:
        self._check_ids([seq_id])
        return list(self._pages[seq_id])

    # allocation -------------------------------------------------------------------------------

    def add_sequences(self, n: int = 1) -> list[int]:
        """Register n empty sequences and return their ids (no pages are taken until `reserve`)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for i in ids:
            self._pages[i] = []
            self._lens[i] = 0
        return ids

    def reserve(self, seq_ids: Sequence[int], n_tokens: int | Sequence[int]) -> torch.Tensor:
        """Grow each sequence by its n_tokens and return the new tokens' slots.

        Returns an int64 [sum(n_tokens)] device tensor (slot = page * page_size + offset), packed in
        the order of seq_ids, ready for `append_kv`. Raises CacheFullError, changing nothing, when the
        free pages do not suffice.
        """
        seq_ids, counts = self._check_reserve(seq_ids, n_tokens)
        slots, copies = self._reserve_host(seq_ids, counts)
        self._copy_pages(copies)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def plan(self, seq_ids: Sequence[int], steps: Iterable[int | Sequence[int]]) -> list[StepPlan]:
        """Reserve a whole sequence of steps ahead of a decoding loop.

        steps: per step, the new tokens per sequence (an int applies to all of seq_ids). Every block
        table of the plan has the width the last step needs, so a loop (or a CUDA graph) can copy
        each step's tensors into fixed buffers. All or nothing: if the whole plan does not fit,
        CacheFullError is raised and the cache is unchanged.
        """
        seq_ids = self._unique_ids(seq_ids)
        snapshot = self._snapshot()
        slots, lens_cu, num_new, copies = [], [], [], []
        try:
            for step in steps:
                counts = self._check_counts(seq_ids, step)
                step_slots, step_copies = self._reserve_host(seq_ids, counts)
                copies += step_copies
                slots.append(step_slots)
                lens_cu.append([self._lens[i] for i in seq_ids])
                lens_cu.append([0, *itertools.accumulate(counts)])
                num_new.append(tuple(counts))
        except Exception:
            self._restore(snapshot)
            raise
        self._copy_pages(copies)
        width = max([len(p) for p in self._pages.values() if p] + [1])
        # Pages only ever get appended (a copy-on-write swaps the last page before anything new is
        # written to it), so the final table serves every step. Each step gets its own tensors: views of one
        # tensor of all the steps' slots and one of their lengths and prefix sums (two copies to the device).
        table = self.block_table(seq_ids, width)
        flat_slots = int_tensor(itertools.chain.from_iterable(slots), torch.int64, self.device)
        flat_lens_cu = int_tensor(itertools.chain.from_iterable(lens_cu), torch.int32, self.device)
        n, plans, start = len(seq_ids), [], 0
        for i, (step_slots, counts) in enumerate(zip(slots, num_new)):
            at = i * (2 * n + 1)
            plans.append(
                StepPlan(
                    slot_mapping=flat_slots[start : start + len(step_slots)],
                    block_table=table,
                    kv_lens=flat_lens_cu[at : at + n],
                    cu_new=flat_lens_cu[at + n : at + 2 * n + 1],
                    num_new=counts,
                )
            )
            start += len(step_slots)
        return plans

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing all pages (and the length) of seq_id; returns its id."""
        self._check_ids([seq_id])
        (new,) = self.add_sequences(1)
        self._pages[new] = list(self._pages[seq_id])
        self._lens[new] = self._lens[seq_id]
        for p in self._pages[new]:
            self._refs[p] += 1
        return new

    def free(self, seq_ids: Sequence[int]) -> None:
        """Forget sequences; pages no other sequence holds return to the free list."""
        seq_ids = self._unique_ids(seq_ids)
        for i in seq_ids:
            for p in reversed(self._pages.pop(i)):
                self._refs[p] -= 1
                if self._refs[p] == 0:
                    self._free.append(p)
            del self._lens[i]

    # tensors for the kernels ------------------------------------------------------------------

    def block_table(self, seq_ids: Sequence[int], max_pages: int | None = None) -> torch.Tensor:
        """int32 [B, max_pages] on the cache's device; unused entries hold page 0 (never read)."""
        self._check_ids(seq_ids)
        need = max([len(self._pages[i]) for i in seq_ids] + [1])
        if max_pages is None:
            max_pages = need
        elif max_pages < need:
            raise ValueError(f"max_pages = {max_pages} is smaller than the {need} pages a sequence holds")
        rows = [self._pages[i] + [0] * (max_pages - len(self._pages[i])) for i in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(seq_ids), max_pages)

    def kv_lens(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 [B] on the cache's device."""
        self._check_ids(seq_ids)
        return torch.tensor([self._lens[i] for i in seq_ids], dtype=torch.int32, device=self.device)

    def check_invariants(self) -> None:
        """Raise AssertionError if the allocator's bookkeeping is inconsistent (for tests and debugging)."""
        counts = [0] * self.num_pages
        for sid, pages in self._pages.items():
            need = -(-self._lens[sid] // self.page_size)
            assert len(pages) == need, f"sequence {sid} holds {len(pages)} pages for {self._lens[sid]} tokens"
            assert len(set(pages)) == len(pages), f"sequence {sid} holds a page twice"
            for p in pages:
                counts[p] += 1
        assert counts == self._refs, "reference counts disagree with the sequences' pages"
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        for p in range(self.num_pages):
            assert (p in free) == (counts[p] == 0), f"page {p} is {'free' if p in free else 'held'} with {counts[p]} owners"

    # internals --------------------------------------------------------------------------------

    def _check_ids(self, seq_ids: Sequence[int]) -> None:
        for i in seq_ids:
            if i not in self._pages:
                raise KeyError(f"unknown sequence id {i!r}")

    def _unique_ids(self, seq_ids: Sequence[int]) -> list[int]:
        seq_ids = list(seq_ids)
        self._check_ids(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids contains a duplicate: {seq_ids}")
        return seq_ids

    def _check_reserve(self, seq_ids, n_tokens) -> tuple[list[int], list[int]]:
        seq_ids = self._unique_ids(seq_ids)
        return seq_ids, self._check_counts(seq_ids, n_tokens)

    def _check_counts(self, seq_ids: list[int], n_tokens) -> list[int]:
        counts = [n_tokens] * len(seq_ids) if isinstance(n_tokens, int) else list(n_tokens)
        if len(counts) != len(seq_ids):
            raise ValueError(f"n_tokens has {len(counts)} entries for {len(seq_ids)} sequences")
        for c in counts:
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"n_tokens must be non-negative ints, got {c!r}")
        return counts

    def _reserve_host(self, seq_ids: list[int], counts: list[int]):
        """Update the bookkeeping; return the slots and the (src, dst, rows) page copies to make."""
        need = 0
        refs = {}  # simulated reference counts of shared last pages, in call order
        for i, c in zip(seq_ids, counts):
            length, pages = self._lens[i], self._pages[i]
            if c == 0:
                continue
            partial = length % self.page_size
            if partial and pages:
                last = pages[-1]
                r = refs.get(last, self._refs[last])
                if r > 1:
                    need += 1
                    refs[last] = r - 1
            need += -(-(length + c) // self.page_size) - len(pages)
        if need > len(self._free):
            raise CacheFullError(
                f"the cache needs {need} free pages for this reservation but has {len(self._free)} "
                f"(of {self.num_pages} pages of {self.page_size} tokens)"
            )
        slots, copies = [], []
        for i, c in zip(seq_ids, counts):
            length, pages = self._lens[i], self._pages[i]
            if c == 0:
                continue
            partial = length % self.page_size
            if partial and self._refs[pages[-1]] > 1:
                fresh = self._free.pop()
                self._refs[fresh] = 1
                self._refs[pages[-1]] -= 1
                copies.append((pages[-1], fresh, partial))
                pages[-1] = fresh
            while len(pages) * self.page_size < length + c:
                fresh = self._free.pop()
                self._refs[fresh] = 1
                pages.append(fresh)
            t, end, ps = length, length + c, self.page_size
            while t < end:  # the run of slots in each page the tokens reach
                page_end = min(end, (t // ps + 1) * ps)
                base = pages[t // ps] * ps - t // ps * ps
                slots.extend(range(base + t, base + page_end))
                t = page_end
            self._lens[i] = end
        return slots, copies

    def _copy_pages(self, copies: list[tuple[int, int, int]]) -> None:
        for src, dst, rows in copies:
            self.k_pool[:, dst, :rows] = self.k_pool[:, src, :rows]
            self.v_pool[:, dst, :rows] = self.v_pool[:, src, :rows]

    def _snapshot(self):
        return (list(self._free), list(self._refs), {k: list(v) for k, v in self._pages.items()}, dict(self._lens))

    def _restore(self, snapshot) -> None:
        self._free, self._refs, self._pages, self._lens = snapshot
