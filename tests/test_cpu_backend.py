"""The CPU C++ backend (csrc/cpu/, arpg_kernels.cpu) against the float64 reference, on the cases every
backend's kernel test draws (tests/kv_cases.py), and its place in the dispatch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import arpg_kernels as ak
from arpg_kernels import cpu
from kv_cases import EDGE_CASES, Case, assert_close_to_fp64, check_paged_kernel, make_inputs, random_case

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"CPU kernels not built: {cpu.load_error()}")


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.id)
def test_edge_cases(case, poison_empty):
    check_paged_kernel(cpu.paged_attention, case, device="cpu")


@pytest.mark.parametrize("seed", range(60), ids=lambda s: random_case(s).id)
def test_random_cases(seed, poison_empty):
    check_paged_kernel(cpu.paged_attention, random_case(seed), seed, device="cpu")


@pytest.mark.parametrize("d", [8, 24, 40, 80, 128])  # odd head sizes: the tail of the 8-wide dot product
def test_head_dims(d):
    check_paged_kernel(cpu.paged_attention, Case((3, 1), (37, 20), d=d, h=4, hkv=2, causal=True), device="cpu")


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_result(threads):
    case = Case((40, 3, 17), (60, 45, 80), causal=True, h=4, hkv=1, d=32)
    inputs = make_inputs(case, device="cpu")
    args = (*inputs, 40, True, 32**-0.5, True)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = cpu.paged_attention(*args)
        torch.set_num_threads(threads)
        got = cpu.paged_attention(*args)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # work items never share a row


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_heads_per_item_do_not_change_the_result(dtype):
    # Few-row sequences are served several KV heads per work item, tile by tile, as many as leave 4 items per
    # thread: 1, 2 and 8 threads group the 8 heads differently; every head's arithmetic is the same.
    case = Case((1, 2, 1, 3, 1, 1), (300, 45, 0, 129, 16, 77), h=16, hkv=8, d=64, dtype=dtype, causal=True)
    inputs = make_inputs(case, device="cpu")
    args = (*inputs, 3, True, 64**-0.5, True)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            outs.append(cpu.paged_attention(*args))
    finally:
        torch.set_num_threads(prev)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
    check_paged_kernel(cpu.paged_attention, case, device="cpu")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scratch_reused_across_paths(dtype, poison_empty):
    # One thread runs every work item on one scratch, costliest first: the many-row (AVX-512) items, then
    # the few-row ones, each ending in a partial tile next to NaN slots; the scratch is not cleared between
    # items. (csrc/tests/cpu_kernel_tests.cpp fills it with NaN before every item, which catches a read of
    # anything an item did not write itself.)
    case = Case((12, 9, 3, 1, 2), (45, 37, 29, 20, 7), h=2, hkv=2, d=64, dtype=dtype)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        check_paged_kernel(cpu.paged_attention, case, device="cpu")
    finally:
        torch.set_num_threads(prev)


def test_auto_and_cpu_backends_route_here(monkeypatch):
    case = Case((2, 1), (20, 9), causal=True)
    q, kc, vc, bt, kvl, cu = make_inputs(case, device="cpu")
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    calls = []
    real = cpu.paged_attention
    monkeypatch.setattr(cpu, "paged_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("auto", "cpu"):
        with ak.use_backend(name):
            ak.paged_attention(q, kc, vc, bt, kvl, cu, 2, causal=True)
    assert len(calls) == 2
    with ak.use_backend("reference"):
        ak.paged_attention(q, kc, vc, bt, kvl, cu, 2, causal=True)
    assert len(calls) == 2


def test_shared_checks_refuse_bad_input_first():
    case = Case((2, 1), (20, 9))
    q, kc, vc, bt, kvl, cu = make_inputs(case, device="cpu")
    with ak.use_backend("cpu"), pytest.raises(ValueError, match="block_table"):
        ak.paged_attention(q, kc, vc, bt + 100, kvl, cu, 2)


def test_opcheck_and_compile():
    case = Case((2, 3), (20, 33), causal=True, h=4, hkv=2)
    q, kc, vc, bt, kvl, cu = make_inputs(case, device="cpu")
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    torch.library.opcheck(torch.ops.arpg_cpu.paged_attention.default, (q, kc, vc, bt, kvl, cu, 3, True, 0.2, True))

    def step(q, kc, vc):
        return ak.paged_attention(q, kc, vc, bt, kvl, cu, 3, causal=True, scale=0.2)

    with ak.use_backend("cpu"):
        eager = step(q, kc, vc)
        compiled = torch.compile(step, fullgraph=True, backend="eager")(q, kc, vc)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool", [False, True])
def test_append_kv_matches_reference(dtype, pool):
    g = torch.Generator().manual_seed(3)
    shape = (5, 4, 3, 24)  # pages, page size, Hkv, D
    if pool:  # layer 1 of a 3-layer pool, and k, v slices of wider tensors: strided views
        kc, vc = torch.randn(3, *shape, generator=g).to(dtype)[1], torch.randn(3, *shape, generator=g).to(dtype)[1]
        k = torch.randn(7, 4, 24, generator=g).to(dtype)[:, 1:]
        v = torch.randn(7, 4, 24, generator=g).to(dtype)[:, :3]
    else:
        kc, vc = torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)
        k, v = torch.randn(7, 3, 24, generator=g).to(dtype), torch.randn(7, 3, 24, generator=g).to(dtype)
    slots = torch.tensor([0, 19, -1, 5, 6, -1, 13])
    want_k, want_v = kc.clone(), vc.clone()
    ak.reference.append_kv(k, v, want_k, want_v, slots)
    cpu.append_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_append_kv_routes_here_and_keeps_the_shared_checks(monkeypatch):
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    calls = []
    real = cpu.append_kv
    monkeypatch.setattr(cpu, "append_kv", lambda *a: calls.append(1) or real(*a))
    ak.append_kv(torch.ones(1, 1, 8), torch.ones(1, 1, 8), kc, vc, torch.tensor([5]))
    assert calls == [1] and kc[1, 1].eq(1).all() and kc.sum() == 8
    with pytest.raises(ValueError, match="out of range"):
        ak.append_kv(torch.ones(1, 1, 8), torch.ones(1, 1, 8), kc, vc, torch.tensor([8]))
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strided", [False, True])
def test_merge_attention_states_matches_reference(dtype, strided):
    g = torch.Generator().manual_seed(0)
    out_a, out_b = (torch.randn(33, 4, 40, generator=g).to(dtype) for _ in range(2))
    lse_a, lse_b = (3 * torch.randn(33, 4, generator=g) for _ in range(2))
    lse_a[::3] = float("-inf")
    lse_b[1::3] = float("-inf")
    lse_a[2::6] = lse_b[2::6] = float("-inf")
    # An empty state's output is ignored, even NaN (a split that saw no key may leave anything there).
    out_a[torch.isneginf(lse_a)] = float("nan")
    out_b[torch.isneginf(lse_b)] = float("nan")
    if strided:  # heads of a wider tensor, and LSE transposed from [H, T]
        out_a = torch.cat([out_a, out_a], dim=1)[:, 2:6]
        lse_a = lse_a.t().contiguous().t()
    out, lse = cpu.merge_attention_states(out_a, lse_a, out_b, lse_b)
    hi = ak.reference.merge_attention_states(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
    lo = ak.reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert_close_to_fp64("out", out, hi[0], lo[0])
    assert_close_to_fp64("lse", lse, hi[1], lo[1])
    assert torch.equal(out[2::6], torch.zeros_like(out[2::6])) and torch.isneginf(lse[2::6]).all()


def test_merge_attention_states_routes_here_with_the_shared_checks(monkeypatch):
    out, lse = torch.randn(5, 2, 8), torch.randn(5, 2)
    calls = []
    real = cpu.merge_attention_states
    monkeypatch.setattr(cpu, "merge_attention_states", lambda *a: calls.append(1) or real(*a))
    ak.merge_attention_states(out, lse, out, lse)
    assert calls == [1]
    with pytest.raises(ValueError, match="lse_b"):
        ak.merge_attention_states(out, lse, out, lse[:4])
    assert calls == [1]
    torch.library.opcheck(torch.ops.arpg_cpu.merge_attention_states.default, (out, lse, out, lse))


# dense attention: torch's CPU flash attention where its semantics are ours ---------------------


def _dense(b, lq, lk, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, lk, hkv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, lk, hkv, d, generator=g).to(dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq,lk,h,hkv,causal", [(9, 9, 4, 2, True), (5, 13, 4, 1, False), (16, 16, 2, 2, True)])
def test_dense_attention_forward_and_backward_match_float64(dtype, lq, lk, h, hkv, causal, monkeypatch):
    q, k, v = _dense(2, lq, lk, h, hkv, 24, dtype, seed=lq + lk)
    flash = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(cpu.torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda *a, **kw: flash.append(1) or real(*a, **kw), raising=False)
    out, lse = ak.attention(q, k, v, causal=causal, scale=0.3, return_lse=True)
    assert flash == ([] if dtype == torch.float16 else [1]) and out.dtype == dtype and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = ak.reference.attention_forward(q64, k64, v64, causal, 0.3)
    g64 = torch.autograd.grad(o64, (q64, k64, v64), dout.double())
    lo = ak.reference.attention_forward(*(t.detach() for t in (q, k, v)), causal, 0.3)
    assert_close_to_fp64("out", out, o64, lo[0])
    if dtype == torch.bfloat16:  # torch's bf16 kernel: LSE within 1e-4 (far below a bf16 output's resolution)
        torch.testing.assert_close(lse.double(), l64.double(), atol=1e-4, rtol=1e-5)
    else:
        assert_close_to_fp64("lse", lse, l64, lo[1])
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), g64):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("lq,lk", [(7, 4), (3, 8), (5, 0)])
def test_dense_attention_keeps_the_reference_where_torch_differs(lq, lk):
    # causal with Lq != Lk (torch's mask is top-left, ours bottom-right), and no keys at all
    q, k, v = _dense(1, lq, lk, 2, 1, 8, torch.float32)
    out, lse = cpu.attention_forward(q.detach(), k.detach(), v.detach(), True, 0.5)
    want = ak.reference.attention_forward(q.detach(), k.detach(), v.detach(), True, 0.5)
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, want[1], rtol=0, atol=0)


def test_dense_attention_gradient_through_the_lse_takes_the_reference():
    q, k, v = _dense(2, 6, 6, 4, 2, 16, torch.float32)
    out, lse = ak.attention(q, k, v, causal=True, return_lse=True)
    w = torch.randn_like(lse)
    grads = torch.autograd.grad((out.sum() + (lse * w).sum()), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = ak.reference.attention_forward(q64, k64, v64, True, 16**-0.5)
    want = torch.autograd.grad(o64.sum() + (l64 * w.double()).sum(), (q64, k64, v64))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)


def test_unchecked_bad_indices_stay_inside_the_tensors():
    # With value checks off, the kernel itself refuses queries outside q and clamps pages and lengths.
    case = Case((2, 3), (20, 9))
    q, kc, vc, bt, kvl, cu = make_inputs(case, device="cpu")
    with ak.value_checks(False), ak.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="cu_q_lens"):
            ak.paged_attention(q, kc, vc, bt, kvl, torch.tensor([0, 2, 9], dtype=torch.int32), 3)
        with pytest.raises(RuntimeError, match="cu_q_lens"):
            ak.paged_attention(q, kc, vc, bt, kvl, torch.tensor([0, 3, 2], dtype=torch.int32), 3)
        out, _ = ak.paged_attention(q, kc, vc, bt * 0 + 10**6, kvl * 0 + 10**6, cu, 3)  # clamped: garbage, not a crash
        assert out.shape == q.shape
        before = kc.clone()
        row = q[:1, : kc.shape[2]]
        ak.append_kv(row, row, kc, vc, torch.tensor([10**9]))  # outside the cache: skipped
        assert torch.equal(torch.nan_to_num(kc, 7.0), torch.nan_to_num(before, 7.0))
    with pytest.raises(ValueError, match="cu_q_lens"):  # checks on again
        ak.paged_attention(q, kc, vc, bt, kvl, torch.tensor([0, 2, 9], dtype=torch.int32), 3)


# the decoding step's one-op elementwise chains (csrc/cpu/step_ops.cpp) ------------------------------------------


def _step_inputs(dtype, rows, dim, layout, g):
    """x, y [rows, dim] in `layout`: contiguous, strided (every other row of a wider tensor, last dim
    sliced) or broadcast (one row, stride 0: the [MASK] query stream)."""
    def make():
        if layout == "broadcast":
            return torch.randn(1, dim, generator=g).to(dtype).expand(rows, dim)
        if layout == "strided":
            return torch.randn(2 * rows, dim + 5, generator=g).to(dtype)[::2, 3 : 3 + dim]
        return torch.randn(rows, dim, generator=g).to(dtype)
    return make(), make()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "broadcast"])
@pytest.mark.parametrize("rows,dim", [(0, 16), (1, 8), (37, 96), (300, 130)])
def test_step_ops_match_the_torch_ops_they_replace(dtype, layout, rows, dim):
    from arpg.model import FeedForward, RMSNorm  # noqa: F401  (the modules whose math these are)

    g = torch.Generator().manual_seed(rows * dim)
    x, y = _step_inputs(dtype, rows, dim, layout, g)
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=g)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=0, rtol=0)  # float: sum order only
    with torch.inference_mode():
        if dtype == torch.float16:
            tol = dict(atol=1e-3, rtol=1e-3)  # a half ulp where the sum of squares rounds across a boundary
        torch.testing.assert_close(cpu.rms_norm(x, norm.weight, norm.eps), norm(x), **tol)
        h, n = cpu.add_rms_norm(x, y, norm.weight, norm.eps)
        assert torch.equal(h, x + y) and h.is_contiguous() and n.is_contiguous()
        torch.testing.assert_close(n, norm(x + y), **tol)
        a = x * 6
        want = torch.nn.functional.silu(a) * y
        ulp = dict(atol=4e-6, rtol=4e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(cpu.silu_mul(a, y), want, **ulp)  # exp to about an ulp: one 16-bit rounding
        if dim % 2 == 0:
            q = torch.randn(rows, 6, dim, generator=g).to(dtype)
            q = q[:, ::2] if layout == "strided" else q[:, :3]  # heads 2 * dim apart, or rows 6 * dim apart
            if layout == "broadcast" and rows:
                q = q[:1].expand(rows, 3, dim)  # one projected [MASK] row for every query
            table = torch.randn(rows, dim // 2, 2, generator=g)
            from arpg_kernels import reference

            # The original's products and sums, unfused: equal to the real-op oracle.
            assert torch.equal(cpu.rope(q, table), reference.rope(q, table))


@pytest.mark.parametrize("threads", [1, 2])
def test_step_ops_threads_give_the_same_result(threads):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(700, 128, generator=g), torch.randn(700, 128, generator=g)
    w = torch.randn(128, generator=g)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = cpu.add_rms_norm(x, y, w, 1e-5), cpu.silu_mul(x, y)
        torch.set_num_threads(threads)
        got = cpu.add_rms_norm(x, y, w, 1e-5), cpu.silu_mul(x, y)
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip([*want[0], want[1]], [*got[0], got[1]]))


@pytest.mark.parametrize("call, match", [
    (lambda: cpu.rms_norm(torch.randn(4, 8), torch.randn(7), 1e-5), "weight must be contiguous \\[dim\\]"),
    (lambda: cpu.rms_norm(torch.randn(4, 8), torch.randn(8).double(), 1e-5), "in x's dtype"),
    (lambda: cpu.rms_norm(torch.randn(2, 4, 8), torch.randn(8), 1e-5), "x must be \\[rows, dim\\]"),
    (lambda: cpu.rms_norm(torch.randn(8, 4).t(), torch.randn(8), 1e-5), "contiguous last dim"),
    (lambda: cpu.rms_norm(torch.randn(4, 8).double(), torch.randn(8).double(), 1e-5), "dtype must be float32"),
    (lambda: cpu.add_rms_norm(torch.randn(4, 8), torch.randn(3, 8), torch.randn(8), 1e-5), "y must match x"),
    (lambda: cpu.silu_mul(torch.randn(4, 8), torch.randn(4, 8).half()), "a and b must match"),
    (lambda: cpu.rope(torch.randn(4, 2, 7), torch.randn(4, 3, 2)), "D even"),
    (lambda: cpu.rope(torch.randn(4, 2, 8), torch.randn(3, 4, 2)), "rope must be contiguous float32"),
    (lambda: cpu.rope(torch.randn(4, 2, 8), torch.randn(4, 4, 2).double()), "rope must be contiguous float32"),
])
def test_step_ops_refuse_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_step_ops_opcheck():
    x, y, w = torch.randn(5, 16), torch.randn(5, 16), torch.randn(16)
    torch.library.opcheck(torch.ops.arpg_cpu.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.arpg_cpu.add_rms_norm.default, (x, y, w, 1e-5))
    torch.library.opcheck(torch.ops.arpg_cpu.silu_mul.default, (x, y))
    torch.library.opcheck(torch.ops.arpg_cpu.rope.default, (torch.randn(5, 2, 16), torch.randn(5, 8, 2)))


def test_decoding_takes_the_step_ops_only_where_they_apply(monkeypatch):
    from arpg import ARPG, RasterLM, generate
    from arpg.config import ARPGConfig
    from arpg.model import step_fusions, step_ops, whole_step

    assert cpu.step_ops_available()
    calls = []
    for name in ("rms_norm", "add_rms_norm", "silu_mul", "rope"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    cfg = ARPGConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=4, grid_size=4)
    torch.manual_seed(0)
    model, raster = ARPG(cfg).eval(), RasterLM(cfg).eval()
    labels = torch.tensor([0, 3])
    with whole_step(False):  # op by op from Python (the whole-step op calls them from C++)
        tokens = generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
        assert {"rms_norm", "add_rms_norm", "silu_mul", "rope"} <= set(calls)
        generate(raster, labels, cfg_scale=2.0, seed=1)
    calls.clear()
    with step_fusions(False):  # the reference path: torch ops only
        assert torch.equal(generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1), tokens)
    with ak.use_backend("reference"):
        generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    assert calls == []
    with torch.inference_mode():
        w = torch.ones(4)
        assert step_ops(torch.zeros(2, 4), w) is cpu
        assert step_ops(torch.zeros(2, 4, dtype=torch.float64), w.double()) is None  # a dtype they do not take
        assert step_ops(torch.zeros(2, 4, dtype=torch.bfloat16), w) is None  # weights in another dtype
        assert step_ops(torch.zeros(2, 4, device="meta"), w.to("meta")) is None


def test_silu_mul_at_the_ends_of_the_range():
    a = torch.tensor([[-float("inf"), -1e4, -100.0, -87.5, -86.0, -20.0, 0.0, 20.0, 100.0, float("inf"), float("nan"),
                       -0.0, 1e-30, -1e-30, 3.0, -3.0]])
    want = torch.nn.functional.silu(a)
    torch.testing.assert_close(cpu.silu_mul(a, torch.ones_like(a)), want, atol=1e-30, rtol=4e-6, equal_nan=True)


def test_a_library_without_the_step_ops_still_serves_the_others(monkeypatch):
    """A _cpu built before the step ops: the module imports, its other ops work, decoding keeps torch ops."""
    import importlib

    real = torch._C._dispatch_has_kernel_for_dispatch_key
    stale = {f"arpg_cpu::{op}" for op in cpu.STEP_OPS}
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda name, key: False if name in stale else real(name, key))
    try:
        importlib.reload(cpu)
        assert cpu.is_available() and not cpu.step_ops_available()
        from arpg import model as arpg_model

        monkeypatch.setattr(arpg_model, "_cpu_step_ops", None)
        with torch.inference_mode():
            assert arpg_model.step_ops(torch.zeros(2, 4), torch.ones(4)) is None
    finally:
        monkeypatch.undo()
        importlib.reload(cpu)
    assert cpu.step_ops_available()


def _whole_step_models(dtype):
    from arpg import ARPG, RasterLM
    from arpg.config import ARPGConfig

    cfg = ARPGConfig(dim=64, n_layer=4, n_head=2, vocab_size=64, num_classes=4, grid_size=4)
    torch.manual_seed(0)
    models = ARPG(cfg).to(dtype=dtype).eval(), RasterLM(cfg).to(dtype=dtype).eval()
    for p in (*models[0].parameters(), *models[1].parameters()):
        torch.nn.init.normal_(p, 0.0, 0.1)  # a nonzero head: the logits say something
    return models


@pytest.fixture
def one_group():
    """The whole-step op as one group (`step_groups(False)`), called once a step (`step_loop(False)`: the tests
    that take it count the op's calls): its logits are the op-by-op path's bit for bit."""
    from arpg.model import step_groups, step_loop

    with step_groups(False), step_loop(False):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_step_op_gives_the_logits_of_the_step_op_by_op(dtype, monkeypatch, one_group):
    """arpg_cpu::decode_step run as one group runs the step-op path's ops in its order: the same logits bit for
    bit, for ARPG (guidance, per-sample orders) and the raster model, and for an edit (known tokens fed causally
    at step 0) whose samples feed and predict different numbers of tokens (varlen rows). (Thread groups round as
    smaller matmuls do: test_whole_step_thread_groups_match_one_group.)"""
    from arpg.edit import inpaint
    from arpg.engine import Engine
    from arpg.model import whole_step

    assert cpu.decode_step_available()
    calls = []
    real = cpu.decode_step
    monkeypatch.setattr(cpu, "decode_step", lambda *a: calls.append(1) or real(*a))
    model, raster = _whole_step_models(dtype)
    labels = torch.tensor([0, 3, 1])
    for m, kw in ((model, dict(num_steps=5)), (raster, {})):
        engine = Engine(m, 6)
        calls.clear()
        got = engine.generate(labels, cfg_scale=2.5, seed=[1, 2, 3], return_logits=True, **kw)
        assert len(calls) == len(got[1])
        with whole_step(False):
            want = engine.generate(labels, cfg_scale=2.5, seed=[1, 2, 3], return_logits=True, **kw)
        assert torch.equal(got[0], want[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
        # Guided sampling: the op mixes the guidance before the head as the step op by op does.
        calls.clear()
        got_tokens = engine.generate(labels, cfg_scale=2.5, seed=[1, 2, 3], **kw)
        assert len(calls) == len(got[1])
        with whole_step(False):
            assert torch.equal(got_tokens, engine.generate(labels, cfg_scale=2.5, seed=[1, 2, 3], **kw))
    image = torch.randint(0, 64, (3, 16))
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5], mask[1, 3:12], mask[2, 10:] = True, True, True  # a different number of known tokens each
    calls.clear()
    got = inpaint(model, image, mask, labels, num_steps=4, cfg_scale=2.0, seed=[4, 5, 6])
    assert calls
    with whole_step(False):
        assert torch.equal(got, inpaint(model, image, mask, labels, num_steps=4, cfg_scale=2.0, seed=[4, 5, 6]))


def _threads(prof, name: str) -> int:
    """The number of threads on which torch.profiler saw ops called `name`."""
    return len({e.thread for e in prof.events() if e.name == name})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_step_thread_groups_match_one_group(dtype, monkeypatch):
    """With two threads the op runs the layers in two groups of sequences, one per thread (the profiler sees every
    step's attention on both): the logits are the one-group step's within rounding (its matmuls have fewer rows),
    every step fed the same tokens (teacher_tokens), for ARPG with varlen plans (known tokens fed causally, other
    counts per sample, a sample idle in the last steps) and for the raster model. Guided steps: each step's guided
    logits match the one-group op's on the same cache, where the groups hold whole conditional / unconditional
    pairs (and mix the guidance and run the head) and where they cannot (one sample: the head runs after them);
    guided sampling draws the same tokens (a rounding moves a draw only for a uniform that close to a boundary)."""
    from torch.profiler import ProfilerActivity, profile

    from arpg.engine import Engine, make_plan
    from arpg.model import step_groups

    model, raster = _whole_step_models(dtype)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 3, 1])
    teacher = torch.randint(0, 64, (3, 16), generator=g)
    plans = []
    for known, steps in ((list(range(5)), 4), ([], 5), (list(range(3, 12)), 2)):
        order = [t for t in torch.randperm(16, generator=g).tolist() if t not in known]
        plans.append(make_plan(16, steps, order, cfg_scale=2.5, cfg_schedule="linear", known=known))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for m, kw in ((model, dict(num_steps=5)), (raster, {})):
            engine = Engine(m, 6)
            if m is model:
                run = lambda: engine.run(plans, labels, teacher, use_cfg=True, return_logits=True,  # noqa: E731
                                         teacher_tokens=teacher)
            else:
                run = lambda: engine.generate(labels, cfg_scale=2.5, return_logits=True,  # noqa: E731
                                              teacher_tokens=teacher)
            with profile(activities=[ProfilerActivity.CPU]) as grouped:
                got = run()
            with profile(activities=[ProfilerActivity.CPU]) as one, step_groups(False):
                want = run()
            assert _threads(grouped, "arpg_cpu::paged_attention") == 2
            assert _threads(one, "arpg_cpu::paged_attention") == 1
            assert len(got[1]) == len(want[1]) > 0
            for a, b in zip(got[1], want[1]):
                torch.testing.assert_close(a, b, **tol)
            tokens = engine.generate(labels, cfg_scale=2.5, seed=[1, 2, 3], **kw)
            with step_groups(False):
                assert torch.equal(tokens, engine.generate(labels, cfg_scale=2.5, seed=[1, 2, 3], **kw))
            calls = []
            with monkeypatch.context() as patch:
                real = cpu.decode_step

                def both(*a):
                    with profile(activities=[ProfilerActivity.CPU]) as grouped:
                        got = real(*a)
                    # Again as one group: rewrites this step's K/V, rounded as one group rounds them.
                    with profile(activities=[ProfilerActivity.CPU]) as one:
                        torch.testing.assert_close(got, real(*a[:14], False), **tol)
                    # The guidance's mix (aten::sub, only there): in both groups where they hold whole pairs.
                    calls.append((samples, a[13] is not None, _threads(grouped, "arpg_cpu::paged_attention"),
                                  _threads(one, "arpg_cpu::paged_attention"), _threads(grouped, "aten::sub")))
                    return got

                patch.setattr(cpu, "decode_step", both)
                patch.setattr(m, "decode_loop", lambda *a, **kw: False)  # a step at a time, through `both`
                samples = 3
                if m is model:
                    engine.run(plans, labels, teacher, use_cfg=True, generator=[g] * 3)
                engine.generate(labels, cfg_scale=2.5, seed=[1, 2, 3], **kw)
                samples = 1
                engine.generate(labels[:1], cfg_scale=2.5, seed=[1], **kw)
            assert {n for n, *_ in calls} == {1, 3}
            assert all(c == [True, 2, 1, 2 if n == 3 else 1] for n, *c in calls), calls
    finally:
        torch.set_num_threads(prev)


def test_whole_step_thread_groups_only_for_weights_the_caches_hold():
    """Every group reads every weight: a model over 16 MiB of weights runs each step as one group (the profiler
    sees its attention on one thread), and its logits are the op-by-op path's bit for bit."""
    from torch.profiler import ProfilerActivity, profile

    from arpg.config import ARPGConfig
    from arpg.engine import Engine
    from arpg.model import ARPG, whole_step

    cfg = ARPGConfig(dim=256, n_layer=8, n_head=4, vocab_size=4096, num_classes=4, grid_size=4)
    model = ARPG(cfg).eval()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) > 16 << 20
    labels = torch.tensor([0, 3])
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine(model, 4)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = engine.generate(labels, 3, cfg_scale=2.0, seed=[1, 2], return_logits=True)
        with whole_step(False):
            want = engine.generate(labels, 3, cfg_scale=2.0, seed=[1, 2], return_logits=True)
    finally:
        torch.set_num_threads(prev)
    assert _threads(prof, "arpg_cpu::paged_attention") == 1
    assert len(got[1]) == len(want[1]) == 3 and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_whole_step_op_only_where_it_applies(monkeypatch, one_group):
    from arpg import generate
    from arpg import model as arpg_model
    from arpg.model import step_fusions, whole_step

    calls = []
    real = cpu.decode_step
    monkeypatch.setattr(cpu, "decode_step", lambda *a: calls.append(1) or real(*a))
    model, raster = _whole_step_models(torch.float32)
    labels = torch.tensor([0, 3])
    tokens = generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    assert len(calls) == 3
    generate(raster, labels, cfg_scale=2.0, seed=1)
    assert len(calls) == 3 + 16
    calls.clear()
    with whole_step(False):
        assert torch.equal(generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1), tokens)
    with step_fusions(False):
        generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    with ak.use_backend("reference"):
        generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    monkeypatch.setattr(arpg_model, "FUSED_ROPE_APPEND", set())  # its appends rotate K inside the op
    generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "decode_step", lambda *a: calls.append(1) or real(*a))
    model.layers.cross_dec[0].ffn_norm.eps = 1e-3  # one eps for every norm, or op by op
    generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    assert calls == []
    model.layers.cross_dec[0].ffn_norm.eps = model.norm.eps
    generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    assert len(calls) == 3


