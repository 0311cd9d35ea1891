"""The shared timing helper and the results record of every benchmark.

Timing: warm-up calls, then `rep` timed calls; on CUDA each call is bracketed by CUDA events and
the L2 cache is flushed before it (a 256 MB write), inputs rotate over several copies so no call
re-reads what the previous one left in cache. On CPU, `time.perf_counter` around each call.
Every row goes to a CSV with the device, versions, git commit and a timestamp.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIELDS = [
    "timestamp", "bench", "name", "provider", "config", "metric", "unit", "median", "q20", "q80", "n",
    "device", "torch", "triton", "cuda", "git_commit",
]


@dataclass
class Timing:
    """Seconds per call: median and the 20% / 80% quantiles over `n` timed calls."""

    median: float
    q20: float
    q80: float
    n: int


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _timing(samples: list[float]) -> Timing:
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples))


_flush_buffer: torch.Tensor | None = None


def _flush_l2(device: torch.device) -> None:
    global _flush_buffer
    if _flush_buffer is None or _flush_buffer.device != device:
        _flush_buffer = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    _flush_buffer.zero_()


def time_fn(
    fn: Callable[..., object],
    inputs: Sequence[tuple] | None = None,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    rep: int = 20,
    flush_l2: bool = True,
) -> Timing:
    """Time `fn(*inputs[i % len(inputs)])`, rotating over the input sets (or `fn()` when inputs is None)."""
    device = torch.device(device)
    sets = list(inputs) if inputs else [()]
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            if flush_l2:
                _flush_l2(device)
            starts[i].record()
            fn(*sets[i % len(sets)])
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for i in range(rep):
            t0 = time.perf_counter()
            fn(*sets[i % len(sets)])
            samples.append(time.perf_counter() - t0)
    return _timing(samples)


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 256 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=3, rep=10, flush_l2=False)
    return 2 * nbytes / t.median


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: torch.device | str) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "git_commit": _git_commit(),
    }


class Record:
    """Appends benchmark rows to a CSV (created with a header if new) and keeps them in memory."""

    def __init__(self, path: Path | str, device: torch.device | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.env = env_info(device)
        self.rows: list[dict] = []

    def add(self, bench: str, name: str, provider: str, config: dict, metric: str, unit: str,
            value: float, q20: float | None = None, q80: float | None = None, n: int = 1) -> dict:
        row = {
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bench": bench, "name": name, "provider": provider, "config": json.dumps(config, sort_keys=True),
            "metric": metric, "unit": unit, "median": value,
            "q20": value if q20 is None else q20, "q80": value if q80 is None else q80, "n": n, **self.env,
        }
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        self.rows.append(row)
        return row

    def add_timing(self, bench: str, name: str, provider: str, config: dict, t: Timing) -> dict:
        """A latency row in milliseconds."""
        return self.add(bench, name, provider, config, "latency", "ms", t.median * 1e3, t.q20 * 1e3, t.q80 * 1e3, t.n)


def read_rows(path: Path | str) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))
