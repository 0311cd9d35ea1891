"""The CUDA extension arpg_kernels._C: its registration (wherever it is built) and its kernels (on a GPU).

The kernel tests compare `arpg_kernels.cuda` with `arpg_kernels.reference` and take the tolerance from
plain PyTorch in the same low precision (flash-attention style): the kernel's error against a
float64 computation must stay within twice that of the low-precision PyTorch path, plus a few ulps
(`kv_cases.allowance`, the rule the Triton tests use too).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from arpg_kernels import cuda as cuda_backend
from arpg_kernels import reference
from kv_cases import PagedCase, assert_close_to_fp64, make_paged_case, tolerance

EXT_BUILT = importlib.util.find_spec("arpg_kernels._C") is not None
OPS = ("paged_attention", "append_kv", "merge_attention_states")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

needs_ext = pytest.mark.skipif(
    not cuda_backend.is_available(),
    reason=f"arpg_kernels._C not usable here: {cuda_backend.load_error()}",
)


# registration (no GPU needed) ----------------------------------------------------------------


@pytest.mark.skipif(
    not EXT_BUILT, reason="arpg_kernels._C was not built (CPU-only torch, ARPG_SKIP_CUDA_BUILD or no toolkit)"
)
def test_extension_registers_the_arpg_cuda_ops_for_cuda():
    importlib.import_module("arpg_kernels._C")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"arpg_cuda::{op}", "CUDA"), op
    assert cuda_backend.is_available() and cuda_backend.load_error() is None
    schema = torch.ops.arpg_cuda.paged_attention.default._schema
    num_splits = next(a for a in schema.arguments if a.name == "num_splits")
    assert num_splits.default_value == 0
    args = torch.ops.arpg_cuda.append_kv.default._schema.arguments
    assert [a.name for a in args if a.alias_info and a.alias_info.is_write] == ["k_cache", "v_cache"]


@needs_ext
@pytest.mark.parametrize("return_lse", [True, False])
def test_fake_implementations_give_the_real_shapes(return_lse):
    q = torch.empty(7, 4, 64, dtype=torch.bfloat16, device="meta")
    cache = torch.empty(5, 16, 2, 64, dtype=torch.bfloat16, device="meta")
    table = torch.empty(3, 4, dtype=torch.int32, device="meta")
    lens = torch.empty(3, dtype=torch.int32, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = torch.ops.arpg_cuda.paged_attention(q, cache, cache, table, lens, cu, 5, True, 0.125, return_lse, 2)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == ((7, 4) if return_lse else (0,))
    merged, merged_lse = torch.ops.arpg_cuda.merge_attention_states(out, torch.empty(7, 4, device="meta"), out,
                                                                    torch.empty(7, 4, device="meta"))
    assert merged.shape == out.shape and merged_lse.shape == (7, 4)
    k = torch.empty(3, 2, 64, dtype=torch.bfloat16, device="meta")
    assert torch.ops.arpg_cuda.append_kv(k, k, cache, cache, torch.empty(3, dtype=torch.int64, device="meta")) is None


def test_backend_functions_take_the_reference_signatures():
    for name in OPS:
        want = list(inspect.signature(getattr(reference, name)).parameters)
        got = inspect.signature(getattr(cuda_backend, name)).parameters
        assert list(got)[: len(want)] == want, name
    num_splits = inspect.signature(cuda_backend.paged_attention).parameters["num_splits"]
    assert num_splits.kind == inspect.Parameter.KEYWORD_ONLY


def test_unavailable_backend_warns_once_and_raises(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_load_error", "not built in this test")
    monkeypatch.setattr(cuda_backend, "_warned", False)
    assert not cuda_backend.is_available()
    assert not cuda_backend.supports("paged_attention", torch.empty(1, 2, 64), torch.empty(1, 16, 2, 64))
    x = torch.empty(1, 2, 64)
    with pytest.warns(RuntimeWarning, match="not built in this test"), pytest.raises(RuntimeError, match="unavailable"):
        cuda_backend.merge_attention_states(x, x[..., 0], x, x[..., 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="unavailable"):
            cuda_backend.append_kv(x, x, x, x, torch.zeros(1, dtype=torch.int64))


def test_supports_rejects_cpu_tensors_and_unknown_ops():
    q, cache = torch.empty(3, 2, 64, dtype=torch.float16), torch.empty(2, 16, 2, 64, dtype=torch.float16)
    assert not cuda_backend.supports("paged_attention", q, cache)
    assert not cuda_backend.supports("attention_forward", q, cache)


# kernels on the CPU, through the SIMT emulator ------------------------------------------------


def _cuda_include_dir() -> str | None:
    """A CUDA toolkit include directory (cuda_fp16.h and crt/), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for base in filter(None, candidates):
        include = Path(base) / "include"
        if (include / "cuda_fp16.h").is_file() and (include / "crt").is_dir():
            return str(include)
    return None


