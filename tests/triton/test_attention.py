"""Triton dense attention (forward and backward) against the reference in float64."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from arpg_kernels import reference
from arpg_kernels.triton import attention_backward, attention_forward
from kv_cases import assert_close_to_fp64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    b: int
    lq: int
    lk: int
    h: int = 2
    hkv: int = 2
    d: int = 32
    dtype: str = "fp32"
    causal: bool = True
    packed: bool = False  # q, k, v are slices of one [B, L, 3, H, D] tensor (needs lq == lk, h == hkv)

    @property
    def id(self) -> str:
        parts = [f"b{self.b}", f"q{self.lq}", f"k{self.lk}", f"h{self.h}x{self.hkv}", f"d{self.d}", self.dtype]
        parts.append("causal" if self.causal else "full")
        if self.packed:
            parts.append("packed")
        return "-".join(parts)


def make_inputs(case: Case, seed: int = 0, device: str = DEVICE):
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    if case.packed:
        qkv = rand(case.b, case.lq, 3, case.h, case.d)
        q, k, v = qkv.unbind(2)
    else:
        q = rand(case.b, case.lq, case.h, case.d)
        k = rand(case.b, case.lk, case.hkv, case.d)
        v = rand(case.b, case.lk, case.hkv, case.d)
    dout = rand(case.b, case.lq, case.h, case.d)
    dlse = (0.5 * torch.randn(case.b, case.lq, case.h, generator=g)).to(device)
    return q, k, v, dout, dlse


def check_case(case: Case, seed: int = 0):
    q, k, v, dout, dlse = make_inputs(case, seed)
    scale = case.d**-0.5
    out, lse = attention_forward(q, k, v, case.causal, scale)
    out_hi, lse_hi = reference.attention_forward(q.double(), k.double(), v.double(), case.causal, scale)
    out_lo, lse_lo = reference.attention_forward(q, k, v, case.causal, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_to_fp64("out", out, out_hi, out_lo)
    assert_close_to_fp64("lse", lse, lse_hi, lse_lo)

    grads = attention_backward(dout, dlse, q, k, v, out, lse, case.causal, scale)
    grads_hi = reference.attention_backward(
        dout.double(), dlse.double(), q.double(), k.double(), v.double(), out_hi, lse_hi, case.causal, scale
    )
    grads_lo = reference.attention_backward(dout, dlse, q, k, v, out_lo, lse_lo, case.causal, scale)
    for name, got, hi, lo, x in zip(("dq", "dk", "dv"), grads, grads_hi, grads_lo, (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        # Gradients go through the cancelling difference dP - delta, and in 16 bits p and dS are rounded
        # before the products (as in FlashAttention): a few ulps on top.
        assert_close_to_fp64(name, got, hi, lo, ulps=None if x.dtype == torch.float32 else 2.0)


EDGE_CASES = [
    Case(1, 1, 1),
    Case(2, 1, 1, causal=False),
    Case(2, 7, 7),
    Case(2, 33, 33, h=4, hkv=2),
    Case(2, 33, 33, h=4, hkv=1, causal=False),
    Case(1, 7, 33),  # fewer queries than keys: bottom-right aligned
    Case(1, 33, 7),  # more queries than keys: the first 26 rows see nothing
    Case(2, 33, 7, causal=False, h=2, hkv=1),
    # Lk - Lq = 14, -2, -15, 17: the causal stage boundaries land on tile edges (interpreter tiles)
    Case(1, 19, 33, h=2, hkv=1),
    Case(1, 35, 33),
    Case(1, 20, 5),
    Case(1, 23, 40),
    Case(1, 17, 40, h=4, hkv=4, d=64),
    Case(2, 48, 48, h=2, hkv=1, d=64, dtype="fp16"),
    Case(2, 33, 20, h=2, hkv=2, d=64, dtype="fp16", causal=False),
    Case(1, 33, 33, h=4, hkv=2, d=64, dtype="bf16"),
    Case(1, 20, 33, h=2, hkv=1, d=128, dtype="fp32"),
    Case(1, 16, 16, h=2, hkv=2, d=128, dtype="fp16", causal=False),
    Case(2, 19, 19, h=2, hkv=2, d=32, packed=True),
    Case(1, 0, 5),
    Case(1, 5, 0),
    Case(1, 5, 0, causal=False),
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.id)
def test_edge_cases(case, poison_empty):
    check_case(case)


def _random_case(seed: int) -> Case:
    rng = random.Random(1000 + seed)
    h, hkv = rng.choice([(1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (3, 1)])
    lq = rng.choice([1, 2, 7, 16, 17, 33])
    lk = lq if rng.random() < 0.4 else rng.choice([1, 5, 16, 31, 33, 40])
    return Case(
        b=rng.randint(1, 2),
        lq=lq,
        lk=lk,
        h=h,
        hkv=hkv,
        d=rng.choice([32, 32, 64]),
        dtype=rng.choice(["fp32", "fp32", "fp16", "fp16", "bf16"]),
        causal=rng.random() < 0.6,
    )


@pytest.mark.parametrize("seed", range(24), ids=lambda s: _random_case(s).id)
def test_random_cases(seed, poison_empty):
    check_case(_random_case(seed), seed=seed)


def test_unsupported_head_dim():
    q = torch.randn(1, 4, 2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        attention_forward(q, q, q, True, 0.2)
    wide = torch.randn(1, 4, 2, 256, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[16, 128\], got 256"):
        attention_forward(wide, wide, wide, True, 0.2)


GPU_CASES = [
    Case(4, 256, 256, h=16, hkv=16, d=64, dtype="bf16"),
    Case(4, 256, 257, h=16, hkv=16, d=64, dtype="fp16"),
    Case(2, 300, 1000, h=8, hkv=2, d=128, dtype="bf16"),
    Case(2, 1000, 300, h=8, hkv=8, d=64, dtype="fp16", causal=False),
    Case(2, 129, 129, h=4, hkv=1, d=32, dtype="fp32"),
    Case(2, 257, 257, h=16, hkv=16, d=64, dtype="bf16", packed=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_realistic(case, poison_empty):
    check_case(case)


@pytest.mark.gpu
def test_gpu_more_batch_heads_than_grid_axis_1_allows():
    # B * H = 70,000 programs per query block: on grid axis 1 this launch would fail (limit 65,535).
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(17_500, 3, 4, 16, generator=g).to(DEVICE) for _ in range(3))
    out, lse = attention_forward(q, k, v, True, 0.25)
    want, want_lse = reference.attention_forward(q, k, v, True, 0.25)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
    dq, dk, dv = attention_backward(torch.ones_like(out), torch.zeros_like(lse), q, k, v, out, lse, True, 0.25)
    want_grads = reference.attention_backward(torch.ones_like(out), torch.zeros_like(lse), q, k, v, want, want_lse, True, 0.25)
    for got, ref in zip((dq, dk, dv), want_grads):
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
