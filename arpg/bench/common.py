"""The shared timing helper and the results record of every benchmark.

Timing: warm-up calls, then timed calls until a `Budget` is met: at least `min_reps` samples and
`min_time_s` seconds of measuring, then more until the median is stable or `max_time_s` / `max_reps`
is reached, so a timing on a busy machine is not one lucky or unlucky call. On CUDA the calls run in
batches bracketed by CUDA events (one sync per batch), the L2 cache is flushed before each (a 256 MB
write) and inputs rotate over several copies so no call re-reads what the previous one left in cache.
On CPU, `time.perf_counter` around each call. The spread of a timing is its interquartile range over
its median. Every row goes to a CSV with the device, versions, git commit and a timestamp.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from arpg_kernels import __version__

FIELDS = [
    "timestamp", "bench", "name", "provider", "config", "metric", "unit", "median", "q20", "q80", "n", "spread",
    "device", "torch", "triton", "cuda", "git_commit",
]


def fmt(x: float) -> str:
    """3 significant digits, no exponent from 1000 up: 0.0123 -> '0.0123', 28.26 -> '28.3', 1234.5 -> '1234'."""
    return f"{x:.0f}" if abs(x) >= 999.5 else f"{x:.3g}"


@dataclass
class Timing:
    """Seconds per call: median and the 20% / 80% quantiles over `n` timed calls; `spread` is the
    interquartile range over the median (0.1: the middle half of the calls lie within 10% of it)."""

    median: float
    q20: float
    q80: float
    n: int
    spread: float


@dataclass(frozen=True)
class Budget:
    """When a timing has enough samples: at least `min_reps` of them and `min_time_s` seconds of
    measuring; then it stops once the median of the newer half of the samples is within `rtol` of the
    median of all, or at `max_time_s` seconds or `max_reps` samples."""

    min_time_s: float
    max_time_s: float
    min_reps: int = 5
    max_reps: int = 10_000
    rtol: float = 0.03

    @classmethod
    def for_device(cls, device: torch.device | str) -> Budget:
        """Kernel calls: 0.5-2 s per timing on CPU; 0.1-0.4 s on a GPU, where a call takes microseconds
        and the full grid has about 1,000 timings."""
        if torch.device(device).type == "cuda":
            return cls(min_time_s=0.1, max_time_s=0.4)
        return cls(min_time_s=0.5, max_time_s=2.0)

    def done(self, samples: Sequence[float], elapsed: float) -> bool:
        n = len(samples)
        if n < self.min_reps or elapsed < self.min_time_s:
            return False
        if elapsed >= self.max_time_s or n >= self.max_reps:
            return True
        median = statistics.median(samples)
        return abs(statistics.median(samples[n // 2:]) - median) <= self.rtol * median


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def timing(samples: Sequence[float]) -> Timing:
    """Summarise per-call seconds (at least one sample)."""
    median = statistics.median(samples)
    spread = (_quantile(samples, 0.75) - _quantile(samples, 0.25)) / median if median > 0 else 0.0
    return Timing(median, _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples), spread)


_flush_buffer: torch.Tensor | None = None


def _flush_l2(device: torch.device) -> None:
    global _flush_buffer
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" names the current device; a tensor's says which
        device = torch.device("cuda", torch.cuda.current_device())
    if _flush_buffer is None or _flush_buffer.device != device:
        _flush_buffer = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    _flush_buffer.zero_()


def cuda_peak_start(device: torch.device) -> int:
    """Reset the CUDA allocator's peak; returns the bytes allocated now, the baseline of `cuda_peak_added`."""
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cuda_peak_added(device: torch.device, base: int) -> int:
    """Bytes at the allocator's peak since `cuda_peak_start` above its baseline: what the calls in between
    allocated at most at once (the other providers' caches and weights, allocated before, are not in it)."""
    return torch.cuda.max_memory_allocated(device) - base


