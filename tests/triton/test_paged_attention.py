"""Triton paged attention against the reference in float64 (interpreter on CPU, or a GPU)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from arpg_kernels import reference
from arpg_kernels.triton import paged_attention
from arpg_kernels.triton.paged_attention import MAX_SPLITS, choose_num_splits
from kv_cases import assert_close_to_fp64

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


def check_case(case: Case, seed: int = 0):
    q, k_cache, v_cache, block_table, kv_lens, cu_q_lens = make_inputs(case, seed)
    max_q_len = max(case.q_lens, default=0)
    scale = case.d**-0.5
    out, lse = paged_attention(
        q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, max_q_len, case.causal, scale, case.return_lse,
        num_splits=case.num_splits,
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


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.id)
def test_edge_cases(case, poison_empty):
    check_case(case)


def _random_case(seed: int) -> Case:
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


@pytest.mark.parametrize("seed", range(40), ids=lambda s: _random_case(s).id)
def test_random_cases(seed, poison_empty):
    check_case(_random_case(seed), seed=seed)


def test_split_matches_unsplit():
    case = Case((4, 2), (250, 190), causal=True, h=4, hkv=2)
    inputs = make_inputs(case)
    q, kc, vc, bt, kvl, cu = inputs
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    ref = paged_attention(q, kc, vc, bt, kvl, cu, 4, True, 0.2, True, num_splits=1)
    for n in (2, 5):
        out, lse = paged_attention(q, kc, vc, bt, kvl, cu, 4, True, 0.2, True, num_splits=n)
        torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=1e-5)


def test_queries_without_keys_give_zero_and_neg_inf(poison_empty):
    case = Case((3, 2), (1, 0), causal=True, num_splits=2)
    q, kc, vc, bt, kvl, cu = make_inputs(case)
    out, lse = paged_attention(q, kc, vc, bt, kvl, cu, 3, True, 0.5, True, num_splits=2)
    # Sequence 0: q_len 3, kv_len 1 -> only its last query sees a key. Sequence 1 sees nothing.
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.equal(out[3:], torch.zeros_like(out[3:]))
    assert torch.isneginf(lse[:2]).all() and torch.isneginf(lse[3:]).all()
    assert torch.isfinite(lse[2]).all()


def test_max_q_len_larger_than_needed(poison_empty):
    case = Case((2, 3), (20, 9), causal=True, h=4, hkv=1)
    q, kc, vc, bt, kvl, cu = make_inputs(case)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    out, lse = paged_attention(q, kc, vc, bt, kvl, cu, 40, True, 0.3, True)
    ref_out, ref_lse = reference.paged_attention(q, kc, vc, bt, kvl, cu, 40, True, 0.3, True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_empty_inputs(poison_empty):
    q = torch.empty((0, 2, 32), device=DEVICE)
    kc = torch.zeros((2, 16, 1, 32), device=DEVICE)
    bt = torch.zeros((0, 1), dtype=torch.int32, device=DEVICE)
    kvl = torch.zeros((0,), dtype=torch.int32, device=DEVICE)
    cu = torch.zeros((1,), dtype=torch.int32, device=DEVICE)
    out, lse = paged_attention(q, kc, kc, bt, kvl, cu, 0, False, 0.1, True)
    assert out.shape == (0, 2, 32) and lse.shape == (0, 2)
    # A block table with no columns: every query sees nothing.
    q = torch.randn((3, 2, 32), device=DEVICE)
    bt = torch.zeros((2, 0), dtype=torch.int32, device=DEVICE)
    kvl = torch.zeros((2,), dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)
    out, lse = paged_attention(q, kc, kc, bt, kvl, cu, 2, True, 0.1, True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_choose_num_splits():
    assert choose_num_splits(num_programs=512, max_kv_len=4096, num_sms=132) == 1  # grid already full
    assert choose_num_splits(num_programs=16, max_kv_len=272, num_sms=132) == 1  # cache too short
    assert choose_num_splits(num_programs=16, max_kv_len=1024, num_sms=132) == 4  # limited by keys per split
    assert choose_num_splits(num_programs=16, max_kv_len=65536, num_sms=132) == 9  # about one wave
    assert choose_num_splits(num_programs=1, max_kv_len=1 << 20, num_sms=132) == MAX_SPLITS


def test_unsupported_head_dim():
    case = Case((1,), (4,), d=32)
    q, kc, vc, bt, kvl, cu = make_inputs(case)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(q[..., :24], kc[..., :24], vc[..., :24], bt, kvl, cu, 1, False, 0.1, False)


GPU_CASES = [
    Case(tuple([16] * 32), tuple([257] * 32), h=16, hkv=16, d=64, dtype="fp16"),
    Case(tuple([16] * 32), tuple([257] * 32), h=16, hkv=16, d=64, dtype="bf16", causal=True),
    Case(tuple(range(1, 33)), tuple(range(200, 264, 2)), h=16, hkv=4, d=128, dtype="bf16", causal=True),
    Case((64, 1, 100, 7), (2000, 1, 4000, 7), h=8, hkv=2, d=64, dtype="fp16", causal=True, page_size=64),
    Case((1, 1), (8192, 5000), h=16, hkv=16, d=64, dtype="bf16"),  # auto split-KV
    Case((1, 3), (8192, 5000), h=16, hkv=16, d=64, dtype="fp16", num_splits=7, causal=True, page_size=256),
    Case((5, 5), (300, 300), h=4, hkv=1, d=32, dtype="fp32", page_size=1, pool=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_realistic(case, poison_empty):
    check_case(case)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    case = Case((4, 4), (257, 100), h=16, hkv=16, d=64, dtype="fp16", causal=True)
    q, kc, vc, bt, kvl, cu = make_inputs(case, device="cuda")
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    args = (bt, kvl, cu, 4, True, 0.125, True)
    for n in (1, 3):
        eager = paged_attention(q, kc, vc, *args, num_splits=n)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = paged_attention(q, kc, vc, *args, num_splits=n)
        kvl.copy_(torch.tensor([200, 50], dtype=torch.int32))
        graph.replay()
        expected = paged_attention(q, kc, vc, *args, num_splits=n)
        torch.testing.assert_close(captured[0], expected[0])
        torch.testing.assert_close(captured[1], expected[1])
        kvl.copy_(torch.tensor([257, 100], dtype=torch.int32))
        del eager


def test_wrapper_reads_no_device_values(monkeypatch):
    """The launch path must not read tensor values on the host (that would break CUDA-graph capture)."""
    case = Case((3, 1), (40, 9), causal=True, h=4, hkv=2)
    q, kc, vc, bt, kvl, cu = make_inputs(case)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a device value")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for num_splits in (None, 1, 3):
        paged_attention(q, kc, vc, bt, kvl, cu, 3, True, 0.2, True, num_splits=num_splits)


def test_unchecked_bad_indices_stay_inside_the_cache():
    """With the op-level checks bypassed, wild page ids, lengths and slots must not touch memory
    outside the cache (under the interpreter an out-of-bounds access kills the process)."""
    from arpg_kernels import triton as triton_backend

    q = torch.randn(3, 2, 32)
    kc, vc = torch.randn(2, 16, 1, 32), torch.randn(2, 16, 1, 32)
    table = torch.tensor([[1, 999], [-5, 0]], dtype=torch.int32)
    lens = torch.tensor([10_000, 20], dtype=torch.int32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)  # ends past T = 3
    out, lse = triton_backend.paged_attention(q, kc, vc, table, lens, cu, 3, False, 0.1, True)
    assert torch.isfinite(out).all()
    k = torch.randn(3, 1, 32)
    before = kc.clone()
    triton_backend.append_kv(k, k, kc, vc, torch.tensor([5, 32, 10_000]))
    assert torch.equal(kc.view(32, 1, 32)[5], k[0]) and torch.equal(kc.view(32, 1, 32)[6:], before.view(32, 1, 32)[6:])