@pytest.mark.slow
def test_kernels_under_simt_emulation(tmp_path):
    """csrc/tests/kernel_tests.cu with the unmodified kernels run on the CPU (csrc/tests/simt_emulator.h)."""
    cxx, include = shutil.which("g++") or shutil.which("c++"), _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (set CUDA_HOME)")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    exe = tmp_path / "arpg_kernel_emu_tests"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{csrc / 'include'}", f"-I{csrc / 'tests'}", "-isystem", include,
         str(csrc / "tests" / "kernel_tests_emu.cpp"), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "cases passed" in run.stdout


# kernels (GPU) -------------------------------------------------------------------------------


def _lowp_paged_attention(case: PagedCase, scale: float) -> torch.Tensor:
    """Plain PyTorch in the input dtype (scores, softmax and P @ V rounded to it): the error yardstick."""
    q, dtype = case.q, case.q.dtype
    b = case.block_table.shape[0]
    max_kv = case.block_table.shape[1] * case.k_cache.shape[1]
    k, v = reference.gather_kv(case.k_cache, case.v_cache, case.block_table, max_kv)
    group = q.shape[1] // k.shape[2]
    cu, kv_lens = case.cu_q_lens.tolist(), case.kv_lens.tolist()
    out = torch.zeros_like(q)
    for i in range(b):
        q_len, n = cu[i + 1] - cu[i], min(kv_lens[i], max_kv)
        if q_len == 0 or n == 0:
            continue
        qb = q[cu[i] : cu[i + 1]]
        kb = k[i, :n].repeat_interleave(group, dim=1)
        vb = v[i, :n].repeat_interleave(group, dim=1)
        s = torch.einsum("lhd,khd->hlk", qb, kb) * scale
        if case.causal:
            rows = torch.arange(q_len, device=q.device)[:, None]
            allowed = torch.arange(n, device=q.device)[None] < n - q_len + rows + 1
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(dtype)
        out[cu[i] : cu[i + 1]] = torch.einsum("hlk,khd->lhd", p, vb)
    return out


def _check_against_reference(case: PagedCase, *, num_splits=None, return_lse=True, scale=None):
    d = case.q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    out, lse = cuda_backend.paged_attention(*case.args(), case.causal, scale, return_lse, num_splits=num_splits)
    case64 = PagedCase(
        *(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case.__dict__.values())
    )
    want, want_lse = reference.paged_attention(*case64.args(), case.causal, scale, True)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape and out.is_contiguous()
    assert_close_to_fp64("out", out, want, _lowp_paged_attention(case, scale))
    if return_lse:
        assert lse.shape == case.q.shape[:2] and lse.dtype == torch.float32
        lo_lse = reference.paged_attention(*case.args(), case.causal, scale, True)[1]
        assert_close_to_fp64("lse", lse, want_lse, lo_lse)
        assert torch.equal(out[torch.isneginf(lse)], torch.zeros_like(out[torch.isneginf(lse)]))
    else:
        assert lse.shape == (0,) and lse.dtype == torch.float32
    return out, lse


