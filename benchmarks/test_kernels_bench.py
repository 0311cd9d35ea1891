"""Kernel microbenchmarks through pytest-benchmark: `python -m pytest benchmarks --benchmark-only`.

Not part of the test suite (testpaths is tests/). On CPU only the reference runs; on a GPU each
available backend does. Timings through pytest-benchmark include Python overhead and a device sync
per call; `arpg-bench` (CUDA events, L2 flush, rotating inputs) is the record.
"""

import pytest
import torch

import arpg_kernels as ak

from arpg.bench.kernels import paged_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _backends():
    names = ["reference"]
    if DEVICE.type == "cuda":
        from arpg_kernels import cuda

        names.append("triton")
        if cuda.is_available():
            names.append("cuda")
    return names


def _run(fn):
    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return call


SHAPES = [dict(batch=128, q_per_seq=4), dict(batch=128, q_per_seq=16)] if DEVICE.type == "cuda" else [
    dict(batch=4, q_per_seq=4)
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s['batch']}-q{s['q_per_seq']}")
def test_paged_attention(benchmark, backend, shape):
    inputs = paged_inputs(shape["batch"], 16, 64, 257, shape["q_per_seq"], 16, DTYPE, DEVICE)
    with ak.use_backend(backend), ak.value_checks(False):
        benchmark(_run(lambda: ak.paged_attention(*inputs)))


@pytest.mark.parametrize("backend", _backends())
def test_append_kv(benchmark, backend):
    rows = 256 if DEVICE.type == "cuda" else 16
    k_cache = torch.zeros(rows, 16, 16, 64, dtype=DTYPE, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(rows, 16, 64, device=DEVICE).to(DTYPE)
    slots = torch.arange(rows, device=DEVICE) * 16
    with ak.use_backend(backend), ak.value_checks(False):
        benchmark(_run(lambda: ak.append_kv(k, k, k_cache, v_cache, slots)))
