"""Serving: a stream of requests served by `GenerationQueue` against one `generate` call per request.

The stream: requests of 1..max_images images (uniform), each with a step count drawn from the grid's
steps, guidance 4.0 or none (half each), its own seed; arrivals are a Poisson process of `rate`
requests per second. By default the rate is set from the first sequential pass, at `load` times what
one-call-at-a-time can serve (load 2: requests come twice as fast), so the queue has work to batch.

- "sequential": the requests run one after another in arrival order, each with `arpg.generate` on the
  model's engine. Each call's service time is measured; its start is max(arrival, previous finish), so
  its latency is computed exactly from those times without sleeping through the gaps.
- "queue": a feeder thread submits each request at its arrival time to one `GenerationQueue`; a
  request's latency is from its arrival to its future's result.

Both run in alternating rounds (sequential, queue, sequential, ...) in one process. Images/s: images
over the time from the first arrival to the last finish; p50 / p95: latency percentiles over all
requests of all rounds. Memory: the peak allocated on CUDA; on the CPU the K/V cache each path holds
(the model's engine grows to the largest request's rows; the queue's cache is fixed by max_rows).
"""

from __future__ import annotations

import random
import threading
import time

import torch

import arpg
from arpg import ARPG, GenerationQueue

from .common import Record, cuda_peak_added, cuda_peak_start, fmt
from .generation import _config, _sync

CPU_STREAM = dict(model="cpu-tiny", requests=16, max_images=8, steps=[16, 32], max_rows=32, rounds=2)
GPU_STREAM = dict(model="ARPG-L", requests=64, max_images=16, steps=[32, 64], max_rows=256, rounds=2)
SHORT_STREAM = dict(GPU_STREAM, requests=24)
CFG = 4.0