@pytest.mark.cuda_ext
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_attention_size_one_dims_with_odd_strides(splits):
    """A size-1 dim may carry any stride (torch never steps along it): one token, one KV head, a pool of
    one page. The kernel must serve it (the adapter used to pass the stride on, and the launcher refused
    it with a bare cudaErrorInvalidValue)."""
    g = torch.Generator().manual_seed(0)
    d, ps, h = 64, 64, 4
    base = torch.randn(1, h, d + 8, generator=g).to("cuda", torch.bfloat16)
    q = base.as_strided((1, h, d), (5, d + 8, 1))  # stride(0) = 5: not a multiple of 8, but size 1
    pool = torch.randn(1, ps, 1, d, generator=g).to("cuda", torch.bfloat16)
    k_cache = pool.as_strided((1, ps, 1, d), (3, d, 7, 1))  # pages and heads of size 1, odd strides
    v_cache = pool.clone().as_strided((1, ps, 1, d), (3, d, 7, 1))
    table = torch.zeros(1, 3, dtype=torch.int32, device="cuda")  # the one page three times: 3 key tiles to split
    lens = torch.tensor([2 * ps + 22], dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    _check_against_reference(PagedCase(q, k_cache, v_cache, table, lens, cu, 1, False), num_splits=splits)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("seed", range(40))
def test_paged_attention_random_families(seed, dtype):
    """Varlen, kv_len 0, q_len 0, shared and shuffled pages, GQA 1/2/4, causal or not, D 64/128, pages 16/32/64."""
    case = make_paged_case(seed, dtype=dtype, head_dims=(64, 128), page_sizes=(16, 32, 64), max_kv=300, max_q=40,
                           max_b=6, device="cuda")
    num_splits = random.Random(seed).choice([None, None, 1, 2, 3, 8])
    _check_against_reference(case, num_splits=num_splits, return_lse=seed % 4 != 3)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_paged_attention_every_shape_combination(group, causal, page_size, head_dim):
    g = torch.Generator().manual_seed(group * 1000 + page_size + head_dim + causal)
    q_lens, kv_lens = [5, 0, 33, 1], [70, 9, 0, page_size + 1]
    hkv = 2
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 3
    perm = torch.randperm(num_pages, generator=g)
    max_pages = max(-(-n // page_size) for n in kv_lens) + 1
    table = torch.zeros(len(q_lens), max_pages, dtype=torch.int32)
    used = 0
    for i, n in enumerate(kv_lens):
        pages = -(-n // page_size)
        table[i, :pages] = perm[used : used + pages].int()
        used += pages
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    case = PagedCase(
        torch.randn(sum(q_lens), hkv * group, head_dim, generator=g).half(),
        torch.randn(num_pages, page_size, hkv, head_dim, generator=g).half(),
        torch.randn(num_pages, page_size, hkv, head_dim, generator=g).half(),
        table, torch.tensor(kv_lens, dtype=torch.int32), cu, max(q_lens), causal,
    ).to("cuda")
    _check_against_reference(case)
    _check_against_reference(case, num_splits=3)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forced_splits_agree(dtype):
    case = make_paged_case(11, dtype=dtype, head_dims=(128,), page_sizes=(16,), max_kv=600, max_q=20, max_b=3,
                           device="cuda")
    base, base_lse = _check_against_reference(case, num_splits=1)
    for splits in (2, 3, 5, 16, 64):
        out, lse = _check_against_reference(case, num_splits=splits)
        torch.testing.assert_close(out.float(), base.float(), atol=tolerance(dtype), rtol=0)
        torch.testing.assert_close(lse, base_lse, atol=1e-4, rtol=0)


def _dense_case(q_lens, kv_lens, *, h, hkv, d, page_size, causal, dtype, seed=0, spare_pages=2) -> PagedCase:
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages) + 4
    perm = torch.randperm(num_pages, generator=g)
    table = torch.zeros(len(kv_lens), max(pages) + spare_pages, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[used : used + n].int()
        used += n
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedCase(
        torch.randn(sum(q_lens), h, d, generator=g).to(dtype),
        torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype),
        torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype),
        table, torch.tensor(kv_lens, dtype=torch.int32), cu, max(q_lens), causal,
    ).to("cuda")


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("head_dim", [64, 128])
def test_arpg_decoding_step_sizes(head_dim, dtype):
    """32 images with CFG: 64 sequences, 16 heads, up to 64 queries each, ~257 keys (ARPG-L/XL steps)."""
    rng = random.Random(head_dim)
    q_lens = [rng.choice([1, 2, 8, 16, 32, 64]) for _ in range(64)]
    kv_lens = [rng.randint(200, 257) for _ in range(64)]
    case = _dense_case(q_lens, kv_lens, h=16, hkv=16, d=head_dim, page_size=16, causal=False, dtype=dtype)
    _check_against_reference(case)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_few_long_sequences_take_the_split_path(causal):
    case = _dense_case([3, 17], [4096, 3001], h=16, hkv=4, d=128, page_size=64, causal=causal, dtype=torch.bfloat16)
    _check_against_reference(case)


@pytest.mark.cuda_ext
def test_causal_rows_without_keys_get_zero_and_neg_inf():
    case = _dense_case([20, 3, 40], [10, 0, 200], h=4, hkv=2, d=64, page_size=16, causal=True, dtype=torch.float16)
    for splits in (None, 1, 4):
        out, lse = _check_against_reference(case, num_splits=splits)
        assert torch.isneginf(lse[:9]).all() and torch.equal(out[:9], torch.zeros_like(out[:9]))


@pytest.mark.cuda_ext
def test_paged_attention_reads_a_pool_layer_and_a_strided_q():
    base = _dense_case([4, 9], [50, 77], h=4, hkv=2, d=64, page_size=32, causal=True, dtype=torch.float16)
    pool_k = torch.randn(3, *base.k_cache.shape, device="cuda").half()
    pool_v = torch.randn(3, *base.v_cache.shape, device="cuda").half()
    pool_k[1], pool_v[1] = base.k_cache, base.v_cache
    qkv = torch.randn(base.q.shape[0], base.q.shape[1] + 4, 64, device="cuda").half()
    qkv[:, :4] = base.q
    strided = PagedCase(qkv[:, :4], pool_k[1], pool_v[1], *list(base.__dict__.values())[3:])
    assert not strided.q.is_contiguous()
    out, lse = _check_against_reference(strided)
    want, want_lse = cuda_backend.paged_attention(*base.args(), True, 0.125, True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_append_kv_matches_reference(head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    layers, num_pages, ps, hkv, t = 2, 6, 16, 2, 37
    pool = torch.randn(layers, num_pages, ps, hkv, head_dim, generator=g).to(dtype).cuda()
    slots = torch.randperm(num_pages * ps, generator=g)[:t]
    slots[::5] = -1
    kv = torch.randn(t, 2 * hkv, head_dim, generator=g).to(dtype).cuda()
    k, v = kv[:, :hkv], kv[:, hkv:]  # strided views, as a fused projection gives them
    want_k, want_v = pool[1].clone(), pool[0].clone()
    reference.append_kv(k, v, want_k, want_v, slots.cuda())
    cuda_backend.append_kv(k, v, pool[1], pool[0], slots.cuda())
    assert torch.equal(pool[1], want_k) and torch.equal(pool[0], want_v)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_merge_attention_states_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    out_a, out_b = (torch.randn(33, 4, 64, generator=g).to(dtype).cuda() for _ in range(2))
    lse_a, lse_b = (3 * torch.randn(33, 4, generator=g).cuda() for _ in range(2))
    lse_a[::3] = float("-inf")
    lse_b[1::3] = float("-inf")
    lse_a[2::6] = lse_b[2::6] = float("-inf")
    out, lse = cuda_backend.merge_attention_states(out_a, lse_a, out_b, lse_b)
    hi = reference.merge_attention_states(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())
    lo = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert_close_to_fp64("out", out, hi[0], lo[0])
    assert_close_to_fp64("lse", lse, hi[1], lo[1])


@pytest.mark.cuda_ext
def test_paged_attention_replays_in_a_cuda_graph():
    case = _dense_case([4, 1, 7], [40, 300, 90], h=8, hkv=2, d=128, page_size=16, causal=True, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_backend.paged_attention(*case.args(), True, 0.1, True)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = cuda_backend.paged_attention(*case.args(), True, 0.1, True)
    case.kv_lens.copy_(torch.tensor([17, 250, 0], dtype=torch.int32))
    case.q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    want, want_lse = cuda_backend.paged_attention(*case.args(), True, 0.1, True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.cuda_ext
def test_opcheck_arpg_cuda_ops():
    case = _dense_case([3, 5], [20, 70], h=4, hkv=2, d=64, page_size=16, causal=True, dtype=torch.float16)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    paged = torch.ops.arpg_cuda.paged_attention.default
    torch.library.opcheck(paged, (*case.args(), True, 0.125, True, 0), test_utils=utils)
    torch.library.opcheck(paged, (*case.args(), False, 0.125, False, 3), test_utils=utils)
    k = torch.randn(4, 2, 64, device="cuda").half()
    slots = torch.tensor([0, 5, -1, 40], device="cuda")
    append_args = (k, k, case.k_cache.clone(), case.v_cache.clone(), slots)
    torch.library.opcheck(torch.ops.arpg_cuda.append_kv.default, append_args, test_utils=utils)
    lse = torch.randn(5, 4, device="cuda")
    out = torch.randn(5, 4, 64, device="cuda").half()
    torch.library.opcheck(torch.ops.arpg_cuda.merge_attention_states.default, (out, lse, out, lse), test_utils=utils)


@pytest.mark.cuda_ext
def test_unsupported_inputs_raise_clear_errors():
    case = _dense_case([3], [20], h=2, hkv=2, d=64, page_size=16, causal=False, dtype=torch.float16)
    fp32 = PagedCase(case.q.float(), case.k_cache.float(), case.v_cache.float(), *list(case.__dict__.values())[3:])
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        cuda_backend.paged_attention(*fp32.args(), False, 0.1, False)
    small_pages = PagedCase(case.q, case.k_cache.view(-1, 8, 2, 64), case.v_cache.view(-1, 8, 2, 64),
                            *list(case.__dict__.values())[3:])
    with pytest.raises(RuntimeError, match="page_size 8"):
        cuda_backend.paged_attention(*small_pages.args(), False, 0.1, False)
    narrow = PagedCase(
        case.q[..., :32], case.k_cache[..., :32], case.v_cache[..., :32], *list(case.__dict__.values())[3:]
    )
    with pytest.raises(RuntimeError, match="head_dim"):
        cuda_backend.paged_attention(*narrow.args(), False, 0.1, False)
    assert not cuda_backend.supports("paged_attention", fp32.q, fp32.k_cache)
    assert not cuda_backend.supports("paged_attention", small_pages.q, small_pages.k_cache)
    assert cuda_backend.supports("paged_attention", case.q, case.k_cache)
