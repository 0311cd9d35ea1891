"""`arpg-bench`: the project's main job, generation and kernel benchmarks on this machine; `_description`
below is its --help: what it measures, what it writes where, how long it takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
from pathlib import Path

import torch

from arpg.outputs import new_run_dir, slug

from . import generation, kernels, serving, training
from .common import Budget, Record, device_name
from .generation import GENERATION_BUDGET
from .plot import MAX_SPREAD, make_plots, run_warnings, summary_markdown


def _csv(values: list) -> str:
    return ",".join(map(str, values))


def _description() -> str:
    cpu, gpu, gen = Budget.for_device("cpu"), Budget.for_device("cuda"), GENERATION_BUDGET
    q, f = ({k: _csv(v) for k, v in grid.items()} for grid in (generation.CPU_GRID, generation.GPU_GRID))
    measures = """\
arpg-bench: the project's main job. Measures on this machine:
  generation  images/s, ms per step and memory of the ARPG engine (fast backend, CUDA graphs) against
              the eager original-style path and the raster-order baseline, all with CFG 4.0;
  kernels     paged_attention per available backend against SDPA (and flex attention, FlashInfer,
              flash-attn where importable): latency, GB/s, fraction of the measured copy bandwidth,
              TFLOP/s; dense causal attention forward+backward against SDPA;
  serving     a Poisson stream of requests of mixed sizes, steps and guidance served by GenerationQueue
              (continuous batching) against one generate call per request in arrival order: images/s,
              p50/p95 latency, memory;
  training    tokens/s, images/s and peak memory of arpg.train's step on random codes, one process
              (a GPU: ARPG-L at batch 32, bf16)."""
    paragraphs = [
        f"Each timing repeats until its median is stable, and reports its spread (interquartile range over the "
        f"median). A kernel timing takes at least {cpu.min_reps} calls and {cpu.min_time_s:g} s on a CPU "
        f"({gpu.min_time_s:g} s on a GPU), a generation timing at least {gen.min_reps} runs and {gen.min_time_s:g} s; "
        f"past that, a timing stops when the median of its newer half is within {cpu.rtol:.0%} of the median of "
        f"all, or at {cpu.max_time_s:g} s (GPU: {gpu.max_time_s:g} s; generation: {gen.max_time_s:g} s).",
        "Writes results.csv (one row per measurement: median, q20, q80, n, spread, device, versions, git commit), "
        "PNG plots and summary.md into a new folder ./arpg-results/bench-<device>-<UTC time>/, which git ignores, "
        "and prints the summary and the folder. Warns on stderr, and in the summary, when the 1-minute load "
        f"average is above the CPU count at the start or the end, or a timing's spread is above {MAX_SPREAD:.0%}.",
        f"Time: the quick grid (the default without a GPU: {q['models']}; steps {q['steps']}; batches "
        f"{q['batches']}; float32; and the serving stream) takes about two minutes on 2 idle CPU cores, up to about 10 when other jobs load "
        "them. "
        f"The full GPU grid ({f['models']}; steps {f['steps']}; batches {f['batches']}; bf16; about 1,000 kernel "
        "timings) has not been timed yet; expect tens of minutes.",
    ]
    commit = """\
To commit a record, write it into the repository deliberately:
  arpg-bench --out benchmarks/results/<device>     e.g. benchmarks/results/cpu-x86-64-x2
Rows are appended to that folder's results.csv; its plots and summary.md are redrawn from this run."""
    return "\n\n".join([measures, *(textwrap.fill(p, 100) for p in paragraphs), commit])


def _record_load(record: Record, when: str) -> float:
    load = os.getloadavg()[0]
    record.add("process", "load", when, {"cpus": os.cpu_count()}, "loadavg_1min", "load", load)
    return load


