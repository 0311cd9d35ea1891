"""Random paged-attention cases, an independent float64 oracle and the tolerance rule, shared by the tests of every backend."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from arpg_kernels import reference


@dataclass
class PagedCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    kv_lens: torch.Tensor
    cu_q_lens: torch.Tensor
    max_q_len: int
    causal: bool

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.kv_lens, self.cu_q_lens, self.max_q_len)

    def to(self, device):
        return PagedCase(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in self.__dict__.values()))


def make_paged_case(
    seed: int,
    *,
    dtype=torch.float32,
    head_dims=(16, 32, 64),
    page_sizes=(1, 16, 64),
    max_kv=80,
    max_q=9,
    max_b=4,
    causal=None,
    share_pages=None,
    device="cpu",
) -> PagedCase:
    """A random varlen case: empty sequences, kv_len 0, shared and shuffled pages, GQA, spare pages.

    Pages of a later sequence may alias the leading pages of an earlier one (a shared prefix), so
    the same physical rows are read by several sequences. Physical page ids are a random permutation.
    """
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    b = rng.randint(0, max_b) if rng.random() < 0.1 else rng.randint(1, max_b)
    hkv = rng.choice([1, 2])
    h = hkv * rng.choice([1, 2, 4])
    d = rng.choice(head_dims)
    ps = rng.choice(page_sizes)
    causal = rng.random() < 0.5 if causal is None else causal
    share = rng.random() < 0.4 if share_pages is None else share_pages
    kv_lens = [rng.choice([0, 1, rng.randint(1, max_kv), max_kv]) for _ in range(b)]
    q_lens = [rng.choice([0, 1, rng.randint(1, max_q)]) for _ in range(b)]
    if causal and b and rng.random() < 0.5:
        q_lens[0] = kv_lens[0] = min(kv_lens[0], max_q)  # the causal edge: as many queries as keys
    pages_per_seq = [math.ceil(n / ps) for n in kv_lens]
    max_pages = max(pages_per_seq + [1]) + rng.randint(0, 2)
    logical = []
    next_page = 0
    for i, n in enumerate(pages_per_seq):
        row = list(range(next_page, next_page + n))
        if share and i > 0 and logical[0] and n:
            k = min(len(logical[0]), n, rng.randint(1, n))
            row = logical[0][:k] + list(range(next_page, next_page + n - k))
        next_page += sum(1 for p in row if p >= next_page)
        logical.append(row)
    num_pages = next_page + rng.randint(1, 3)
    perm = torch.randperm(num_pages, generator=g).tolist()
    table = torch.zeros((b, max_pages), dtype=torch.int32)
    for i, row in enumerate(logical):
        for j, p in enumerate(row):
            table[i, j] = perm[p]
        for j in range(len(row), max_pages):
            table[i, j] = rng.randrange(num_pages)  # unused entries point anywhere valid
    t = sum(q_lens)
    q = torch.randn((t, h, d), generator=g).to(dtype)
    k_cache = torch.randn((num_pages, ps, hkv, d), generator=g).to(dtype)
    v_cache = torch.randn((num_pages, ps, hkv, d), generator=g).to(dtype)
    cu = torch.tensor([0] + [sum(q_lens[: i + 1]) for i in range(b)], dtype=torch.int32)
    case = PagedCase(
        q, k_cache, v_cache, table, torch.tensor(kv_lens, dtype=torch.int32), cu, max(q_lens + [0]), causal
    )
    return case.to(device)


def naive_paged_attention(case: PagedCase, scale: float | None = None):
    """Loop-by-loop float64 attention straight from the definition; returns (out, lse) in float64."""
    q = case.q.double().cpu()
    kc, vc = case.k_cache.double().cpu(), case.v_cache.double().cpu()
    table, kv_lens, cu = case.block_table.cpu(), case.kv_lens.cpu(), case.cu_q_lens.cpu()
    t, h, d = q.shape
    ps, hkv = kc.shape[1], kc.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros((t, h, d), dtype=torch.float64)
    lse = torch.full((t, h), float("-inf"), dtype=torch.float64)
    for b in range(table.shape[0]):
        n = int(kv_lens[b])
        rows = [(int(table[b, j // ps]), j % ps) for j in range(n)]
        keys = torch.stack([kc[p, o] for p, o in rows]) if rows else torch.zeros((0, hkv, d), dtype=torch.float64)
        vals = torch.stack([vc[p, o] for p, o in rows]) if rows else torch.zeros((0, hkv, d), dtype=torch.float64)
        start, end = int(cu[b]), int(cu[b + 1])
        q_len = end - start
        for i in range(q_len):
            visible = min(n, n - q_len + i + 1) if case.causal else n
            if visible <= 0:
                continue
            for head in range(h):
                kh = head // (h // hkv)
                s = keys[:visible, kh] @ q[start + i, head] * scale
                m = s.max()
                w = torch.exp(s - m)
                out[start + i, head] = (w[:, None] * vals[:visible, kh]).sum(0) / w.sum()
                lse[start + i, head] = m + torch.log(w.sum())
    return out, lse


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}[dtype]


# ulps of the result's scale a kernel may be off beyond twice the reference's own error, per result dtype.
# fp32: on a GPU `tl.exp2`/`exp2f` compile to ex2.approx.ftz.f32 and fp32 division to div.full.f32 (about
# 2 ulp each) where the interpreter and the reference compute both exactly, and numpy versions differ in
# their last bits. 16-bit results: rounding to the storage dtype dominates, which the reference shares.
ULPS = {torch.float64: 4.0, torch.float32: 4.0, torch.float16: 1.0, torch.bfloat16: 1.0}


def allowance(dtype: torch.dtype, ref_err: float, scale: float, ulps: float | None = None) -> float:
    """The largest error vs float64 accepted from a kernel whose reference, in the same dtype, is off by ref_err."""
    ulps = ULPS[dtype] if ulps is None else ulps
    return 2 * ref_err + ulps * torch.finfo(dtype).eps * max(scale, 1.0)


def assert_close_to_fp64(name, got, hi, lo, ulps=None):
    """`got` vs the float64 result `hi` within `allowance`, where `lo` is the reference computed in got's dtype.

    ulps overrides `ULPS[dtype]` (16-bit gradients round dS and P once more than the forward does).
    Infinities (an LSE of -inf for a query that sees no key) must match exactly; NaN never passes.
    """
    assert got.shape == hi.shape and got.dtype == lo.dtype, name
    got64, lo64 = got.double().cpu(), lo.double().cpu()
    hi = hi.cpu()
    assert not torch.isnan(got64).any(), f"{name}: NaN"
    inf = torch.isinf(hi)
    assert torch.equal(torch.isinf(got64), inf), f"{name}: infinities differ"
    assert torch.equal(got64[inf], hi[inf]), f"{name}: infinities differ"
    fin = ~inf
    if not fin.any():
        return
    err = (got64[fin] - hi[fin]).abs().max().item()
    ref_err = (lo64[fin] - hi[fin]).abs().max().item()
    limit = allowance(lo.dtype, ref_err, hi[fin].abs().max().item(), ulps)
    assert err <= limit, f"{name}: error {err:.3g} vs reference error {ref_err:.3g} (allowed {limit:.3g})"


# Kernel cases: what every backend's paged-attention kernel test draws ---------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    page_size: int = 16
    h: int = 2
    hkv: int = 2
    d: int = 32
    dtype: str = "fp32"
    causal: bool = False
    return_lse: bool = True
    num_splits: int | None = None
    shared: bool = False  # sequence 1 starts with sequence 0's pages
    pool: bool = False  # caches are layer 1 of a 5-D pool, q a slice of a wider tensor
    spare_pages: int = 1  # block-table columns past the longest sequence

    @property
    def id(self) -> str:
        parts = [
            f"q{'-'.join(map(str, self.q_lens))}",
            f"kv{'-'.join(map(str, self.kv_lens))}",
            f"ps{self.page_size}",
            f"h{self.h}x{self.hkv}",
            f"d{self.d}",
            self.dtype,
            "causal" if self.causal else "full",
        ]
        if not self.return_lse:
            parts.append("nolse")
        if self.num_splits is not None:
            parts.append(f"split{self.num_splits}")
        if self.shared:
            parts.append("shared")
        if self.pool:
            parts.append("pool")
        return "-".join(parts)


def make_inputs(case: Case, seed: int = 0, device: str = DEVICE):
    """Random packed queries and a paged cache with shuffled page ids; unused cache slots hold NaN."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    b, ps = len(case.q_lens), case.page_size
    n_pages = [-(-n // ps) for n in case.kv_lens]
    if case.shared:
        # Sequence 1 reuses all but possibly the last page of sequence 0, then owns the rest.
        n_shared = min(n_pages[0], n_pages[1]) - 1 if n_pages[1] > 0 else 0
        n_shared = max(n_shared, 0)
    else:
        n_shared = 0
    max_pages = max(n_pages, default=0) + case.spare_pages
    num_pages = sum(n_pages) - n_shared + 2
    perm = torch.randperm(num_pages, generator=g).tolist()
    block_table = torch.full((b, max_pages), num_pages - 1, dtype=torch.int32)
    next_page = 0
    for i, n in enumerate(n_pages):
        for j in range(n):
            if i == 1 and j < n_shared:
                block_table[i, j] = block_table[0, j]
            else:
                block_table[i, j] = perm[next_page]
                next_page += 1

    shape = (num_pages, ps, case.hkv, case.d)
    k_cache = torch.full(shape, float("nan"), dtype=torch.float64)
    v_cache = torch.full(shape, float("nan"), dtype=torch.float64)
    for i, n in enumerate(case.kv_lens):
        for j in range(n):
            page, off = int(block_table[i, j // ps]), j % ps
            if torch.isnan(k_cache[page, off, 0, 0]):
                k_cache[page, off] = torch.randn(case.hkv, case.d, generator=g, dtype=torch.float64)
                v_cache[page, off] = torch.randn(case.hkv, case.d, generator=g, dtype=torch.float64)
    t = sum(case.q_lens)
    q = torch.randn(t, case.h, case.d, generator=g, dtype=torch.float64)
    cu = [0]
    for n in case.q_lens:
        cu.append(cu[-1] + n)
    cu_q_lens = torch.tensor(cu, dtype=torch.int32)
    kv_lens = torch.tensor(case.kv_lens, dtype=torch.int32)

    q, k_cache, v_cache = (x.to(dtype).to(device) for x in (q, k_cache, v_cache))
    if case.pool:
        k_pool = torch.randn((3, *shape), dtype=dtype, device=device)
        v_pool = torch.randn((3, *shape), dtype=dtype, device=device)
        k_pool[1], v_pool[1] = k_cache, v_cache
        k_cache, v_cache = k_pool[1], v_pool[1]
        wide = torch.randn((t, case.h + 1, case.d), dtype=dtype, device=device)
        wide[:, 1:] = q
        q = wide[:, 1:]
    return q, k_cache, v_cache, block_table.to(device), kv_lens.to(device), cu_q_lens.to(device)


EDGE_CASES = [
    # decoding-like: one query per sequence, a kv_len of 0, odd lengths
    Case((1, 1, 1), (17, 0, 33)),
    Case((1, 1, 1), (17, 0, 33), causal=True),
    # a sequence without queries, causal queries that see no key (q_len > kv_len)
    Case((3, 0, 5), (2, 9, 0), causal=True),
    Case((4, 6), (4, 6), causal=True),  # q_len == kv_len
    Case((5, 5), (1, 5), causal=True, h=4, hkv=1),
    Case((7,), (7,), causal=True, page_size=1),
    Case((3, 2), (70, 33), page_size=1, h=4, hkv=2),
    Case((3, 2), (130, 33), page_size=64, causal=True),
    Case((2, 3), (130, 129), page_size=128, causal=True, h=2, hkv=1),
    Case((2, 3), (40, 57), shared=True, causal=True),
    Case((3, 3), (33, 33), shared=True, page_size=1, h=4, hkv=2),
    Case((2, 4), (33, 50), pool=True, causal=True, h=4, hkv=2),
    Case((2, 4), (33, 50), return_lse=False),
    Case((40, 3), (60, 45), causal=True, h=4, hkv=1, d=32),  # 160 packed rows: several query blocks
    Case((9,), (200,), causal=True, num_splits=3),
    Case((1, 2), (150, 0), num_splits=4, h=4, hkv=2),
    Case((2, 1), (5, 300), num_splits=8, causal=True, return_lse=False),
    Case((3, 2), (33, 17), num_splits=16, page_size=1),  # more splits than tiles
    Case((2, 3), (33, 65), d=64, dtype="fp16", causal=True),
    Case((2, 3), (33, 65), d=64, dtype="bf16", causal=True, h=4, hkv=2),
    Case((2, 3), (33, 65), d=128, dtype="fp16", h=2, hkv=1),
    Case((3, 1), (70, 20), d=128, dtype="fp32", causal=True, num_splits=2),
    Case((2, 2), (100, 90), d=64, dtype="bf16", num_splits=2, pool=True),
]


def random_case(seed: int) -> Case:
    rng = random.Random(seed)
    b = rng.randint(1, 3)
    h, hkv = rng.choice([(1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (3, 1)])
    causal = rng.random() < 0.5
    q_lens = tuple(rng.choice([0, 1, 1, 2, 3, 5, 8, 13]) for _ in range(b))
    kv_lens = tuple(rng.choice([0, 1, 5, 16, 17, 33, 64, 70]) for _ in range(b))
    if causal and rng.random() < 0.5:
        kv_lens = tuple(max(k, q) for k, q in zip(kv_lens, q_lens))
    return Case(
        q_lens=q_lens,
        kv_lens=kv_lens,
        page_size=rng.choice([1, 2, 16, 16, 64]),
        h=h,
        hkv=hkv,
        d=rng.choice([32, 32, 64]),
        dtype=rng.choice(["fp32", "fp32", "fp16", "fp16", "bf16"]),
        causal=causal,
        return_lse=rng.random() < 0.8,
        num_splits=rng.choice([None, None, 1, 2, 3]),
        shared=b >= 2 and rng.random() < 0.3,
        pool=rng.random() < 0.2,
    )


def check_paged_kernel(kernel, case: Case, seed: int = 0, device: str = DEVICE, **kernel_kwargs):
    """Run `kernel` (the signature of reference.paged_attention, plus kernel_kwargs) on the case's inputs and
    compare it with the float64 reference under the ulp allowance."""
    q, k_cache, v_cache, block_table, kv_lens, cu_q_lens = make_inputs(case, seed, device)
    max_q_len = max(case.q_lens, default=0)
    scale = case.d**-0.5
    out, lse = kernel(
        q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, case.causal, scale, case.return_lse,
        **kernel_kwargs,
    )
    # The reference multiplies NaN slots by zero weights, so it gets the same cache with NaN made 0.
    kc, vc = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    args = (block_table, kv_lens, cu_q_lens, max_q_len, case.causal, scale, True)
    out_hi, lse_hi = reference.paged_attention(q.double(), kc.double(), vc.double(), *args)
    out_lo, lse_lo = reference.paged_attention(q, kc, vc, *args)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_fp64("out", out, out_hi, out_lo)
    if case.return_lse:
        assert lse.dtype == torch.float32
        assert_close_to_fp64("lse", lse, lse_hi, lse_lo)
    else:
        assert lse.shape == (0,) and lse.dtype == torch.float32
