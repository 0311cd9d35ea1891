"""Kernel benchmarks: paged multi-query attention per backend against the best attention we can import,
dense causal attention forward+backward against torch SDPA, and the fused sampler against torch ops.

Bytes counted for GB/s: each sequence's K and V rows once, plus q and out. FLOPs: 4 * q * kv * D per head
(two matmuls), 2.5x that for forward+backward.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import arpg_kernels as ak
from arpg_kernels import reference

from .common import Budget, Record, Timing, fmt, measure_copy_bandwidth, time_fn

GPU_PAGED_GRID = dict(
    heads=[16, 20, 24], head_dim=[64], kv_len=[257, 1025], q_per_seq=[1, 4, 16, 64], batch=[128, 256, 1024],
    page_size=[16, 64],
)
CPU_PAGED_GRID = dict(heads=[16], head_dim=[64], kv_len=[257], q_per_seq=[1, 16, 64], batch=[4, 16, 64], page_size=[16])
# The short GPU grid (a borrowed GPU's few minutes, scripts/gpu_session.sh): ARPG-L's 16 heads at batch 128,
# from early decoding (17 keys) to a 32x32 grid's end, without flex attention's compile per shape.
SHORT_PAGED_GRID = dict(heads=[16], head_dim=[64], kv_len=[17, 65, 257, 1025], q_per_seq=[1, 4, 16, 64], batch=[128],
                        page_size=[16])
GRIDS = ("quick", "short", "full")


def paged_inputs(batch, heads, head_dim, kv_len, q_per_seq, page_size, dtype, device, seed=0):
    """A decoding step of `batch` sequences with `kv_len` keys each, pages shuffled over the pool."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pages_per_seq = math.ceil(kv_len / page_size)
    num_pages = batch * pages_per_seq
    k_cache = torch.randn(num_pages, page_size, heads, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_pages, page_size, heads, head_dim, generator=g).to(device, dtype)
    table = torch.randperm(num_pages, generator=g).view(batch, pages_per_seq).to(device, torch.int32)
    kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    cu = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * q_per_seq
    q = torch.randn(batch * q_per_seq, heads, head_dim, generator=g).to(device, dtype)
    return q, k_cache, v_cache, table, kv_lens, cu, q_per_seq


def _paged_providers(device: torch.device) -> dict[str, Callable]:
    """Each provider maps the paged inputs to a zero-argument callable that runs one step."""
    providers: dict[str, Callable] = {}
    scale_of = lambda q: q.shape[-1] ** -0.5  # noqa: E731

    def arpg(module):
        def make(q, kc, vc, table, lens, cu, max_q):
            return lambda: module.paged_attention(q, kc, vc, table, lens, cu, max_q, False, scale_of(q), False)

        return make

    providers["arpg-reference"] = arpg(reference)
    if device.type == "cpu":
        from arpg_kernels import cpu as cpu_backend

        if cpu_backend.is_available():
            providers["arpg-cpu"] = arpg(cpu_backend)
    if device.type == "cuda":
        from arpg_kernels import cuda as cuda_backend
        from arpg_kernels import triton as triton_backend

        providers["arpg-triton"] = arpg(triton_backend)
        if cuda_backend.is_available():
            providers["arpg-cuda"] = arpg(cuda_backend)

    def sdpa(q, kc, vc, table, lens, cu, max_q):
        # The best case for SDPA: K/V already gathered into contiguous [B, H, S, D], equal lengths, no mask.
        b, s = table.shape[0], int(lens[0])
        k, v = reference.gather_kv(kc, vc, table, s)
        qd = q.view(b, -1, *q.shape[1:]).transpose(1, 2)
        kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        return lambda: F.scaled_dot_product_attention(qd, kd, vd)

    providers["sdpa-gathered"] = sdpa

    def gather_sdpa(q, kc, vc, table, lens, cu, max_q):
        # What a paged-cache user would otherwise do each step: gather the pages (timed), then SDPA.
        b, s = table.shape[0], int(lens[0])
        qd = q.view(b, -1, *q.shape[1:]).transpose(1, 2)

        def step():
            k, v = reference.gather_kv(kc, vc, table, s)
            return F.scaled_dot_product_attention(qd, k.transpose(1, 2), v.transpose(1, 2))

        return step

    providers["gather+sdpa"] = gather_sdpa
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)

            def flex_provider(q, kc, vc, table, lens, cu, max_q):
                b, s = table.shape[0], int(lens[0])
                k, v = reference.gather_kv(kc, vc, table, s)
                qd = q.view(b, -1, *q.shape[1:]).transpose(1, 2)
                kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
                return lambda: flex(qd, kd, vd)

            providers["flex-gathered"] = flex_provider
        except ImportError:
            pass
        try:
            import flashinfer  # noqa: F401

            providers["flashinfer"] = _flashinfer_provider
        except ImportError:
            pass
        try:
            from flash_attn import flash_attn_with_kvcache  # noqa: F401

            providers["flash-attn"] = _flash_attn_provider
        except ImportError:
            pass
    return providers


