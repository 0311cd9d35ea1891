"""Turn a results CSV into PNG plots and a markdown summary: `python -m benchmarks.plot results.csv`."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from .common import read_rows


def _latest_run(rows: list[dict]) -> list[dict]:
    """Keep the rows of the newest (device, git commit) run in the file."""
    if not rows:
        return rows
    last = rows[-1]
    return [r for r in rows if r["device"] == last["device"] and r["git_commit"] == last["git_commit"]]


def _plot_lines(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple]], logx=False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    gen = defaultdict(lambda: defaultdict(list))
    mem = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["bench"] != "generation":
            continue
        cfg = json.loads(r["config"])
        key = f"{cfg.get('model')} {cfg.get('steps')} steps"
        if r["metric"] == "images_per_s":
            gen[key][r["provider"]].append((cfg["batch"], float(r["median"])))
        elif r["metric"] in ("peak_memory", "kv_cache_memory"):
            mem[key][r["provider"]].append((cfg["batch"], float(r["median"])))
    for key, series in gen.items():
        path = out_dir / f"throughput_{key.replace(' ', '_')}.png"
        _plot_lines(path, f"{key}: images/s vs batch", "batch (images)", "images/s", series, logx=True)
        made.append(path)
    for key, series in mem.items():
        path = out_dir / f"memory_{key.replace(' ', '_')}.png"
        _plot_lines(path, f"{key}: memory vs batch (GPU: peak allocated; CPU: K/V cache)", "batch (images)", "MiB", series, logx=True)
        made.append(path)
    bw = defaultdict(list)
    for r in rows:
        if r["bench"] == "kernels" and r["name"] == "paged_attention" and r["metric"] == "bandwidth":
            cfg = json.loads(r["config"])
            if cfg["kv_len"] == 257 and cfg["page_size"] == 16 and cfg["heads"] == 16:
                bw[f"{r['provider']} q={cfg['q_per_seq']}"].append((cfg["batch"], float(r["median"])))
    if bw:
        path = out_dir / "paged_attention_bandwidth.png"
        _plot_lines(path, "paged_attention GB/s (H=16, D=64, kv=257, page 16)", "sequences", "GB/s", bw, logx=True)
        made.append(path)
    return made


def summary_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No results.\n"
    env = rows[-1]
    lines = [
        f"# Benchmark summary\n",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda'] or '-'}; "
        f"commit {env['git_commit']}; {env['timestamp']}.\n",
    ]
    gen = [r for r in rows if r["bench"] == "generation"]
    if gen:
        lines += ["## Generation\n", "| model | steps | batch | provider | images/s | ms/step | MiB (GPU peak / CPU K/V) |", "|---|---|---|---|---|---|---|"]
        table = defaultdict(dict)
        for r in gen:
            cfg = json.loads(r["config"])
            key = (cfg["model"], cfg["steps"], cfg["batch"], r["provider"])
            table[key][r["metric"]] = float(r["median"])
        for (model, steps, batch, provider), m in sorted(table.items()):
            if "images_per_s" not in m:
                continue
            lines.append(
                f"| {model} | {steps} | {batch} | {provider} | {m['images_per_s']:.2f} | "
                f"{m.get('ms_per_step', float('nan')):.2f} | {m.get('peak_memory', m.get('kv_cache_memory', float('nan'))):.1f} |"
            )
        ratios = [r for r in gen if r["metric"].startswith("ratio_")]
        if ratios:
            lines += ["", "| model | steps | batch | ratio | value |", "|---|---|---|---|---|"]
            for r in ratios:
                cfg = json.loads(r["config"])
                lines.append(f"| {cfg['model']} | {cfg['steps']} | {cfg['batch']} | {r['metric'][6:]} | {float(r['median']):.2f}x |")
        lines.append("")
    kern = [r for r in rows if r["bench"] == "kernels" and r["metric"] in ("latency", "bandwidth", "bandwidth_fraction")]
    if kern:
        lines += ["## Kernels\n", "| op | provider | config | ms (q20-q80) | GB/s | of copy bw |", "|---|---|---|---|---|---|"]
        table = defaultdict(dict)
        for r in kern:
            table[(r["name"], r["config"], r["provider"])][r["metric"]] = r
        for (name, cfg, provider), m in table.items():
            if "latency" not in m:
                continue
            lat = m["latency"]
            c = json.loads(cfg)
            short = ", ".join(f"{k}={v}" for k, v in c.items() if k != "dtype")
            gbs = f"{float(m['bandwidth']['median']):.0f}" if "bandwidth" in m else "-"
            frac = f"{100 * float(m['bandwidth_fraction']['median']):.0f}%" if "bandwidth_fraction" in m else "-"
            lines.append(
                f"| {name} | {provider} | {short} | {float(lat['median']):.3f} ({float(lat['q20']):.3f}-{float(lat['q80']):.3f}) | {gbs} | {frac} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for PNGs and summary.md (default: beside the CSV)")
    parser.add_argument("--all-runs", action="store_true", help="use every row, not only the newest run")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    if not args.all_runs:
        rows = _latest_run(rows)
    out = args.out or args.csv.parent
    for path in make_plots(rows, out):
        print(f"wrote {path}")
    summary = out / "summary.md"
    summary.write_text(summary_markdown(rows))
    print(f"wrote {summary}")


if __name__ == "__main__":
    main()
