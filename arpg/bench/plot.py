"""Turn a results CSV into PNG plots and a markdown summary: `python -m arpg.bench.plot results.csv`."""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from arpg.outputs import new_run_dir

from .common import fmt, read_rows

# A timing whose interquartile range is more than this fraction of its median is flagged.
MAX_SPREAD = 0.10
_MEMORY_METRICS = {"peak_memory": "GPU K/V cache + peak allocated in a call", "kv_cache_memory": "CPU K/V cache"}


def _latest_run(rows: list[dict]) -> list[dict]:
    """Keep the rows of the newest (device, git commit) run in the file."""
    if not rows:
        return rows
    last = rows[-1]
    return [r for r in rows if r["device"] == last["device"] and r["git_commit"] == last["git_commit"]]


def _short(config: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in json.loads(config).items() if k not in ("dtype", "weights_mib"))


def _spread(row: dict) -> float | None:
    return None if row.get("spread") in (None, "") else float(row["spread"])


def _percent(fraction: float) -> str:
    return f"{fmt(100 * fraction)}%"


def _cell(metrics: dict[str, dict], metric: str) -> str:
    return fmt(float(metrics[metric]["median"])) if metric in metrics else "-"


def _spread_cell(row: dict) -> str:
    spread = _spread(row)
    return "-" if spread is None else _percent(spread)


def line_figure(title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple]], logx: bool = False,
                ref: tuple[float, str] | None = None):
    """A matplotlib Figure of `series` ({label: [(x, y), ...]}); `ref` = (y, label) draws a dashed
    horizontal reference line. The x axis is log 2 only when `logx` and the points have two x values or more;
    its ticks are the measured x values."""
    from matplotlib.figure import Figure  # a bare Figure renders through Agg, no pyplot state

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if ref is not None:
        ax.axhline(ref[0], linestyle="--", color="gray", label=ref[1])
    xs = sorted({p[0] for points in series.values() for p in points})
    if logx and len(xs) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])  # batch sizes are discrete: tick exactly those measured
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def make_figures(rows: list[dict]) -> dict[str, object]:
    """File name -> Figure: throughput and memory vs batch per model and step count, paged_attention GB/s."""
    figures = {}
    gen = defaultdict(lambda: defaultdict(list))
    mem = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["bench"] != "generation":
            continue
        cfg = json.loads(r["config"])
        key = f"{cfg.get('model')} {cfg.get('steps')} steps"
        if r["metric"] == "images_per_s":
            gen[key][r["provider"]].append((cfg["batch"], float(r["median"])))
        elif r["metric"] in _MEMORY_METRICS:
            mem[(key, r["metric"])][r["provider"]].append((cfg["batch"], float(r["median"])))
    for key, series in gen.items():
        figures[f"throughput_{key.replace(' ', '_')}.png"] = line_figure(
            f"{key}: images/s vs batch", "batch (images)", "images/s", series, logx=True)
    for (key, metric), series in mem.items():
        figures[f"memory_{key.replace(' ', '_')}.png"] = line_figure(
            f"{key}: {_MEMORY_METRICS[metric]} vs batch", "batch (images)", "MiB", series, logx=True)
    bw = defaultdict(list)
    copy = None
    for r in rows:
        if r["bench"] == "kernels" and r["name"] == "copy" and r["metric"] == "bandwidth":
            copy = float(r["median"])
        if r["bench"] == "kernels" and r["name"] == "paged_attention" and r["metric"] == "bandwidth":
            cfg = json.loads(r["config"])
            if cfg["kv_len"] == 257 and cfg["page_size"] == 16 and cfg["heads"] == 16:
                bw[f"{r['provider']} q={cfg['q_per_seq']} {cfg.get('dtype', '')}".rstrip()].append(
                    (cfg["batch"], float(r["median"])))
    if bw:
        ref = None if copy is None else (copy, f"measured copy bandwidth {fmt(copy)} GB/s")
        figures["paged_attention_bandwidth.png"] = line_figure(
            "paged_attention GB/s (H=16, D=64, kv=257, page 16)", "sequences", "GB/s", bw, logx=True, ref=ref)
    return figures


def make_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for name, fig in make_figures(rows).items():
        fig.savefig(out_dir / name, dpi=110)
        made.append(out_dir / name)
    return made


def run_warnings(rows: list[dict]) -> list[str]:
    """One line per reason not to trust the run: a loaded machine, timings with a wide spread."""
    warnings = []
    loads = [r for r in rows if r["bench"] == "process" and r["metric"] == "loadavg_1min"]
    if any(float(r["median"]) > json.loads(r["config"])["cpus"] for r in loads):
        cpus = json.loads(loads[0]["config"])["cpus"]
        at = ", ".join(f"{fmt(float(r['median']))} at {r['provider']}" for r in loads)
        warnings.append(f"machine loaded: 1-minute load average {at}, above its {cpus} CPUs; timings are noisy")
    wide = [r for r in rows if r["metric"] == "latency" and (_spread(r) or 0.0) > MAX_SPREAD]
    if wide:
        named = "; ".join(f"{r['bench']} {r['provider']} ({_short(r['config'])}): {_percent(_spread(r))}" for r in wide)
        warnings.append(f"{len(wide)} timing(s) with spread (IQR / median) over {_percent(MAX_SPREAD)}: {named}")
    return warnings