def _timed_calls(fn: Callable[..., object], sets: list[tuple], first: int, count: int, device: torch.device,
                 flush_l2: bool) -> list[float]:
    """Seconds of calls first .. first+count-1, each on input set i % len(sets)."""
    if device.type != "cuda":
        samples = []
        for i in range(first, first + count):
            t0 = time.perf_counter()
            fn(*sets[i % len(sets)])
            samples.append(time.perf_counter() - t0)
        return samples
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for j, i in enumerate(range(first, first + count)):
        if flush_l2:
            _flush_l2(device)
        starts[j].record()
        fn(*sets[i % len(sets)])
        ends[j].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def time_fn(
    fn: Callable[..., object],
    inputs: Sequence[tuple] | None = None,
    *,
    device: torch.device | str = "cpu",
    budget: Budget | None = None,
    warmup: int = 3,
    flush_l2: bool = True,
) -> Timing:
    """Time `fn(*inputs[i % len(inputs)])`, rotating over the input sets (or `fn()` when inputs is None),
    until `budget` (default `Budget.for_device(device)`) is met."""
    device = torch.device(device)
    budget = budget or Budget.for_device(device)
    sets = list(inputs) if inputs else [()]
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: list[float] = []
    count = budget.min_reps
    t0 = time.perf_counter()
    while True:
        samples += _timed_calls(fn, sets, len(samples), count, device, flush_l2)
        elapsed = time.perf_counter() - t0
        if budget.done(samples, elapsed):
            return timing(samples)
        # Size the next batch from the wall time per call so far: enough to reach min_time_s, else a
        # quarter more samples before the median is checked again, never past max_time_s or max_reps.
        per_call = max(elapsed / len(samples), 1e-9)
        if elapsed < budget.min_time_s:
            count = math.ceil((budget.min_time_s - elapsed) / per_call)
        else:
            room = min(math.ceil((budget.max_time_s - elapsed) / per_call), budget.max_reps - len(samples))
            count = max(1, min(math.ceil(len(samples) / 4), room))


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 256 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, flush_l2=False)
    return 2 * nbytes / t.median


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), with the ISA extensions that pick our kernel paths; '' where
    Linux does not say."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    model = next((line.split(":", 1)[1] for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")), "").split())
    isa = [name for name, flag in (("AVX-512", "avx512f"), ("AVX512_BF16", "avx512_bf16"), ("AMX", "amx_tile"))
           if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    model = " ".join(model.replace("(R)", "").replace("(TM)", "").split())
    return f"{model} ({', '.join(isa)})" if model and isa else model


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's: "CPU x86_64 x2, AMD EPYC (AVX-512, AVX512_BF16)" (cores, model, ISA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    base = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    model = _cpu_model()
    return f"{base}, {model}" if model else base


def _git_commit() -> str:
    """The source checkout's commit; for an installed package (no checkout of ours around it, though
    site-packages may sit inside someone else's repository) the package version. ARPG_GIT_COMMIT, when set,
    names it for a copy of the tree without .git (a borrowed GPU's, scripts/gpu_session.sh)."""
    if os.environ.get("ARPG_GIT_COMMIT"):
        return os.environ["ARPG_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    if not ((root / ".git").exists() and (root / "arpg_kernels" / "_version.py").is_file()):
        return f"v{__version__}"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
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
        if self.path.exists():
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), None)
            if header != FIELDS:  # a record from an older harness: rewrite it under today's header
                old = read_rows(self.path)
                with self.path.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(old)
        self.env = env_info(device)
        self.rows: list[dict] = []

    def add(self, bench: str, name: str, provider: str, config: dict, metric: str, unit: str,
            value: float, q20: float | None = None, q80: float | None = None, n: int = 1,
            spread: float | None = None) -> dict:
        """One row; q20/q80 default to the value, spread (IQR / median) is left empty for non-timings."""
        row = {
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bench": bench, "name": name, "provider": provider, "config": json.dumps(config, sort_keys=True),
            "metric": metric, "unit": unit, "median": value,
            "q20": value if q20 is None else q20, "q80": value if q80 is None else q80, "n": n,
            "spread": "" if spread is None else spread, **self.env,
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
        return self.add(bench, name, provider, config, "latency", "ms", t.median * 1e3, t.q20 * 1e3, t.q80 * 1e3, t.n,
                        t.spread)


def read_rows(path: Path | str) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))