def _flashinfer_provider(q, kc, vc, table, lens, cu, max_q):
    import flashinfer

    b, pages = table.shape
    page_size = kc.shape[1]
    workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    indptr = torch.arange(0, b + 1, dtype=torch.int32, device=q.device) * pages
    last = (lens - 1) % page_size + 1
    wrapper.plan(cu, indptr, table.flatten(), last, q.shape[1], kc.shape[2], q.shape[2], page_size, causal=False,
                 q_data_type=q.dtype)
    return lambda: wrapper.run(q, (kc, vc))


def _flash_attn_provider(q, kc, vc, table, lens, cu, max_q):
    from flash_attn import flash_attn_with_kvcache

    b = table.shape[0]
    qd = q.view(b, -1, *q.shape[1:])
    return lambda: flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lens, block_table=table)


def bench_paged(record: Record, device: torch.device, grid: dict, dtype: torch.dtype, bandwidth: float,
                providers: Iterable[str] | None = None, budget: Budget | None = None, progress=None) -> None:
    """Every grid point for every available provider; `budget` defaults to `Budget.for_device(device)`."""
    available = _paged_providers(device)
    names = [p for p in (providers or available) if p in available]
    keys = list(grid)
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(keys, values))
        inputs = [paged_inputs(**cfg, dtype=dtype, device=device, seed=s) for s in range(2 if device.type == "cuda" else 1)]
        q, kc = inputs[0][0], inputs[0][1]
        elt = q.element_size()
        kv_bytes = 2 * cfg["batch"] * cfg["kv_len"] * cfg["heads"] * cfg["head_dim"] * elt
        io_bytes = kv_bytes + 2 * q.numel() * elt
        flops = 4 * q.shape[0] * cfg["heads"] * cfg["kv_len"] * cfg["head_dim"]
        cfg = {**cfg, "dtype": str(dtype).replace("torch.", "")}
        for name in names:
            try:
                fns = [available[name](*inp) for inp in inputs]
                t = time_fn(lambda f: f(), [(f,) for f in fns], device=device, budget=budget)
            except Exception as exc:  # a library that rejects a shape is recorded as skipped, not fatal
                print(f"  {name} skipped for {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            _paged_rows(record, name, cfg, t, io_bytes, flops, bandwidth)
            if progress is not None:
                progress.update(1)


def _paged_rows(record: Record, name: str, cfg: dict, t: Timing, io_bytes: int, flops: int, bandwidth: float) -> None:
    record.add_timing("kernels", "paged_attention", name, cfg, t)
    gbs = io_bytes / t.median / 1e9
    record.add("kernels", "paged_attention", name, cfg, "bandwidth", "GB/s", gbs,
               io_bytes / t.q80 / 1e9, io_bytes / t.q20 / 1e9, t.n, t.spread)
    record.add("kernels", "paged_attention", name, cfg, "bandwidth_fraction", "ratio", gbs * 1e9 / bandwidth)
    record.add("kernels", "paged_attention", name, cfg, "throughput", "TFLOP/s", flops / t.median / 1e12)


def bench_dense(record: Record, device: torch.device, dtype: torch.dtype, shapes: list[dict],
                budget: Budget | None = None) -> None:
    """Dense causal attention forward+backward, arpg (triton on GPU) against torch SDPA."""
    for cfg in shapes:
        b, l, h, d = cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["head_dim"]
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(b, l, h, d, generator=g).to(device, dtype).requires_grad_() for _ in range(4))

        def arpg_step():
            out = ak.attention(q, k, v, causal=True)
            out.backward(do)

        def sdpa_step():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            out.backward(do.transpose(1, 2))

        flops = 2.5 * 4 * b * h * l * l * d / 2
        full = {**cfg, "dtype": str(dtype).replace("torch.", ""), "causal": True}
        for name, fn in (("arpg-" + ("triton" if device.type == "cuda" else "cpu"), arpg_step), ("sdpa", sdpa_step)):
            t = time_fn(fn, device=device, budget=budget)
            record.add_timing("kernels", "attention_fwd_bwd", name, full, t)
            record.add("kernels", "attention_fwd_bwd", name, full, "throughput", "TFLOP/s", flops / t.median / 1e12)


