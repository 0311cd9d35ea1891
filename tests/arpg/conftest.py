"""Fixtures for the arpg tests: small models with non-trivial random weights."""

import pytest
import torch

from arpg import ARPG, RasterLM


def build_model(name="ARPG-tiny", seed=0, std=0.1, cls=None):
    """A model with normal(0, std) weights, a non-zero head and norm weights in [0.5, 1.5]."""
    if cls is None:
        cls = RasterLM if name.startswith("Raster") else ARPG
    torch.manual_seed(seed)
    model = cls(name)
    model.reset_parameters(std=std, zero_head=False)
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of norms shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning
    makes every small op ~50x slower; so these tests run single-threaded."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def make_model():
    return build_model
