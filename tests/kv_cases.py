"""Random paged-attention cases, an independent float64 oracle and the tolerance rule, shared by the tests of every backend."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


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
