"""Triton append_kv against the reference (exact: it only moves data)."""

from __future__ import annotations

import pytest
import torch

from arpg_kernels import reference
from arpg_kernels.triton import append_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_slots(g, t, num_slots, skip_frac=0.25):
    """Distinct random slots (as a real allocator hands out), some rows -1 (skipped)."""
    slots = torch.randperm(num_slots, generator=g)[:t]
    skip = torch.rand(t, generator=g) < skip_frac
    return torch.where(skip, torch.full_like(slots, -1), slots).to(torch.int64)


def check_append(t, num_pages, page_size, hkv, d, dtype, seed, pool=False, strided_kv=False):
    g = torch.Generator().manual_seed(seed)
    shape = (num_pages, page_size, hkv, d)
    if pool:
        k_pool = torch.randn(3, *shape, generator=g).to(dtype).to(DEVICE)
        v_pool = torch.randn(3, *shape, generator=g).to(dtype).to(DEVICE)
        k_cache, v_cache = k_pool[2], v_pool[2]
    else:
        k_cache = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
        v_cache = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    if strided_kv:
        # k and v as slices of one projection output [T, 2, Hkv, D]
        kv = torch.randn(t, 2, hkv, d, generator=g).to(dtype).to(DEVICE)
        k, v = kv[:, 0], kv[:, 1]
    else:
        k = torch.randn(t, hkv, d, generator=g).to(dtype).to(DEVICE)
        v = torch.randn(t, hkv, d, generator=g).to(dtype).to(DEVICE)
    slots = random_slots(g, t, num_pages * page_size).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.append_kv(k, v, k_ref, v_ref, slots)
    before = (k_pool.clone(), v_pool.clone()) if pool else None
    append_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)
    if pool:
        # Other layers of the pool are untouched.
        assert torch.equal(k_pool[:2], before[0][:2]) and torch.equal(v_pool[:2], before[1][:2])


CASES = [
    # (t, num_pages, page_size, hkv, d)
    (1, 1, 1, 1, 32),
    (7, 4, 16, 2, 64),
    (20, 30, 1, 2, 32),
    (33, 3, 64, 1, 64),
    (9, 5, 16, 3, 128),
    (12, 2, 16, 16, 64),
    (5, 8, 2, 4, 48),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "t{}-p{}-ps{}-hkv{}-d{}".format(*c))
def test_append_matches_reference(case, dtype):
    check_append(*case, DTYPES[dtype], seed=sum(case))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_append_into_pool_layer_view(dtype):
    check_append(10, 6, 16, 2, 64, DTYPES[dtype], seed=1, pool=True)


def test_append_strided_rows():
    check_append(10, 6, 16, 2, 64, torch.float32, seed=2, strided_kv=True, pool=True)


def test_append_all_skipped_and_empty():
    k_cache = torch.randn(2, 16, 2, 32, device=DEVICE)
    before = k_cache.clone()
    k = torch.randn(3, 2, 32, device=DEVICE)
    append_kv(k, k, k_cache, k_cache, torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(k_cache, before)
    append_kv(k[:0], k[:0], k_cache, k_cache, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(k_cache, before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_append_realistic(dtype):
    check_append(512, 1200, 16, 16, 64, DTYPES[dtype], seed=3, pool=True)


def test_wrapper_reads_no_device_values(monkeypatch):
    """The launch path must not read tensor values on the host (that would break CUDA-graph capture)."""
    k_cache = torch.zeros(2, 16, 2, 32, device=DEVICE)
    k = torch.randn(3, 2, 32, device=DEVICE)
    slots = torch.tensor([5, -1, 20], dtype=torch.int64, device=DEVICE)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a device value")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    append_kv(k, k, k_cache, k_cache, slots)
    monkeypatch.undo()
    assert torch.equal(k_cache[0, 5], k[0]) and torch.equal(k_cache[1, 4], k[2])
