"""append_kv_rope: every backend against RoPE-then-append_kv (the reference), dtypes, skipped and shuffled
slots, bad inputs, opcheck."""

import pytest
import torch

import arpg_kernels as ak
from arpg_kernels import cpu, reference
from arpg_kernels.ops import triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + (["cpu"] if cpu.is_available() else []) + (
    ["triton"] if torch.cuda.is_available() or triton_interpreting() else [])
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _table(t: int, d: int, g: torch.Generator) -> torch.Tensor:
    """A RoPE table of random positions: [T, D // 2, 2] float32 (cos, sin)."""
    pos = torch.randint(0, 256, (t, 1), generator=g).float()
    freqs = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    angle = pos * freqs[None, :]
    return torch.stack([angle.cos(), angle.sin()], dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2, 64), (17, 3, 16), (1, 1, 8), (9, 4, 30), (0, 2, 16)])
def test_matches_rope_then_append(backend, dtype, shape):
    t, hkv, d = shape
    dev = DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(t * 31 + d)
    dt = DTYPES[dtype]
    k, v = (torch.randn(t, hkv, d, generator=g).to(dev, dt) for _ in range(2))
    table = _table(t, d, g).to(dev)
    pages, page_size = 4, 8
    slots = torch.randperm(pages * page_size, generator=g)[:t]
    if t > 2:
        slots[1] = -1  # skipped
    slots = slots.to(dev)
    caches = [(torch.randn(pages, page_size, hkv, d, generator=g).to(dev, dt),) * 1 for _ in range(2)]
    k_want, v_want = (c[0].clone() for c in caches)
    reference.append_kv(reference.rope(k, table), v, k_want, v_want, slots)
    k_got, v_got = (c[0].clone() for c in caches)
    with ak.use_backend(backend):
        ak.append_kv_rope(k, v, k_got, v_got, slots, table)
    # Same float32 products and sums, rounded once to the cache's dtype (a GPU may fuse one into an FMA).
    tol = 0 if dev == "cpu" else 1e-6 if dt == torch.float32 else 1e-2
    torch.testing.assert_close(k_got, k_want, atol=tol, rtol=tol)
    torch.testing.assert_close(v_got, v_want, atol=0, rtol=0)


def test_rope_of_the_op_is_the_models():
    from arpg.model import apply_rope

    g = torch.Generator().manual_seed(0)
    x, table = torch.randn(7, 3, 16, generator=g), _table(7, 16, g)
    assert torch.equal(reference.rope(x, table), apply_rope(x, table))
    with torch.inference_mode():
        assert torch.equal(reference.rope(x, table), apply_rope(x, table))  # the complex-multiply path


@pytest.mark.parametrize(
    "rope, message",
    [
        (torch.zeros(3, 8, 2, dtype=torch.float64), "rope must be float32"),
        (torch.zeros(3, 4, 2), r"rope must have shape \[T, D // 2, 2\]"),
        (torch.zeros(2, 8, 2), r"rope must have shape \[T, D // 2, 2\]"),
        (torch.zeros(3, 8), "rope must have rank 3"),
    ],
)
def test_bad_rope_tables_are_refused_by_name(rope, message):
    k = v = torch.zeros(3, 2, 16)
    kc, vc = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    with pytest.raises(ValueError, match=message):
        ak.append_kv_rope(k, v, kc, vc, torch.tensor([0, 1, 2]), rope)


def test_odd_head_dim_is_refused():
    k = v = torch.zeros(3, 2, 15)
    kc, vc = torch.zeros(2, 4, 2, 15), torch.zeros(2, 4, 2, 15)
    with pytest.raises(ValueError, match="RoPE needs an even head_dim"):
        ak.append_kv_rope(k, v, kc, vc, torch.tensor([0, 1, 2]), torch.zeros(3, 7, 2))


def test_opcheck_append_kv_rope():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    kc, vc = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    torch.library.opcheck(torch.ops.arpg.append_kv_rope.default,
                          (k, v, kc, vc, torch.tensor([0, 3, -1, 11, 5]), _table(5, 8, g)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