def test_whole_step_op_sees_replaced_and_updated_weights(monkeypatch, one_group):
    """The op's weight lists are kept per model: a parameter or layer set anew (also behind the registration
    hooks' back), layers reordered, a weight changed in place and a dtype conversion all show in the next step."""
    from arpg import generate
    from arpg.model import CrossDecoder, whole_step

    calls = []
    real = cpu.decode_step
    monkeypatch.setattr(cpu, "decode_step", lambda *a: calls.append(1) or real(*a))
    model, _ = _whole_step_models(torch.float32)
    labels = torch.tensor([0, 3])

    def both():
        calls.clear()
        got = generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1, return_logits=True)
        assert len(calls) == 3  # the op ran every step
        with whole_step(False):
            want = generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1, return_logits=True)
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
        return got[1][0]

    seen = [both()]
    model.head.weight = torch.nn.Parameter(torch.randn_like(model.head.weight))
    seen.append(both())
    with torch.no_grad():
        model.layers.self_dec[0].attn.to_v.weight.mul_(2.0)
    seen.append(both())
    torch.manual_seed(1)
    model.layers.cross_dec[1] = CrossDecoder(model.config).eval()
    seen.append(both())
    w2 = model.layers.self_dec[1].ffn.w2
    w2._parameters["weight"] = torch.nn.Parameter(torch.randn_like(w2.weight) * 0.1)
    seen.append(both())
    model.layers.self_dec.insert(0, model.layers.self_dec.pop(1))  # ModuleList edits skip the hooks
    seen.append(both())
    assert all(not torch.equal(x, y) for x, y in zip(seen, seen[1:]))
    model.to(torch.bfloat16)
    assert both().dtype == torch.float32