def summary_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No results.\n"
    env = rows[-1]
    lines = [
        "# Benchmark summary\n",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda'] or '-'}; "
        f"commit {env['git_commit']}; {env['timestamp']}. Spread: interquartile range over median.\n",
    ]
    warnings = run_warnings(rows)
    if warnings:
        lines += ["## Warnings\n", *(f"- {w}" for w in warnings), ""]
    gen = [r for r in rows if r["bench"] == "generation"]
    if gen:
        lines += [
            "## Generation\n",
            "| model | steps | batch | provider | images/s | ms/step | spread | GPU peak MiB | CPU K/V MiB |",
            "|" + "---|" * 9,
        ]
        table = defaultdict(dict)
        for r in gen:
            if r["name"] != "generate":
                continue
            cfg = json.loads(r["config"])
            table[(cfg["model"], cfg["steps"], cfg["batch"], r["provider"])][r["metric"]] = r
        for (model, steps, batch, provider), m in sorted(table.items()):
            if "images_per_s" not in m:
                continue
            cells = [_cell(m, k) for k in ("images_per_s", "ms_per_step")]
            cells += [_spread_cell(m["images_per_s"])] + [_cell(m, k) for k in _MEMORY_METRICS]
            lines.append(f"| {model} | {steps} | {batch} | {provider} | {' | '.join(cells)} |")
        ratios = [r for r in gen if r["metric"].startswith("ratio_")]
        if ratios:
            lines += ["", "| model | steps | batch | ratio | value |", "|---|---|---|---|---|"]
            for r in ratios:
                cfg = json.loads(r["config"])
                ratio = f"{r['metric'][6:]} | {fmt(float(r['median']))}x"
                lines.append(f"| {cfg['model']} | {cfg['steps']} | {cfg['batch']} | {ratio} |")
        lines += _step_profile_lines([r for r in gen if r["name"] == "step_profile"])
        lines.append("")
    lines += _serving_lines([r for r in rows if r["bench"] == "serving"])
    lines += _training_lines([r for r in rows if r["bench"] == "training"])
    kernel_metrics = ("latency", "bandwidth", "bandwidth_fraction")
    kern = [r for r in rows if r["bench"] == "kernels" and r["metric"] in kernel_metrics]
    if kern:
        lines.append("## Kernels\n")
        copy = [r for r in kern if r["name"] == "copy"]
        if copy:
            lines.append(f"Measured copy bandwidth (read + write): {fmt(float(copy[-1]['median']))} GB/s.\n")
        lines += ["| op | provider | config | dtype | ms (q20-q80) | spread | GB/s | of copy bw |", "|" + "---|" * 8]
        table = defaultdict(dict)
        for r in kern:
            table[(r["name"], r["config"], r["provider"])][r["metric"]] = r
        for (name, cfg, provider), m in table.items():
            if "latency" not in m:
                continue
            lat = m["latency"]
            gbs = fmt(float(m["bandwidth"]["median"])) if "bandwidth" in m else "-"
            frac = _percent(float(m["bandwidth_fraction"]["median"])) if "bandwidth_fraction" in m else "-"
            ms = f"{fmt(float(lat['median']))} ({fmt(float(lat['q20']))}-{fmt(float(lat['q80']))})"
            dtype = json.loads(cfg).get("dtype", "-")
            lines.append(f"| {name} | {provider} | {_short(cfg)} | {dtype} | {ms} | {_spread_cell(lat)} | {gbs} | {frac} |")
        lines.append("")
        lines += _paged_ratio_lines(table)
    return "\n".join(lines) + "\n"


def _serving_lines(rows: list[dict]) -> list[str]:
    """The request stream served by the queue and one call at a time (arpg/bench/serving.py)."""
    if not rows:
        return []
    table = defaultdict(dict)
    for r in rows:
        table[(r["config"], r["provider"])][r["metric"]] = r
    lines = ["## Serving\n", "| stream | provider | images/s | p50 s | p95 s | GPU peak MiB | CPU K/V MiB |",
             "|" + "---|" * 7]
    for (cfg, provider), m in table.items():
        if provider == "ratio":
            continue
        cells = [_cell(m, k) for k in ("images_per_s", "latency_p50", "latency_p95", *_MEMORY_METRICS)]
        lines.append(f"| {_short(cfg)} | {provider} | {' | '.join(cells)} |")
    for (cfg, provider), m in table.items():
        if provider == "ratio" and "ratio_queue/sequential" in m:
            lines.append(f"\nqueue / sequential images/s: {fmt(float(m['ratio_queue/sequential']['median']))}x "
                         f"({_short(cfg)})")
    return lines + [""]


