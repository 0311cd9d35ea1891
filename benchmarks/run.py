"""`arpg-bench`: the project's main job. Measures generation (ARPG engine vs eager vs raster) and the
kernels on this machine, appends every row to a CSV, then writes plots and a markdown summary.

On a CPU-only machine the default is the quick grid (a tiny 16x16-grid model, a few minutes); on a
GPU the full grid of the benchmarks issue (ARPG-L/XL/XXL, 32 and 64 steps, batch 1..256, bf16).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from . import generation, kernels
from .common import RESULTS_DIR, Record, device_name
from .plot import make_plots, summary_markdown


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arpg-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=["generation", "kernels"], default=None)
    parser.add_argument("--quick", action="store_true", help="the CPU grid even on a GPU")
    parser.add_argument("--models", default=None, help="comma-separated model names (GPU grid), e.g. ARPG-L")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--steps", default=None, help="comma-separated step counts")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    quick = args.quick or device.type != "cuda"
    out = args.out or RESULTS_DIR / _slug(device_name(device))
    record = Record(out / "results.csv", device)
    print(f"arpg-bench on {record.env['device']} (torch {record.env['torch']}, triton {record.env['triton']}), "
          f"{'quick' if quick else 'full'} grid, {torch.get_num_threads()} CPU threads; rows -> {record.path}")
    try:
        from tqdm import tqdm as progress_factory
    except ImportError:
        progress_factory = None

    if args.only in (None, "generation"):
        grid = dict(generation.CPU_GRID if quick else generation.GPU_GRID)
        for key, conv in (("models", str), ("batches", int), ("steps", int)):
            value = getattr(args, key)
            if value:
                grid[key] = [conv(v) for v in value.split(",")]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        print("generation: ARPG engine vs eager original-style path vs raster baseline (CFG 4.0)")
        total = len(grid["models"]) * len(grid["steps"]) * len(grid["batches"])
        bar = progress_factory(total=total, desc="generation", disable=quick) if progress_factory else None
        generation.bench_generation(record, device, grid, dtype, repeats=2 if quick else 3, progress=bar)
        if bar is not None:
            bar.close()
    if args.only in (None, "kernels"):
        print("kernels: paged_attention per provider, dense attention fwd+bwd")
        kernels.run(record, device, quick, progress_factory=None if quick else progress_factory)

    rows = record.rows
    for path in make_plots(rows, out):
        print(f"wrote {path}")
    summary = out / "summary.md"
    summary.write_text(summary_markdown(rows))
    print(f"wrote {summary}\n")
    print(summary_markdown(rows))


if __name__ == "__main__":
    main()