def test_whole_step_op_leaves_what_it_would_skip_to_the_modules(monkeypatch):
    """A bias, a forward hook (a module's or a global one), a parametrized weight or weights that need a
    gradient: the step runs op by op (and the hook fires); the logits are those of the modules."""
    from arpg import generate
    from arpg.engine import Engine
    from arpg.model import cpu_decode_step

    calls = []
    real, real_loop = cpu.decode_step, cpu.decode_loop
    monkeypatch.setattr(cpu, "decode_step", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu, "decode_loop", lambda *a: calls.append("loop") or real_loop(*a))  # sampling runs
    model, _ = _whole_step_models(torch.float32)
    labels = torch.tensor([0, 3])
    generate(model, labels, num_steps=3, seed=1)
    assert calls and set(calls) == {"loop"}  # the whole generation in the one op (in chunks of steps)
    calls.clear()
    fired = []
    proj = model.layers.cross_dec[0].attn.proj
    handle = proj.register_forward_hook(lambda m, i, o: fired.append(1))
    generate(model, labels, num_steps=3, seed=1)
    handle.remove()
    assert fired and calls == []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: fired.append(2))
    generate(model, labels, num_steps=3, seed=1)
    handle.remove()
    assert 2 in fired and calls == []
    torch.nn.utils.parametrize.register_parametrization(proj, "weight", torch.nn.Identity())
    generate(model, labels, num_steps=3, seed=1)
    torch.nn.utils.parametrize.remove_parametrizations(proj, "weight")
    assert calls == []
    proj.bias = torch.nn.Parameter(torch.ones(64))
    with_bias = generate(model, labels, num_steps=3, seed=1, return_logits=True)[1]
    assert calls == []
    proj.bias = None
    without = generate(model, labels, num_steps=3, seed=1, return_logits=True)[1]
    assert len(calls) == 3 and not torch.equal(with_bias[0], without[0])
    # Under autograd with only some weights trainable, the step keeps its graph.
    engine = Engine(model, 2)
    from arpg.engine import generation_plans

    seq_ids, inputs = engine._prepare(generation_plans(model, 2, 3, "arccos", 1.0, "constant", None, None), 2, 16)
    try:
        inp = inputs[0]
        model.embeddings.weight.requires_grad_(False)
        with torch.enable_grad():
            assert cpu_decode_step(model, model.layers.self_dec, model.class_ids(torch.tensor([0, 1])), inp.pos_in,
                                   inp.pos_q, model.rope_table("cpu"), engine.cache, inp.batch, False,
                                   model.layers) is None
    finally:
        engine.cache.free(seq_ids)