def make_stream(n: int, max_images: int, steps: list[int], num_classes: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        b = rng.randint(1, max_images)
        out.append(dict(labels=[rng.randrange(num_classes) for _ in range(b)], num_steps=rng.choice(steps),
                        cfg_scale=rng.choice([1.0, CFG]), seed=1000 + i))
    return out


def _arrivals(n: int, rate: float, seed: int = 1) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _sequential(model, stream, device) -> list[float]:
    """Service time of each request, run back to back."""
    times = []
    for r in stream:
        _sync(device)
        t0 = time.perf_counter()
        arpg.generate(model, torch.tensor(r["labels"], device=device), r["num_steps"], cfg_scale=r["cfg_scale"],
                      seed=r["seed"])
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _sequential_latencies(service: list[float], arrivals: list[float]) -> tuple[list[float], float]:
    finish, lat = 0.0, []
    for s, a in zip(service, arrivals):
        finish = max(finish, a) + s
        lat.append(finish - a)
    return lat, finish - arrivals[0]


def _queued(queue: GenerationQueue, stream, arrivals) -> tuple[list[float], float]:
    done = [0.0] * len(stream)
    futs = []
    t0 = time.perf_counter()

    def feed():
        for i, (r, a) in enumerate(zip(stream, arrivals)):
            delay = t0 + a - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            f = queue.submit(r["labels"], r["num_steps"], r["cfg_scale"], r["seed"])
            f.add_done_callback(lambda _, i=i: done.__setitem__(i, time.perf_counter()))
            futs.append(f)

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join()
    for f in futs:
        f.result()
    lat = [d - (t0 + a) for d, a in zip(done, arrivals)]
    return lat, max(done) - t0


def bench_serving(record: Record, device: torch.device, dtype: torch.dtype, stream_cfg: dict,
                  rate: float | None = None, load: float = 2.0) -> dict:
    """Run the stream both ways; adds rows to `record` and returns a summary dict."""
    arpg_cfg, _ = _config(stream_cfg["model"])
    torch.manual_seed(0)
    model = ARPG(arpg_cfg).to(device, dtype).eval()
    stream = make_stream(stream_cfg["requests"], stream_cfg["max_images"], stream_cfg["steps"], arpg_cfg.num_classes)
    images = sum(len(r["labels"]) for r in stream)
    queue = GenerationQueue(model, max_rows=stream_cfg["max_rows"])
    # Warm-up: the model's engine at its largest size, graphs, allocator, the queue's buckets.
    big = max(stream, key=lambda r: len(r["labels"]) * (2 if r["cfg_scale"] != 1.0 else 1))
    _sequential(model, [big], device)
    for f in [queue.submit(r["labels"], r["num_steps"], r["cfg_scale"], r["seed"]) for r in stream[:4]]:
        f.result()
    lat = {"sequential": [], "queue": []}
    spans = {"sequential": [], "queue": []}
    added = {"sequential": 0, "queue": 0}
    arrivals = None
    for _ in range(stream_cfg["rounds"]):
        for provider in ("sequential", "queue"):
            if device.type == "cuda":
                base = cuda_peak_start(device)
            if provider == "sequential":
                service = _sequential(model, stream, device)
                if arrivals is None:
                    rate = rate or load * len(stream) / sum(service)
                    arrivals = _arrivals(len(stream), rate)
                l, span = _sequential_latencies(service, arrivals)
            else:
                l, span = _queued(queue, stream, arrivals)
            lat[provider] += l
            spans[provider].append(span)
            if device.type == "cuda":
                added[provider] = max(added[provider], cuda_peak_added(device, base))
    queue.shutdown()
    # The K/V cache each holds; on a GPU plus the most it allocated during a round.
    own = {"sequential": arpg.engine._ENGINES[model].cache.nbytes, "queue": queue.cache.nbytes}
    peaks = {provider: (own[provider] + added[provider]) / 2**20 for provider in own}
    cfg = {"model": stream_cfg["model"], "requests": len(stream), "images": images,
           "max_images": stream_cfg["max_images"], "steps": "/".join(map(str, stream_cfg["steps"])),
           "cfg_scale": f"1/{CFG:g}", "rate_per_s": round(rate, 3), "max_rows": queue.max_rows,
           "rounds": stream_cfg["rounds"], "dtype": str(dtype).replace("torch.", "")}
    summary = {"config": cfg}
    mem_metric = "peak_memory" if device.type == "cuda" else "kv_cache_memory"
    for provider in ("sequential", "queue"):
        ips = [images / s for s in spans[provider]]
        median_ips = sorted(ips)[len(ips) // 2]
        p50, p95 = _percentile(lat[provider], 0.5), _percentile(lat[provider], 0.95)
        record.add("serving", "stream", provider, cfg, "images_per_s", "img/s", median_ips, min(ips), max(ips),
                   len(ips))
        record.add("serving", "stream", provider, cfg, "latency_p50", "s", p50, n=len(lat[provider]))
        record.add("serving", "stream", provider, cfg, "latency_p95", "s", p95, n=len(lat[provider]))
        record.add("serving", "stream", provider, cfg, mem_metric, "MiB", peaks[provider])
        summary[provider] = {"images_per_s": median_ips, "p50_s": p50, "p95_s": p95, mem_metric: peaks[provider]}
    ratio = summary["queue"]["images_per_s"] / summary["sequential"]["images_per_s"]
    record.add("serving", "stream", "ratio", cfg, "ratio_queue/sequential", "x", ratio)
    summary["queue_vs_sequential"] = ratio
    s, q = summary["sequential"], summary["queue"]
    print(f"  {len(stream)} requests ({images} images) at {rate:.2f}/s: queue {fmt(q['images_per_s'])} img/s, "
          f"p50 {fmt(q['p50_s'])} s, p95 {fmt(q['p95_s'])} s; sequential {fmt(s['images_per_s'])} img/s, "
          f"p50 {fmt(s['p50_s'])} s, p95 {fmt(s['p95_s'])} s; queue/sequential {fmt(ratio)}x")
    return summary