def main(argv: list[str] | None = None) -> None:
    quick, full = generation.CPU_GRID, generation.GPU_GRID
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="arpg-bench", description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=default_device,
                        help=f"torch device to measure (default: cuda when available, else cpu; here {default_device})")
    parser.add_argument("--only", choices=["generation", "kernels", "serving", "training"], default=None,
                        help="run one of the four parts (default: all)")
    parser.add_argument("--rate", type=float, default=None,
                        help="serving: requests per second (default: twice what one call at a time serves, "
                             "measured in the first pass)")
    parser.add_argument("--quick", action="store_true",
                        help="the quick (CPU) grid even on a GPU (default: quick on a CPU, full on a GPU)")
    parser.add_argument("--short", action="store_true",
                        help="the short GPU grid (ARPG-L only, batch 64, 64 steps; 16 paged-attention points; no "
                             "flex attention): the few minutes of scripts/gpu_session.sh on a borrowed GPU")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated model names: cpu-tiny, ARPG-L, ARPG-XL, ARPG-XXL (default: "
                             f"{_csv(quick['models'])} quick, {_csv(full['models'])} full)")
    parser.add_argument("--batches", default=None,
                        help=f"comma-separated batch sizes in images (default: {_csv(quick['batches'])} quick, "
                             f"{_csv(full['batches'])} full)")
    parser.add_argument("--steps", default=None,
                        help=f"comma-separated ARPG step counts (default: {_csv(quick['steps'])} quick, "
                             f"{_csv(full['steps'])} full); raster always decodes every token")
    parser.add_argument("--gen-seconds", type=float, default=None,
                        help=f"generation: time each provider at least this many seconds at each point, interleaved "
                             f"(default: {GENERATION_BUDGET.min_time_s:g} s, then until the median settles or "
                             f"{GENERATION_BUDGET.max_time_s:g} s); more gives steadier ratios on a noisy machine")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads (default: torch's choice, here {torch.get_num_threads()})")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: a new ./arpg-results/bench-<device>-<UTC time>/, ignored "
                             "by git); pass benchmarks/results/<device> only to commit a record")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if args.quick and args.short:
        parser.error("--quick and --short pick different grids: give one")
    if args.short and torch.device(args.device).type != "cuda":
        parser.error(f"--short is a GPU grid (ARPG-L); on {args.device} the quick grid runs: leave --short out")
    quick_grid = args.quick or device.type != "cuda"
    grid_name = "quick" if quick_grid else "short" if args.short else "full"
    out = args.out or new_run_dir(f"bench-{slug(device_name(device))}")
    record = Record(out / "results.csv", device)
    load = _record_load(record, "start")
    print(f"arpg-bench on {record.env['device']} (torch {record.env['torch']}, triton {record.env['triton']}), "
          f"{grid_name} grid, {torch.get_num_threads()} CPU threads, "
          f"load {load:.2f} on {os.cpu_count()} CPUs; writing to {out}/")
    try:
        from tqdm import tqdm as progress_factory
    except ImportError:
        progress_factory = None

    if args.only in (None, "generation"):
        grid = dict({"quick": quick, "short": generation.SHORT_GRID, "full": full}[grid_name])
        for key, conv in (("models", str), ("batches", int), ("steps", int)):
            value = getattr(args, key)
            if value:
                grid[key] = [conv(v) for v in value.split(",")]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        print("generation: ARPG engine vs eager original-style path vs raster baseline (CFG 4.0)")
        total = len(grid["models"]) * len(grid["steps"]) * len(grid["batches"])
        bar = progress_factory(total=total, desc="generation", disable=quick_grid) if progress_factory else None
        budget = GENERATION_BUDGET
        if args.gen_seconds is not None:
            if args.gen_seconds <= 0:
                parser.error(f"--gen-seconds must be positive, got {args.gen_seconds:g}")
            budget = dataclasses.replace(budget, min_time_s=args.gen_seconds,
                                         max_time_s=max(budget.max_time_s, args.gen_seconds))
        generation.bench_generation(record, device, grid, dtype, budget=budget, progress=bar)
        if bar is not None:
            bar.close()
        print("generation: where an engine step's host time goes (torch.profiler, largest batch and step count)")
        for name in grid["models"]:
            generation.profile_engine_step(record, device, name, max(grid["batches"]), max(grid["steps"]), dtype)
    if args.only in (None, "serving"):
        stream = dict({"quick": serving.CPU_STREAM, "short": serving.SHORT_STREAM, "full": serving.GPU_STREAM}[grid_name])
        if args.models:
            stream["model"] = args.models.split(",")[0]
        print(f"serving: GenerationQueue vs one generate call per request ({stream['requests']} requests of "
              f"1-{stream['max_images']} images, {stream['model']})")
        serving.bench_serving(record, device, torch.bfloat16 if device.type == "cuda" else torch.float32, stream,
                              rate=args.rate)
    if args.only in (None, "training"):
        grid = dict({"quick": training.CPU_TRAINING, "short": training.SHORT_TRAINING,
                     "full": training.GPU_TRAINING}[grid_name])
        if args.models:
            grid["model"] = args.models.split(",")[0]
        print(f"training: tokens/s of arpg.train's step ({grid['model']}, batch {grid['batch']}, one process)")
        training.bench_training(record, device, grid)
    if args.only in (None, "kernels"):
        print("kernels: paged_attention per provider, dense attention fwd+bwd")
        kernels.run(record, device, grid_name, progress_factory=None if quick_grid else progress_factory)
    _record_load(record, "end")

    rows = record.rows
    for path in make_plots(rows, out):
        print(f"wrote {path}")
    summary = out / "summary.md"
    text = summary_markdown(rows)
    summary.write_text(text)
    print(f"wrote {summary}\n")
    print(text)
    print(f"results in {out}/")
    for warning in run_warnings(rows):
        print(f"arpg-bench: warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    main()