def test_whole_step_op_on_a_larger_grid_and_with_no_queries(one_group):
    """Resolution expansion (RoPE positions of a larger grid) matches the op-by-op step; a step with no query
    rows gives no logits."""
    from torch.profiler import ProfilerActivity, profile

    from arpg.edit import expand
    from arpg.engine import Engine, generation_plans
    from arpg.model import cpu_decode_step, step_groups, whole_step

    model, _ = _whole_step_models(torch.float32)
    got = expand(model, torch.tensor([1, 2]), (5, 6), num_steps=4, cfg_scale=2.0, seed=[3, 4])
    with whole_step(False):
        assert torch.equal(got, expand(model, torch.tensor([1, 2]), (5, 6), num_steps=4, cfg_scale=2.0, seed=[3, 4]))
    engine = Engine(model, 2)
    seq_ids, inputs = engine._prepare(generation_plans(model, 2, 3, "arccos", 1.0, "constant", None, None), 2, 16)
    try:
        inp, b = inputs[0], inputs[0].batch
        none = dataclasses.replace(b, cu_q=torch.zeros_like(b.cu_q), max_q=0)  # no sequence sends a query
        prev = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for groups in (1, 2):  # one group (the fixture), and a group per thread, each with no query
                with torch.inference_mode(), step_groups(groups == 2), profile(activities=[ProfilerActivity.CPU]) as p:
                    out = cpu_decode_step(model, model.layers.self_dec, model.class_ids(torch.tensor([0, 1])),
                                          inp.pos_in, inp.pos_q[:0], model.rope_table("cpu"), engine.cache, none,
                                          False, model.layers)
                assert out.shape == (0, model.config.vocab_size)
                assert _threads(p, "arpg_cpu::paged_attention") == groups
        finally:
            torch.set_num_threads(prev)
    finally:
        engine.cache.free(seq_ids)