# Sampling: one decoding step's query rows over the vocabulary, guided (CFG), with each filter.
CPU_SAMPLING = dict(shapes=[(64, 1024), (128, 16384)], settings=[(1.0, 0, 1.0), (1.0, 100, 1.0), (1.0, 0, 0.9)])
GPU_SAMPLING = dict(shapes=[(512, 16384), (2048, 16384)], settings=CPU_SAMPLING["settings"])


def bench_sampling(record: Record, device: torch.device, grid: dict, budget: Budget | None = None) -> None:
    """The fused sampler (guidance, temperature, top-k/top-p and the draw in one kernel: the cpu backend's
    on a CPU, the Triton one on a GPU) against the same steps as separate torch ops
    (`reference.sample_tokens`), float32 logits."""
    for rows, vocab in grid["shapes"]:
        g = torch.Generator(device="cpu").manual_seed(0)
        logits, uncond = (torch.randn(rows, vocab, generator=g).mul_(3).to(device) for _ in range(2))
        scale = torch.full((rows,), 4.0, device=device)
        uniforms = torch.rand(rows, dtype=torch.float64, generator=g).to(device)
        # Ours: the kernel of this device (on CUDA the Triton one, which `auto` does not pick before it is timed).
        if device.type == "cuda":
            from arpg_kernels import triton as ours
        else:
            ours = ak.resolve_backend("sample_tokens", logits)
        ours_name = "arpg-" + ours.__name__.rsplit(".", 1)[-1]
        for temperature, top_k, top_p in grid["settings"]:
            cfg = dict(rows=rows, vocab=vocab, cfg=True, temperature=temperature, top_k=top_k, top_p=top_p)
            providers = {
                ours_name: lambda: ours.sample_tokens(logits, uncond, scale, uniforms, temperature, top_k, top_p),
                "torch-ops": lambda: reference.sample_tokens(logits, uncond, scale, uniforms, temperature, top_k, top_p),
            }
            for name, fn in providers.items():
                record.add_timing("kernels", "sample_tokens", name, cfg, time_fn(fn, device=device, budget=budget))


def run(record: Record, device: torch.device, grid_name: str, progress_factory=None) -> None:
    """The kernel part of arpg-bench on `grid_name` (one of GRIDS): quick is the CPU grid, short and full GPU ones."""
    if grid_name not in GRIDS:
        raise ValueError(f"kernels.run: grid {grid_name!r} is not one of {GRIDS}")
    quick = grid_name == "quick"
    bandwidth = measure_copy_bandwidth(device)
    record.add("kernels", "copy", "torch", {}, "bandwidth", "GB/s", bandwidth / 1e9)
    print(f"measured copy bandwidth: {fmt(bandwidth / 1e9)} GB/s (read + write)")
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    grid = {"quick": CPU_PAGED_GRID, "short": SHORT_PAGED_GRID, "full": GPU_PAGED_GRID}[grid_name]
    providers = [p for p in _paged_providers(device) if not (grid_name == "short" and p == "flex-gathered")]
    points = math.prod(len(v) for v in grid.values()) * len(providers) * len(dtypes)
    progress = progress_factory(total=points) if progress_factory else None
    for dtype in dtypes:
        bench_paged(record, device, grid, dtype, bandwidth, providers=providers, progress=progress)
    if progress is not None:
        progress.close()
    shapes = [dict(batch=2, seq_len=256, heads=4, head_dim=64)] if quick else [
        dict(batch=32, seq_len=256, heads=16, head_dim=64), dict(batch=16, seq_len=1024, heads=16, head_dim=64)
    ]
    for dtype in dtypes:
        bench_dense(record, device, dtype, shapes)
    bench_sampling(record, device, CPU_SAMPLING if quick else GPU_SAMPLING)
