"""Triton merge_attention_states and the split-KV combine against the reference in float64."""

from __future__ import annotations

import pytest
import torch

from arpg_kernels import reference
from arpg_kernels.triton import merge_attention_states
from arpg_kernels.triton.merge import combine_splits
from kv_cases import assert_close_to_fp64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_states(t, h, d, dtype, seed, empty_frac=0.25):
    """Two partial states; some rows have an empty key set (lse -inf, out 0) on one or both sides."""
    g = torch.Generator().manual_seed(seed)
    out_a = torch.randn(t, h, d, generator=g, dtype=torch.float64)
    out_b = torch.randn(t, h, d, generator=g, dtype=torch.float64)
    lse_a = 3 * torch.randn(t, h, generator=g, dtype=torch.float64)
    lse_b = 3 * torch.randn(t, h, generator=g, dtype=torch.float64)
    for out, lse in ((out_a, lse_a), (out_b, lse_b)):
        empty = torch.rand(t, h, generator=g) < empty_frac
        lse[empty] = float("-inf")
        out[empty] = 0.0
    to = lambda x, dt: x.to(dt).to(DEVICE)  # noqa: E731
    return to(out_a, dtype), to(lse_a, torch.float32), to(out_b, dtype), to(lse_b, torch.float32)


SHAPES = [(1, 1, 32), (5, 3, 64), (17, 16, 128), (9, 40, 32), (3, 2, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "t{}-h{}-d{}".format(*s))
def test_merge_matches_reference(shape, dtype, poison_empty):
    t, h, d = shape
    out_a, lse_a, out_b, lse_b = make_states(t, h, d, DTYPES[dtype], seed=t * 100 + h)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    hi = reference.merge_attention_states(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
    lo = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == out_a.dtype and lse.dtype == torch.float32
    assert_close_to_fp64("out", out, hi[0], lo[0])
    assert_close_to_fp64("lse", lse, hi[1], lo[1])


def test_merge_both_empty_gives_zero_and_neg_inf(poison_empty):
    out_a = torch.zeros(2, 3, 32, device=DEVICE)
    lse_a = torch.full((2, 3), float("-inf"), device=DEVICE)
    out, lse = merge_attention_states(out_a, lse_a, out_a.clone(), lse_a.clone())
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_merge_strided_inputs(poison_empty):
    # Halves that are views into wider buffers (e.g. one [T, 2, H, D] tensor holding both).
    out_a, lse_a, out_b, lse_b = make_states(6, 4, 32, torch.float32, seed=7)
    both_out = torch.stack([out_a, out_b], dim=1)  # [T, 2, H, D]
    both_lse = torch.stack([lse_a, lse_b], dim=2)  # [T, H, 2]
    out, lse = merge_attention_states(both_out[:, 0], both_lse[..., 0], both_out[:, 1], both_lse[..., 1])
    ref_out, ref_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_merge_of_attention_halves_equals_whole():
    """Attention over keys [0, n) equals the merge of attentions over [0, m) and [m, n)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 5, 2, 32, generator=g).to(DEVICE)
    k = torch.randn(1, 20, 2, 32, generator=g).to(DEVICE)
    v = torch.randn(1, 20, 2, 32, generator=g).to(DEVICE)
    whole = reference.attention_forward(q, k, v, False, 0.3)
    a = reference.attention_forward(q, k[:, :7], v[:, :7], False, 0.3)
    b = reference.attention_forward(q, k[:, 7:], v[:, 7:], False, 0.3)
    out, lse = merge_attention_states(a[0][0], a[1][0], b[0][0], b[1][0])
    torch.testing.assert_close(out, whole[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole[1][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("store_lse", [True, False])
def test_combine_splits(num_splits, dtype, store_lse, poison_empty):
    t, h, d = 4, 3, 64
    g = torch.Generator().manual_seed(num_splits)
    out_part = torch.randn(num_splits, t, h, d, generator=g, dtype=torch.float64)
    lse_part = 2 * torch.randn(num_splits, t, h, generator=g, dtype=torch.float64)
    empty = torch.rand(num_splits, t, h, generator=g) < 0.3
    empty[:, 0, 0] = True  # a row where every split is empty
    lse_part[empty] = float("-inf")
    out_part[empty] = 0.0
    # Fold the splits pairwise with the reference merge, in float64.
    ref_out, ref_lse = out_part[0], lse_part[0]
    for i in range(1, num_splits):
        ref_out, ref_lse = reference.merge_attention_states(ref_out, ref_lse, out_part[i], lse_part[i])
    out = torch.empty(t, h, d, dtype=DTYPES[dtype], device=DEVICE)
    lse = torch.empty(t, h, dtype=torch.float32, device=DEVICE) if store_lse else None
    combine_splits(out_part.float().to(DEVICE), lse_part.float().to(DEVICE), out, lse)
    assert_close_to_fp64("out", out, ref_out, ref_out.to(DTYPES[dtype]))
    if store_lse:
        assert_close_to_fp64("lse", lse, ref_lse, ref_lse.float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_merge_realistic(dtype, poison_empty):
    out_a, lse_a, out_b, lse_b = make_states(4096, 16, 64, DTYPES[dtype], seed=1)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    hi = reference.merge_attention_states(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
    lo = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert_close_to_fp64("out", out, hi[0], lo[0])
    assert_close_to_fp64("lse", lse, hi[1], lo[1])


def test_wrapper_reads_no_device_values(monkeypatch):
    """The launch path must not read tensor values on the host (that would break CUDA-graph capture)."""
    out_a, lse_a, out_b, lse_b = make_states(3, 2, 32, torch.float16, seed=5)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a device value")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    merge_attention_states(out_a, lse_a, out_b, lse_b)