def test_whole_step_op_refuses_bad_input():
    """The shared checks name a bad batch before the op runs; the op itself names a bad weight list."""
    from arpg.engine import Engine, generation_plans
    from arpg.model import PagedBatch, cpu_decode_step

    model, _ = _whole_step_models(torch.float32)
    engine = Engine(model, 2)
    seq_ids, inputs = engine._prepare(generation_plans(model, 2, 3, "arccos", 1.0, "constant", None, None), 2, 16)
    try:
        inp = inputs[0]
        tokens = model.class_ids(torch.tensor([0, 1]))
        b = inp.batch
        table = model.rope_table("cpu")
        with torch.inference_mode():
            def step(batch, pos_in=inp.pos_in, pos_q=inp.pos_q):
                return cpu_decode_step(model, model.layers.self_dec, tokens, pos_in, pos_q, table, engine.cache, batch,
                                       False, model.layers)

            bad = PagedBatch(b.slot_mapping, b.block_table, b.kv_lens, b.cu_in.long(), b.cu_q, b.max_in, b.max_q)
            with pytest.raises(ValueError, match="cu_q_lens"):
                step(bad)
            bad = PagedBatch(b.slot_mapping, b.block_table, b.kv_lens, b.cu_in, b.cu_q[:-1], b.max_in, b.max_q)
            with pytest.raises(ValueError, match="cu_q_lens"):
                step(bad)
            bad = PagedBatch(b.slot_mapping.int(), b.block_table, b.kv_lens, b.cu_in, b.cu_q, b.max_in, b.max_q)
            with pytest.raises(ValueError, match="slot_mapping"):
                step(bad)
            before = engine.cache.k_pool.clone()
            with pytest.raises(IndexError):
                step(b, pos_in=inp.pos_in + 1000)
            with pytest.raises(IndexError):  # looked up before any append: the cache is untouched
                step(b, pos_q=inp.pos_q + 1000)
            assert torch.equal(engine.cache.k_pool, before)
            with pytest.raises(RuntimeError, match="weights must be the embedding"):
                cpu.decode_step(tokens, inp.pos_in, inp.pos_q, table, [model.embeddings.weight], [],
                                [engine.cache.layer(0)[0]], [engine.cache.layer(0)[1]], b, 2, 1e-5, False, 0)
            for bad in (torch.ones(inp.pos_q.shape[0], 1), torch.ones(inp.pos_q.shape[0] // 2, 1).double()):
                with pytest.raises(RuntimeError, match=r"guidance must be float32 \[rows / 2, 1\]"):
                    cpu.decode_step(tokens, inp.pos_in, inp.pos_q, table, *_step_weight_lists(model), *zip(
                        *(engine.cache.layer(i) for i in range(model.num_cache_layers))), b, 2, model.norm.eps, False,
                        model.config.mask_token_id, bad)
            assert torch.equal(engine.cache.k_pool, before)  # checked before anything is appended
            ok = cpu_decode_step(model, model.layers.self_dec, tokens, inp.pos_in, inp.pos_q, table, engine.cache, b,
                                 False, model.layers)
            assert ok.shape == (inp.pos_q.shape[0], model.config.vocab_size) and ok.dtype == torch.float32
        with torch.enable_grad():  # a step whose autograd graph is wanted stays op by op
            assert cpu_decode_step(model, model.layers.self_dec, tokens, inp.pos_in, inp.pos_q, table, engine.cache,
                                   b, False, model.layers) is None
    finally:
        engine.cache.free(seq_ids)


def _step_weight_lists(model):
    """The op's weight lists, built from the modules (not through arpg.model's cache)."""
    ls = model.layers
    weights = [model.embeddings.weight, model.norm.weight, model.head.weight]
    for layer in ls.self_dec:
        a, f = layer.attn, layer.ffn
        weights += [layer.attn_norm.weight, a.to_q.weight, a.to_k.weight, a.to_v.weight, a.proj.weight,
                    layer.ffn_norm.weight, f.w1.weight, f.w3.weight, f.w2.weight]
    cross = [ls.norm.weight, ls.to_k.weight, ls.to_v.weight]
    for layer in ls.cross_dec:
        a, f = layer.attn, layer.ffn
        cross += [layer.attn_norm.weight, a.to_q.weight, a.proj.weight, layer.ffn_norm.weight, f.w1.weight,
                  f.w3.weight, f.w2.weight]
    return weights, cross


def test_whole_step_op_opcheck():
    from arpg.engine import Engine, generation_plans

    model, _ = _whole_step_models(torch.float32)
    model.requires_grad_(False)
    engine = Engine(model, 2)
    seq_ids, inputs = engine._prepare(generation_plans(model, 2, 3, "arccos", 1.0, "constant", None, None), 2, 16)
    try:
        inp, b = inputs[0], inputs[0].batch
        tokens = model.class_ids(torch.tensor([0, 1]))
        weights, cross = _step_weight_lists(model)
        ks, vs = zip(*(engine.cache.layer(i) for i in range(model.num_cache_layers)))
        torch.library.opcheck(
            torch.ops.arpg_cpu.decode_step.default,
            (tokens, inp.pos_in, inp.pos_q, model.rope_table("cpu"), weights, cross, list(ks), list(vs), b.slot_mapping,
             b.block_table, b.kv_lens, b.cu_in, b.cu_q, b.max_in, b.max_q, 2, model.norm.eps, False,
             model.config.mask_token_id),
        )
        guidance = torch.full((inp.pos_q.shape[0] // 2, 1), 2.5)
        torch.library.opcheck(
            torch.ops.arpg_cpu.decode_step.default,
            (tokens, inp.pos_in, inp.pos_q, model.rope_table("cpu"), weights, cross, list(ks), list(vs), b.slot_mapping,
             b.block_table, b.kv_lens, b.cu_in, b.cu_q, b.max_in, b.max_q, 2, model.norm.eps, False,
             model.config.mask_token_id, guidance),
        )
    finally:
        engine.cache.free(seq_ids)


def test_a_library_without_guidance_in_the_op_guides_op_by_op(monkeypatch, one_group):
    from arpg import generate
    from arpg.model import guided_head

    assert cpu.decode_step_available(guidance=True)
    model, _ = _whole_step_models(torch.float32)
    labels = torch.tensor([0, 1])
    want = generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    # Such a library has neither `guidance` nor `thread_groups` (added after it).
    monkeypatch.setattr(cpu, "_guided_step", False)
    monkeypatch.setattr(cpu, "_grouped_step", False)
    assert cpu.decode_step_available() and not cpu.decode_step_available(guidance=True)
    calls, op_args = [], []
    real, real_op = cpu.decode_step, torch.ops.arpg_cpu.decode_step
    monkeypatch.setattr(cpu, "decode_step", lambda *a: calls.append(a[13:]) or real(*a))
    monkeypatch.setattr(torch.ops.arpg_cpu, "decode_step", lambda *a: op_args.append(len(a)) or real_op(*a))
    assert torch.equal(generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1), want)  # guided op by op
    assert calls == []
    with guided_head(False):
        generate(model, labels, num_steps=3, cfg_scale=2.0, seed=1)
    assert calls == [(None, False)] * 3  # the switch (one group, the fixture), which such a library never sees
    assert op_args == [19] * 3  # the op's old call, which such a library takes
    with pytest.raises(RuntimeError, match="no guidance argument"):
        real(*([None] * 13), torch.ones(1, 1))


def test_a_library_without_the_whole_step_op_decodes_op_by_op(monkeypatch):
    import importlib

    from arpg import generate

    real = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda name, key: False if name == f"arpg_cpu::{cpu.WHOLE_STEP_OP}" else real(name, key))
    try:
        importlib.reload(cpu)
        assert cpu.step_ops_available() and not cpu.decode_step_available()
        model, _ = _whole_step_models(torch.float32)
        monkeypatch.setattr(cpu, "decode_step", lambda *a: pytest.fail("the whole-step op was called"))
        generate(model, torch.tensor([0, 1]), num_steps=3, cfg_scale=2.0, seed=1)
    finally:
        monkeypatch.undo()
        importlib.reload(cpu)
    assert cpu.decode_step_available()


def _counted(monkeypatch, name: str) -> list:
    """Record each call of arpg_kernels.cpu's `name` (and still run it)."""
    calls = []
    real = getattr(cpu, name)
    monkeypatch.setattr(cpu, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_loop_draws_the_tokens_of_the_step_loop(dtype, threads, monkeypatch):
    """arpg_cpu::decode_loop runs a generation's steps and their sampling in one call, with no whole-step call
    from Python: the tokens of the engine's loop of whole-step and sampler calls (`step_loop(False)`), for ARPG
    and the raster model, guided and unguided, with one generator, one per sample and the global RNG (left in
    the same state), greedy, top-k and top-p, a linear guidance ramp, and an edit whose samples feed different
    numbers of known tokens causally at step 0; samples sharing a random stream, steps with no queries and a
    larger grid."""
    from arpg import generate
    from arpg.edit import expand, inpaint
    from arpg.engine import Engine
    from arpg.model import step_loop

    loops, steps = _counted(monkeypatch, "decode_loop"), _counted(monkeypatch, "decode_step")
    model, raster = _whole_step_models(dtype)
    labels = torch.tensor([0, 3, -1])
    image = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5], mask[1, 3:12], mask[2, 10:] = True, True, True
    cases = [
        (model, dict(num_steps=5, cfg_scale=2.5, seed=1)),
        (model, dict(num_steps=4, seed=[1, 2, 3])),
        (model, dict(num_steps=5, cfg_scale=2.0, cfg_schedule="linear", seed=[4, 5, 6], top_k=10, top_p=0.8)),
        (model, dict(num_steps=3, cfg_scale=3.0, temperature=0.0, seed=5)),
        (raster, dict(cfg_scale=2.5, seed=[7, 8, 9])),
        (raster, dict(seed=2, top_p=0.9)),
    ]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, kw in cases:
            engine = Engine(m, 6)
            loops.clear(), steps.clear()
            got = engine.generate(labels, **kw)
            assert loops and steps == []
            loops.clear()
            with step_loop(False):
                want = engine.generate(labels, **kw)
            assert steps and loops == []
            assert torch.equal(got, want), kw
        assert not torch.equal(got, Engine(raster, 6).generate(labels, seed=3, top_p=0.9))  # the seed matters
        # Samples sharing a stream (one generator thrice; None seeds share the global RNG), steps with no
        # queries (an explicit schedule), and resolution expansion (a larger grid): the same draws in order.
        shared = torch.Generator()
        for m, kw in (
            (model, dict(num_steps=4, cfg_scale=2.0, generator=[shared] * 3)),
            (model, dict(num_steps=4, seed=[None, None, 5], top_k=8)),
            (raster, dict(cfg_scale=2.0, generator=[shared, torch.default_generator, None])),
            (model, dict(num_steps=4, schedule=[0, 5, 0, 11], cfg_scale=2.0, seed=[1, 2, 3])),
        ):
            runs = []
            for loop in (True, False):
                torch.manual_seed(7)
                shared.manual_seed(8)
                with step_loop(loop):
                    runs.append((Engine(m, 6).generate(labels, **kw), torch.rand(2), torch.rand(2, generator=shared)))
            assert all(torch.equal(a, b) for a, b in zip(*runs)), kw
        loops.clear()
        got = expand(model, torch.tensor([1, 2]), (5, 6), num_steps=4, cfg_scale=2.0, seed=[3, 4])
        assert loops
        with step_loop(False):
            assert torch.equal(got, expand(model, torch.tensor([1, 2]), (5, 6), num_steps=4, cfg_scale=2.0, seed=[3, 4]))
        runs = []
        for loop in (True, False):
            torch.manual_seed(5)
            with step_loop(loop):
                runs.append((generate(model, labels, num_steps=4, cfg_scale=2.0), torch.rand(4)))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        loops.clear()
        got = inpaint(model, image, mask, labels, num_steps=4, cfg_scale=2.0, seed=[4, 5, 6])
        assert loops
        with step_loop(False):
            assert torch.equal(got, inpaint(model, image, mask, labels, num_steps=4, cfg_scale=2.0, seed=[4, 5, 6]))
    finally:
        torch.set_num_threads(prev)


def test_decode_loop_only_where_it_applies(monkeypatch):
    """Logits asked for, teacher tokens, guidance on both rows' logits, torch.profiler, the switches, the fusions
    off, another backend or a library without the op: the engine calls a step at a time (or op by op), the same
    tokens; a model's `decode_loop` that does not apply returns False without drawing."""
    from torch.profiler import ProfilerActivity, profile

    from arpg import generate
    from arpg.model import guided_head, step_fusions, step_loop, whole_step

    loops, steps = _counted(monkeypatch, "decode_loop"), _counted(monkeypatch, "decode_step")
    model, _ = _whole_step_models(torch.float32)
    labels = torch.tensor([0, 3])
    kw = dict(num_steps=3, cfg_scale=2.0, seed=1)
    tokens = generate(model, labels, **kw)
    assert loops and steps == []
    loops.clear()
    teacher = torch.randint(0, 64, (2, 16))
    generate(model, labels, **kw, return_logits=True)
    generate(model, labels, **kw, teacher_tokens=teacher)
    assert loops == [] and len(steps) == 6
    for switch, same in ((guided_head(False), False), (step_loop(False), True),
                         (profile(activities=[ProfilerActivity.CPU]), True)):
        steps.clear()
        with switch:
            out = generate(model, labels, **kw)
        assert loops == [] and len(steps) == 3
        assert torch.equal(out, tokens) or not same  # guidance on the logits rounds otherwise
    for switch in (whole_step(False), step_fusions(False), ak.use_backend("reference")):
        steps.clear()
        with switch:
            generate(model, labels, **kw)
        assert loops == [] and steps == []
    monkeypatch.setattr(cpu, "_loop", False)  # a library built before the op
    steps.clear()
    assert torch.equal(generate(model, labels, **kw), tokens)
    assert loops == [] and len(steps) == 3
    monkeypatch.undo()
    with step_loop(False):
        assert model.decode_loop(torch.zeros(4, dtype=torch.long), [object()], None,
                                 lambda: pytest.fail("drew uniforms")) is False
    # A decode_step replaced after the loop was written (a subclass's, an instance's) is the one that runs.
    loops, steps = _counted(monkeypatch, "decode_loop"), _counted(monkeypatch, "decode_step")

    class Biased(type(model)):
        def decode_step(self, *args, **kwargs):
            logits = super().decode_step(*args, **kwargs)
            logits[:, 0] += 1e4
            return logits

    biased = Biased(model.config).eval()
    biased.load_state_dict(model.state_dict())
    assert (generate(biased, labels, **kw) == 0).all() and loops == [] and len(steps) == 3
    real_step = model.decode_step
    model.decode_step = lambda *a, **k: real_step(*a, **k) + torch.nn.functional.one_hot(torch.tensor(1), 64) * 1e4
    assert (generate(model, labels, **kw) == 1).all() and loops == []
    del model.decode_step
    with monkeypatch.context() as patch:  # a patch of the class itself (a spy, a hot fix)
        patch.setattr(type(model), "decode_step", lambda self, *a, **k: real_step(*a, **k) * 0.0)
        generate(model, labels, **kw)
        assert loops == []
    assert torch.equal(generate(model, labels, **kw), tokens) and loops


def _loop_steps(model, engine, guidance: bool):
    """A prepared generation of 2 samples, 3 steps, as `LoopStep`s, and its sequences (to free)."""
    from arpg.engine import generation_plans
    from arpg.model import LoopStep

    rows = 4 if guidance else 2
    seq_ids, inputs = engine._prepare(generation_plans(model, 2, 3, "arccos", 2.0, "constant", None, None), rows, 16)
    steps = [LoopStep(i.in_index, i.pos_in, i.pos_q, i.out_index, i.batch, i.causal, i.cfg if guidance else None)
             for i in inputs]
    return steps, seq_ids


def test_decode_loop_refuses_bad_steps_before_it_changes_anything():
    """A step whose guidance does not fit, guidance on some steps only, bad sampler settings or per-step lists
    of different lengths: a named error, and the token buffer, the cache and the generator as they were."""
    from arpg.engine import Engine
    from arpg.model import cpu_decode_loop

    model, _ = _whole_step_models(torch.float32)
    engine = Engine(model, 4)
    steps, seq_ids = _loop_steps(model, engine, guidance=True)
    buf = torch.arange(4 + 2 * 16) % 64
    state = (buf.clone(), engine.cache.k_pool.clone(), engine.cache.v_pool.clone())

    @torch.inference_mode()  # as the engine runs it (weights that need a gradient take the modules' path)
    def run(bad_steps, **kw):
        args = dict(temperature=1.0, top_k=0, top_p=1.0) | kw
        return cpu_decode_loop(model, model.layers.self_dec, model.layers, model.rope_table("cpu"), engine.cache,
                               buf, bad_steps, lambda: pytest.fail("drew uniforms"), **args)

    try:
        bad = steps[:2] + [dataclasses.replace(steps[2], guidance=steps[2].guidance[:-1])]
        with pytest.raises(ValueError, match="guidance must be float32"):
            run(bad)
        with pytest.raises(ValueError, match="guidance on every step or on none"):
            run(steps[:2] + [dataclasses.replace(steps[2], guidance=None)])
        with pytest.raises(ValueError, match="top_p must be in"):
            run(steps, top_p=0.0)
        with pytest.raises(ValueError, match="top_k must be"):
            run(steps, top_k=-1)
        with pytest.raises(ValueError, match="step 2's out_index must be int64"):
            run(steps[:2] + [dataclasses.replace(steps[2], out_index=steps[2].out_index[:-1])])
        # The metadata and positions of a later step, whose errors would come from the op after earlier steps ran.
        last = steps[2]
        for bad, match in (
            (dataclasses.replace(last, pos_in=last.pos_in[:-1]), "step 2's pos_in must be int64"),
            (dataclasses.replace(last, batch=dataclasses.replace(last.batch, cu_q=last.batch.cu_q - (
                torch.arange(len(last.batch.cu_q)) == len(last.batch.cu_q) - 1).int())), "step 2's cu_q must end at its"),
            (dataclasses.replace(last, batch=dataclasses.replace(last.batch, cu_in=last.batch.cu_in[:-1])),
             "step 2's cu_in must end at its"),
            (dataclasses.replace(last, batch=dataclasses.replace(last.batch, block_table=last.batch.block_table.clone())),
             "another block_table tensor"),
            (dataclasses.replace(last, pos_q=last.pos_q + 1000), "have RoPE positions .*outside its 17 rows"),
        ):
            with pytest.raises(ValueError, match=match):
                run(steps[:2] + [bad])
        uniforms = [torch.rand(st.out_index.shape[0], dtype=torch.float64) for st in steps]
        with torch.inference_mode(), pytest.raises(ValueError, match="draw\\(\\) must give one float64 tensor"):
            model.decode_loop(buf, steps, engine.cache, lambda: uniforms[:1] + [uniforms[1][:-1]] + uniforms[2:])
        with torch.inference_mode(), pytest.raises(ValueError, match="index buf .*outside its 36 rows"):
            model.decode_loop(buf, steps[:1] + [dataclasses.replace(steps[1], in_index=steps[1].in_index + 1000)]
                              + steps[2:], engine.cache, lambda: uniforms)
        assert all(torch.equal(a, b) for a, b in zip(state, (buf, engine.cache.k_pool, engine.cache.v_pool)))
        weights, cross = _step_weight_lists(model)
        ks, vs = zip(*(engine.cache.layer(i) for i in range(model.num_cache_layers)))
        s = steps[-1]

        def op(uniforms, guidance, out_index=s.out_index):
            torch.ops.arpg_cpu.decode_loop(
                buf, [steps[0].in_index, s.in_index], [steps[0].pos_in, s.pos_in], [steps[0].pos_q, s.pos_q],
                [steps[0].out_index, out_index], [steps[0].batch.slot_mapping, s.batch.slot_mapping],
                s.batch.block_table, [steps[0].batch.kv_lens, s.batch.kv_lens], [steps[0].batch.cu_in, s.batch.cu_in],
                [steps[0].batch.cu_q, s.batch.cu_q], [steps[0].batch.max_in, s.batch.max_in],
                [steps[0].batch.max_q, s.batch.max_q],
                [0, 0], guidance, uniforms, model.rope_table("cpu"), weights, cross, list(ks), list(vs), 2,
                model.norm.eps, model.config.mask_token_id, 1.0, 0, 1.0)

        good = [uniforms[0], uniforms[-1]]
        guidance = [steps[0].guidance, s.guidance]
        with pytest.raises(RuntimeError, match="one entry per step"):
            op(good[:1], guidance)
        with pytest.raises(RuntimeError, match="step 1's uniforms must be float64"):
            op([good[0], good[1][1:]], guidance)
        with pytest.raises(RuntimeError, match="step 1 draws .* places in buf"):
            op(good, guidance, s.out_index[:-1])
        with pytest.raises(RuntimeError, match="step 1's guidance must be float32"):
            op(good, [guidance[0], guidance[1][:-1]])
        with pytest.raises(RuntimeError, match="indexes buf\\[-1\\]"):
            op(good, guidance, s.out_index - s.out_index - 1)
        assert all(torch.equal(a, b) for a, b in zip(state, (buf, engine.cache.k_pool, engine.cache.v_pool)))
    finally:
        engine.cache.free(seq_ids)


def test_decode_loop_opcheck():
    from arpg.engine import Engine
    from arpg.model import step_groups

    model, _ = _whole_step_models(torch.float32)
    model.requires_grad_(False)
    engine = Engine(model, 2)
    steps, seq_ids = _loop_steps(model, engine, guidance=False)
    try:
        weights, cross = _step_weight_lists(model)
        ks, vs = zip(*(engine.cache.layer(i) for i in range(model.num_cache_layers)))
        uniforms = [torch.rand(s.out_index.shape[0], dtype=torch.float64) for s in steps]
        b = [s.batch for s in steps]
        with step_groups(False):
            torch.library.opcheck(
                torch.ops.arpg_cpu.decode_loop.default,
                (torch.arange(2 + 2 * 16) % 64, [s.in_index for s in steps], [s.pos_in for s in steps],
                 [s.pos_q for s in steps], [s.out_index for s in steps], [x.slot_mapping for x in b],
                 b[0].block_table, [x.kv_lens for x in b], [x.cu_in for x in b], [x.cu_q for x in b],
                 [x.max_in for x in b], [x.max_q for x in b], [int(s.causal) for s in steps], [], uniforms,
                 model.rope_table("cpu"), weights, cross, list(ks), list(vs), 2, model.norm.eps,
                 model.config.mask_token_id, 1.0, 0, 1.0),
            )
    finally:
        engine.cache.free(seq_ids)


def test_step_uniforms_are_the_draws_of_each_step():
    """The loop's uniforms, drawn up front in one call per generator, are the numbers `_sample` draws step by
    step: one generator, one per sample, the global RNG; zeros when greedy."""
    from arpg.engine import _step_uniforms
    from arpg.sampling import draw_uniforms

    q_counts = [(1, 0, 2), (3, 3, 3), (0, 0, 0), (7, 1, 20)]
    got = _step_uniforms(q_counts, 1.0, torch.Generator().manual_seed(3), "cpu")
    g = torch.Generator().manual_seed(3)
    assert all(torch.equal(a, draw_uniforms(sum(q), g, "cpu")) for a, q in zip(got, q_counts))
    got = _step_uniforms(q_counts, 0.7, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], "cpu")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    for a, q in zip(got, q_counts):
        assert torch.equal(a, torch.cat([draw_uniforms(n, gi, "cpu") for gi, n in zip(gens, q)]))
    torch.manual_seed(9)
    got = _step_uniforms(q_counts, 1.0, None, "cpu")
    torch.manual_seed(9)
    assert all(torch.equal(a, draw_uniforms(sum(q), None, "cpu")) for a, q in zip(got, q_counts))
    assert all(torch.equal(a, torch.zeros(sum(q), dtype=torch.float64))
               for a, q in zip(_step_uniforms(q_counts, 0.0, None, "cpu"), q_counts))


def test_decode_loop_runs_in_chunks_that_double_while_they_are_quick(monkeypatch):
    """Python gets the host back between op calls: chunks of 1, 2, 4, ... steps while a chunk takes under
    LOOP_CHUNK_S, one step per call where every step is slower; the same tokens either way."""
    from arpg import generate
    from arpg import model as arpg_model
    from arpg.model import step_loop

    sizes = []
    real = cpu.decode_loop
    monkeypatch.setattr(cpu, "decode_loop", lambda buf, steps, *a: sizes.append(len(steps)) or real(buf, steps, *a))
    model, _ = _whole_step_models(torch.float32)
    labels = torch.tensor([0, 3])
    kw = dict(num_steps=12, cfg_scale=2.0, seed=[1, 2])
    with step_loop(False):
        want = generate(model, labels, **kw)
    monkeypatch.setattr(arpg_model, "LOOP_CHUNK_S", float("inf"))
    assert torch.equal(generate(model, labels, **kw), want) and sizes == [1, 2, 4, 5]
    sizes.clear()
    monkeypatch.setattr(arpg_model, "LOOP_CHUNK_S", 0.0)
    assert torch.equal(generate(model, labels, **kw), want) and sizes == [1] * 12
