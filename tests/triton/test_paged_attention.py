"""Triton paged attention against the reference in float64 (interpreter on CPU, or a GPU)."""

from __future__ import annotations

import pytest
import torch

from arpg_kernels import reference
from arpg_kernels.triton import paged_attention
from arpg_kernels.triton.paged_attention import MAX_SPLITS, choose_num_splits
from kv_cases import DEVICE, EDGE_CASES, Case, check_paged_kernel, make_inputs, random_case


def check_case(case: Case, seed: int = 0):
    check_paged_kernel(paged_attention, case, seed, num_splits=case.num_splits)


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.id)
def test_edge_cases(case, poison_empty):
    check_case(case)


@pytest.mark.parametrize("seed", range(40), ids=lambda s: random_case(s).id)
def test_random_cases(seed, poison_empty):
    check_case(random_case(seed), seed=seed)


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
    wide = [torch.cat([x] * 8, dim=-1) for x in (q, kc, vc)]  # 256: past the tiles the kernel is gated for
    with pytest.raises(ValueError, match=r"head_dim must be a power of two in \[16, 128\], got 256"):
        paged_attention(*wide, bt, kvl, cu, 1, False, 0.1, False)


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


def test_supports_head_dims():
    """auto falls back to the reference outside the head_dims the Triton tiles are gated for."""
    from arpg_kernels import triton as triton_backend

    cache = torch.empty(1, 16, 2, 64)
    for d, ok in ((8, False), (16, True), (64, True), (128, True), (256, False), (96, False)):
        assert triton_backend.supports("paged_attention", torch.empty(1, 2, d), cache) is ok, d
        assert triton_backend.supports("attention_forward", torch.empty(1, 1, 2, d)) is ok, d
