"""End-to-end generation: the ARPG engine (fast backend, CUDA graphs) against the eager original-style
path and the raster-order baseline on the same engine, with classifier-free guidance.

The three providers run interleaved in one process (engine, eager, raster, engine, ...), so the
ratios compare runs made under the same conditions. Models have random weights: speed does not
depend on them. Memory: `torch.cuda.max_memory_allocated` after a reset (weights included) on CUDA;
on CPU the K/V bytes each path holds at the end of a generation and the process's peak RSS.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
from collections import defaultdict

import torch

import arpg_kernels as ak
from arpg_kernels.cpu import STEP_OPS, WHOLE_STEP_OP
from arpg import ARPG, RasterLM
from arpg import model as arpg_model
from arpg.config import ARPGConfig
from arpg.eager import eager_generate
from arpg.engine import Engine
from arpg.model import GUIDED_HEAD, guided_head, step_fusions, step_groups, step_loop, whole_step

from .common import Budget, Record, cuda_peak_added, cuda_peak_start, fmt, timing
from .plot import STEP_PARTS

# A CPU-sized stand-in with the real step structure: a 16x16 grid (256 tokens), head_dim 64.
CPU_CONFIG = ARPGConfig(dim=128, n_layer=4, n_head=2, vocab_size=1024, num_classes=10, grid_size=16, ffn_multiple_of=64)

GPU_GRID = dict(models=["ARPG-L", "ARPG-XL", "ARPG-XXL"], steps=[32, 64], batches=[1, 16, 64, 256])
CPU_GRID = dict(models=["cpu-tiny"], steps=[32, 64], batches=[1, 4, 16])
# The engine against its variants where they ran: (provider, ratio metric, summary key), the engine's images/s over
# the variant's.
ENGINE_VARIANT_RATIOS = (
    ("arpg-engine-unfused", "fused/unfused", "fused_vs_unfused"),
    ("arpg-engine-op-by-op", "whole-step/op-by-op", "whole_step_vs_op_by_op"),
    ("arpg-engine-one-group", "thread-groups/one-group", "thread_groups_vs_one_group"),
    ("arpg-engine-step-calls", "generation-op/step-calls", "generation_op_vs_step_calls"),
    ("arpg-engine-logit-guidance", "head-guidance/logit-guidance", "head_guidance_vs_logit_guidance"),
)
SHORT_GRID = dict(models=["ARPG-L"], steps=[64], batches=[64])  # a borrowed GPU's minutes: the headline point

# One generation takes up to seconds (raster on a CPU: 256 steps, 2-7 s), so each provider gets at least
# 3 runs and stops adding runs after 3 s of them: the default CPU grid stays a few minutes.
GENERATION_BUDGET = Budget(min_time_s=0.5, max_time_s=3.0, min_reps=3)


def _config(name: str) -> tuple[ARPGConfig, ARPGConfig]:
    if name == "cpu-tiny":
        return CPU_CONFIG, CPU_CONFIG
    return ARPGConfig.from_name(name), ARPGConfig.from_name(name.replace("ARPG", "Raster"))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eager_kv_bytes(model: ARPG, rows: int) -> int:
    c = model.config
    return 2 * model.num_cache_layers * rows * (c.seq_len) * c.dim * next(model.parameters()).element_size()


@contextlib.contextmanager
def all_triton():
    """Every arpg op on its Triton kernel, RoPE inside the append and the one-op sampler included: the GPU
    engine as it would run if the Triton kernels won every kernel benchmark (auto picks per op)."""
    saved = set(arpg_model.FUSED_ROPE_APPEND)
    arpg_model.FUSED_ROPE_APPEND.add("cuda")
    try:
        with ak.use_backend("triton"):
            yield
    finally:
        arpg_model.FUSED_ROPE_APPEND.clear()
        arpg_model.FUSED_ROPE_APPEND.update(saved)


def bench_generation(record: Record, device: torch.device, grid: dict, dtype: torch.dtype, cfg_scale: float = 4.0,
                     budget: Budget = GENERATION_BUDGET, progress=None) -> list[dict]:
    """Run the grid, timing each provider until `budget` is met; returns one summary dict per
    (model, steps, batch)."""
    summaries = []
    for name in grid["models"]:
        arpg_cfg, raster_cfg = _config(name)
        torch.manual_seed(0)
        model = ARPG(arpg_cfg).to(device, dtype).eval()
        raster = RasterLM(raster_cfg).to(device, dtype).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch in grid["batches"]:
            labels = torch.arange(batch, device=device) % arpg_cfg.num_classes
            rows = 2 * batch
            engine = Engine(model, rows, use_cuda_graphs=True)
            raster_engine = Engine(raster, rows, use_cuda_graphs=True)
            # Its own engine: CUDA graphs captured under all_triton() replay those kernels.
            triton_engine = Engine(model, rows, use_cuda_graphs=True) if device.type == "cuda" else None
            for steps in grid["steps"]:
                def unfused():
                    with step_fusions(False):
                        return engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0)

                runs = {
                    "arpg-engine": lambda: engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0),
                    "arpg-eager": lambda: eager_generate(model, labels, steps, cfg_scale=cfg_scale, seed=0),
                    "raster-engine": lambda: raster_engine.generate(labels, cfg_scale=cfg_scale, seed=0),
                }
                n_steps = {"arpg-engine": steps, "arpg-eager": steps, "raster-engine": raster_cfg.seq_len}
                if device.type != "cuda":  # on a GPU the fusions are the Triton ones: arpg-engine-triton
                    runs["arpg-engine-unfused"] = unfused  # the same engine, RoPE + append and sampling as torch ops
                    n_steps["arpg-engine-unfused"] = steps
                if device.type == "cpu":
                    def op_by_op():
                        with whole_step(False):
                            return engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0)

                    # The same engine and ops with the step run op by op from Python, not as arpg_cpu::decode_step.
                    runs["arpg-engine-op-by-op"] = op_by_op
                    n_steps["arpg-engine-op-by-op"] = steps

                    def one_group():
                        with step_groups(False):
                            return engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0)

                    # The whole-step op as one group, every op on all threads, not one group of sequences per thread.
                    runs["arpg-engine-one-group"] = one_group
                    n_steps["arpg-engine-one-group"] = steps

                    def step_calls():
                        with step_loop(False):
                            return engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0)

                    # The whole-step op and the sampler called once a step from Python, not the whole generation
                    # in one op (arpg_cpu::decode_loop).
                    runs["arpg-engine-step-calls"] = step_calls
                    n_steps["arpg-engine-step-calls"] = steps
                if device.type in GUIDED_HEAD:
                    def logit_guidance():
                        with guided_head(False):
                            return engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0)

                    # The same engine guiding the logits of both rows (the original's order), not before the head.
                    runs["arpg-engine-logit-guidance"] = logit_guidance
                    n_steps["arpg-engine-logit-guidance"] = steps
                if triton_engine is not None:
                    def all_triton_run():
                        with all_triton():
                            return triton_engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0)

                    runs["arpg-engine-triton"] = all_triton_run
                    n_steps["arpg-engine-triton"] = steps
                for fn in runs.values():  # warm-up: graph capture, allocator, autotuning
                    fn()
                _sync(device)
                times = {k: [] for k in runs}
                # The K/V cache each provider holds (every arpg-engine* provider but the Triton one runs on
                # `engine`); on a GPU plus the most it allocated during a call, which for the eager path is its K/V.
                own = {key: engine.cache.nbytes for key in runs if key.startswith("arpg-engine")}
                own.update({"arpg-eager": 0 if device.type == "cuda" else _eager_kv_bytes(model, rows),
                            "raster-engine": raster_engine.cache.nbytes})
                if triton_engine is not None:
                    own["arpg-engine-triton"] = triton_engine.cache.nbytes
                added = dict.fromkeys(runs, 0)
                # Interleaved rounds; a provider whose timing is settled sits the later rounds out.
                while not all(budget.done(ts, sum(ts)) for ts in times.values()):
                    for key, fn in runs.items():
                        if budget.done(times[key], sum(times[key])):
                            continue
                        if device.type == "cuda":
                            base = cuda_peak_start(device)
                        _sync(device)
                        t0 = time.perf_counter()
                        fn()
                        _sync(device)
                        times[key].append(time.perf_counter() - t0)
                        if device.type == "cuda":
                            added[key] = max(added[key], cuda_peak_added(device, base))
                peaks = {key: (own[key] + added[key]) / 2**20 for key in runs}
                cfg = {"model": name, "steps": steps, "batch": batch, "cfg_scale": cfg_scale,
                       "dtype": str(dtype).replace("torch.", ""), "weights_mib": round(weights / 2**20, 1)}
                summary = {"config": cfg}
                mem_metric = "peak_memory" if device.type == "cuda" else "kv_cache_memory"
                for key, ts in times.items():
                    t = timing(ts)
                    per_step = 1e3 / n_steps[key]
                    # Rows are grouped by the ARPG step count; decode_steps says what each path ran.
                    row_cfg = {**cfg, "decode_steps": n_steps[key]}
                    record.add_timing("generation", "generate", key, row_cfg, t)
                    record.add("generation", "generate", key, row_cfg, "images_per_s", "img/s", batch / t.median,
                               batch / t.q80, batch / t.q20, t.n, t.spread)
                    record.add("generation", "generate", key, row_cfg, "ms_per_step", "ms", t.median * per_step,
                               t.q20 * per_step, t.q80 * per_step, t.n, t.spread)
                    record.add("generation", "generate", key, row_cfg, mem_metric, "MiB", peaks[key])
                    summary[key] = {"images_per_s": batch / t.median, "ms_per_step": t.median * per_step,
                                    "spread": t.spread, mem_metric: peaks[key]}
                ratio_eager = summary["arpg-engine"]["images_per_s"] / summary["arpg-eager"]["images_per_s"]
                ratio_raster = summary["arpg-engine"]["images_per_s"] / summary["raster-engine"]["images_per_s"]
                record.add("generation", "generate", "ratio", cfg, "ratio_engine/eager", "x", ratio_eager)
                record.add("generation", "generate", "ratio", cfg, "ratio_arpg/raster", "x", ratio_raster)
                summary.update(engine_vs_eager=ratio_eager, arpg_vs_raster=ratio_raster)
                extra = []  # the engine against each of its variants that ran
                for provider, ratio, key in ENGINE_VARIANT_RATIOS:
                    if provider in summary:
                        summary[key] = summary["arpg-engine"]["images_per_s"] / summary[provider]["images_per_s"]
                        record.add("generation", "generate", "ratio", cfg, f"ratio_{ratio}", "x", summary[key])
                        extra.append(f", {ratio} {fmt(summary[key])}x")
                if "arpg-engine-triton" in summary:
                    ratio_triton = summary["arpg-engine-triton"]["images_per_s"] / summary["arpg-engine"]["images_per_s"]
                    record.add("generation", "generate", "ratio", cfg, "ratio_all-triton/auto", "x", ratio_triton)
                    summary.update(all_triton_vs_auto=ratio_triton)
                summaries.append(summary)
                ips = {key: fmt(summary[key]["images_per_s"]) for key in runs}
                print(
                    f"  {name} {steps} steps batch {batch}: engine {ips['arpg-engine']} img/s, "
                    f"eager {ips['arpg-eager']}, raster {ips['raster-engine']}; "
                    f"engine/eager {fmt(ratio_eager)}x, ARPG/raster {fmt(ratio_raster)}x" + "".join(extra)
                )
                if progress is not None:
                    progress.update(1)
            del engine, raster_engine, triton_engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model, raster
        gc.collect()
    if device.type != "cuda":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record.add("process", "peak_rss", "all", {}, "peak_rss", "MiB", rss)
        print(f"  process peak RSS: {fmt(rss)} MiB")
    return summaries


# The CPU's one-op elementwise chains (arpg_kernels.cpu): model ops, not attention.
_STEP_OP_EVENTS = {f"arpg_cpu::{op}" for op in STEP_OPS}
# The CPU's whole-step op: a container, its ops are counted by part and its own time as model_python.
_WHOLE_STEP_EVENT = f"arpg_cpu::{WHOLE_STEP_OP}"


def step_breakdown(events, wall_s: float, steps: int) -> dict[str, float]:
    """Host milliseconds per step by part, from torch.profiler events of one `Engine.generate`.

    attention: the arpg ops (paged_attention, append_kv, with their Python checks and dispatch);
    projections: linear/matmul; other_model_ops: the model's remaining ops (norms, RoPE, MLP activations,
    the CPU's one-op versions of them included); model_python: the model step's time outside any op
    (Python, dispatch, and the glue of the CPU's whole-step op `arpg_cpu::decode_step`, whose ops count by
    part); sampling: guidance and the sampler, all of it; engine_other: the rest of the wall time (the plan,
    index bookkeeping, Python between steps)."""
    us = defaultdict(float)

    def model_part(e) -> None:
        """Add the ops under e (the model step, or the CPU's whole-step op inside it) to their parts, and e's
        own time outside them to model_python."""
        children = 0.0
        for c in e.cpu_children:
            children += c.cpu_time_total
            if c.name == _WHOLE_STEP_EVENT:
                model_part(c)
            elif c.name.startswith("arpg::") or (c.name.startswith("arpg_cpu::") and c.name not in _STEP_OP_EVENTS):
                us["attention"] += c.cpu_time_total
            elif c.name in ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm"):
                us["projections"] += c.cpu_time_total
            else:
                us["other_model_ops"] += c.cpu_time_total
        us["model_python"] += e.cpu_time_total - children

    for e in (e for e in events if e.cpu_parent is None):
        if e.name == "arpg.model_step":
            model_part(e)
        elif e.name == "arpg.sample":
            us["sampling"] += e.cpu_time_total
    us["engine_other"] = max(wall_s * 1e6 - sum(us.values()), 0.0)
    return {part: us[part] / 1e3 / steps for part in STEP_PARTS}


def profile_engine_step(record: Record, device: torch.device, name: str, batch: int, steps: int,
                        dtype: torch.dtype, cfg_scale: float = 4.0) -> dict[str, float]:
    """One profiled `Engine.generate` (after two warm-ups); records and returns `step_breakdown`, plus
    the profiled and the unprofiled wall time per step (the profiler's own overhead shows as the gap). The
    CPU's whole-step op runs as one group (`step_groups(False)`): its thread groups run ops on two threads at
    once, and parts summed over threads would not add up to the wall time. It is called once a step
    (`step_loop(False)`, as under the profiler anyway), so that the unprofiled time is of the same path. On a
    GPU the steps launch without CUDA graphs, whose replays hide their ops from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    arpg_cfg, _ = _config(name)
    torch.manual_seed(0)
    model = ARPG(arpg_cfg).to(device, dtype).eval()
    labels = torch.arange(batch, device=device) % arpg_cfg.num_classes
    # No CUDA graphs: the profiler would see each replayed step as one launch, not its ops.
    engine = Engine(model, 2 * batch, use_cuda_graphs=False)

    def run():
        with step_groups(False), step_loop(False):
            return engine.generate(labels, steps, cfg_scale=cfg_scale, seed=0)

    for _ in range(2):
        run()
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    plain = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        _sync(device)
        wall = time.perf_counter() - t0
    parts = step_breakdown(prof.events(), wall, steps)
    parts.update(profiled_step=wall * 1e3 / steps, unprofiled_step=plain * 1e3 / steps)
    cfg = {"model": name, "steps": steps, "batch": batch, "cfg_scale": cfg_scale,
           "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    for part, ms in parts.items():
        record.add("generation", "step_profile", "arpg-engine", cfg, f"ms_{part}", "ms", ms)
    shown = ", ".join(f"{p} {fmt(parts[p])}" for p in STEP_PARTS)
    print(f"  {name} batch {batch}, {steps} steps: engine step {fmt(parts['unprofiled_step'])} ms "
          f"({fmt(parts['profiled_step'])} profiled: {shown})")
    return parts
