"""Shared test setup: interpreter mode without a GPU, the gpu/cuda_ext markers, NaN-poisoned allocations."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # shared helpers such as kv_cases

# Triton reads TRITON_INTERPRET when it is first imported, so decide before torch (and triton) load.
HAS_GPU_DEVICE = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
if not HAS_GPU_DEVICE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Processes the tests start (torchrun ranks, training workers) print their Python stacks if they die
# on a signal: a gloo teardown once aborted one with no other trace.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _has_cuda_ext() -> bool:
    if not HAS_CUDA:
        return False
    from arpg_kernels import cuda as cuda_backend

    return cuda_backend.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "cuda_ext: needs a CUDA device and the compiled arpg_kernels._C")
    config.addinivalue_line("markers", "slow: long-running on CPU; still part of the default run")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    has_ext = None
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "cuda_ext" in item.keywords:
            if has_ext is None:
                has_ext = _has_cuda_ext()
            if not has_ext:
                item.add_marker(pytest.mark.skip(reason="no CUDA device or arpg_kernels._C not built"))


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty/empty_like/new_empty return NaN-filled floats, so rows a kernel never writes fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def _poison(t):
        if t.is_floating_point() and t.numel() > 0:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(real_new_empty(self, *a, **k)))
    yield