def _training_lines(rows: list[dict]) -> list[str]:
    """The trainer's step on random codes (arpg/bench/training.py)."""
    if not rows:
        return []
    table = defaultdict(dict)
    for r in rows:
        table[(r["config"], r["provider"])][r["metric"]] = r
    lines = ["## Training\n", "| config | provider | tokens/s | images/s | peak MiB |", "|" + "---|" * 5]
    for (cfg, provider), m in table.items():
        cells = [_cell(m, k) for k in ("tokens_per_s", "images_per_s", "peak_mib")]
        lines.append(f"| {_short(cfg)} | {provider} | {' | '.join(cells)} |")
    return lines + [""]


STEP_PARTS = ("attention", "projections", "other_model_ops", "model_python", "sampling", "engine_other")


def _step_profile_lines(rows: list[dict]) -> list[str]:
    """The engine step's host time by part (arpg/bench/generation.py: step_breakdown), ms per step."""
    if not rows:
        return []
    by_cfg = defaultdict(dict)
    for r in rows:
        by_cfg[r["config"]][r["metric"][3:]] = float(r["median"])
    head = " | ".join(p.replace("_", " ") for p in STEP_PARTS)
    lines = ["", "Engine step, host ms per step by part (torch.profiler; the CPU's whole-step op as one group; "
                 "shares of the profiled step):\n",
             f"| model | steps | batch | step ms | profiled | {head} |", "|" + "---|" * (5 + len(STEP_PARTS))]
    for cfg, parts in by_cfg.items():
        c = json.loads(cfg)
        total = parts.get("profiled_step") or 1.0
        cells = [f"{fmt(parts.get(p, 0.0))} ({_percent(parts.get(p, 0.0) / total)})" for p in STEP_PARTS]
        lines.append(f"| {c['model']} | {c['steps']} | {c['batch']} | {fmt(parts.get('unprofiled_step', 0.0))} | "
                     f"{fmt(total)} | {' | '.join(cells)} |")
    return lines


PAGED_OURS = ("arpg-cuda", "arpg-triton", "arpg-cpu")
PAGED_BASELINES = ("gather+sdpa", "sdpa-gathered", "flashinfer", "flash-attn")


def _paged_ratio_lines(table: dict) -> list[str]:
    """Speedup of each of our paged_attention providers over each baseline, per config (baseline latency /
    ours, medians of one run), and the geometric mean and minimum over the configs."""
    lat = {(cfg, provider): float(m["latency"]["median"]) for (name, cfg, provider), m in table.items()
           if name == "paged_attention" and "latency" in m}
    pairs = [(o, b) for o in PAGED_OURS for b in PAGED_BASELINES
             if any(p == o for _, p in lat) and any(p == b for _, p in lat)]
    if not pairs:
        return []
    configs = list(dict.fromkeys(cfg for cfg, _ in lat))
    head = " | ".join(f"{o} vs {b}" for o, b in pairs)
    lines = ["### paged_attention speedup (baseline ms / ours)\n", f"| config | dtype | {head} |",
             "|" + "---|" * (2 + len(pairs))]
    ratios = defaultdict(list)
    for cfg in configs:
        cells = []
        for o, b in pairs:
            if (cfg, o) in lat and (cfg, b) in lat:
                ratios[(o, b)].append(lat[(cfg, b)] / lat[(cfg, o)])
                cells.append(f"{fmt(ratios[(o, b)][-1])}x")
            else:
                cells.append("-")
        lines.append(f"| {_short(cfg)} | {json.loads(cfg).get('dtype', '-')} | {' | '.join(cells)} |")
    geo = [f"{fmt(math.exp(sum(map(math.log, ratios[p])) / len(ratios[p])))}x" if ratios[p] else "-" for p in pairs]
    low = [f"{fmt(min(ratios[p]))}x" if ratios[p] else "-" for p in pairs]
    lines += [f"| geometric mean | | {' | '.join(geo)} |", f"| minimum | | {' | '.join(low)} |", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for PNGs and summary.md (default: a new ./arpg-results/plots-<UTC time>/; "
                             "pass the CSV's folder to redraw a committed record in place)")
    parser.add_argument("--all-runs", action="store_true", help="use every row, not only the newest run")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    if not args.all_runs:
        rows = _latest_run(rows)
    out = args.out or new_run_dir("plots")
    for path in make_plots(rows, out):
        print(f"wrote {path}")
    summary = out / "summary.md"
    summary.write_text(summary_markdown(rows))
    print(f"wrote {summary}")


if __name__ == "__main__":
    main()
