"""How far ARPG can lead raster-order decoding on this CPU: each generation's products timed alone.

    python3 -m arpg.bench.bound [--batch 16] [--steps 64] [--cfg 4] [--reps 5]

For `arpg-bench`'s CPU pair (`cpu-tiny`: ARPG and the raster baseline of the same size, same seed), one
process, interleaved: the whole generation of each on its engine (arpg-bench's `arpg-engine` and
`raster-engine`), and the products of each generation alone: every linear layer of the model at the rows
the CPU's whole-step op gives it (fed tokens through the self layers and the shared K/V, queries through
the cross layers, guided queries through the head), those of the largest thread group on one thread (the
groups run side by side), or with one group each product on all threads, as the op does.

A generation takes T = P + S * o: its products P, and S steps of everything else, o per step (attention,
the small ops, sampling, Python). Both models run about the same products per token, and ARPG 4x fewer
steps of more rows each. T_raster / T_arpg = (P_r + S_r o_r) / (P_a + S_a o_a) therefore lies between
P_r / P_a and (S_r o_r) / (S_a o_a): making the steps faster or slower, for both alike, moves the ratio
only between those two. The script prints both ends, measured. Split the rest further into work per row W
(attention, norms, sampling: the same rows for both) and a fixed cost per step f (the same engine: about
the same for both): a ratio `--target` then needs f >= (target P_a - P_r + (target - 1) W) / (S_r - target
S_a), so at least the value at W = 0, which the script prints beside the time of a whole raster step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from arpg.bench import generation
from arpg.engine import Engine, generation_plans
from arpg.model import ARPG
from arpg.raster import RasterLM


def _linears(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n))
    return [n // parts + (g < n % parts) for g in range(parts)]


def product_work(model, plans, groups: int, guided: bool):
    """The products of the generation as the whole-step op runs them: (in_group, after, side_by_side).

    in_group: (weight, rows) of every step's products in the largest thread group; after: those of the head
    where it runs after the groups; side_by_side: whether there are several groups (each on its own thread;
    one group runs each product on all threads). plans: one per sample (all share the schedule, so the
    counts). With guidance the batch has 2B sequences: groups of whole conditional / unconditional pairs, each
    running the head on its conditional rows, or, with fewer pairs than groups, groups of sequences and the
    head after them on all conditional rows.
    """
    bsz = len(plans)
    if guided and bsz >= groups:
        pairs = max(_split(bsz, groups))
        seqs, head, head_after = 2 * pairs, pairs, 0
    elif guided:
        seqs, head, head_after = max(_split(2 * bsz, groups)), 0, bsz
    else:
        seqs = head = max(_split(bsz, groups))
        head_after = 0
    if isinstance(model, ARPG):
        fed = _linears(model.layers.self_dec) + [model.layers.to_k.weight, model.layers.to_v.weight]
        queried = _linears(model.layers.cross_dec)
    else:  # raster: the fed token's row is its query
        fed, queried = _linears(model.layers), []
    in_group, after = [], []
    for step in plans[0]:
        n_q = step.n_q if queried else step.n_in
        in_group += [(w, seqs * step.n_in) for w in fed if step.n_in]
        in_group += [(w, seqs * n_q) for w in queried if n_q]
        if head and n_q:
            in_group.append((model.head.weight, head * n_q))
        if head_after and n_q:
            after.append((model.head.weight, head_after * n_q))
    return in_group, after, min(groups, 2 * bsz if guided else bsz) > 1


def run_products(work, scratch: dict[tuple[int, int], torch.Tensor]) -> None:
    for w, rows in work:
        key = (rows, w.shape[1])
        x = scratch.get(key)
        if x is None:
            x = scratch[key] = torch.randn(rows, w.shape[1])
        F.linear(x, w)


def main(argv=None) -> dict:
    """Time, print the table and the two ends; returns the figures (ms, GFLOP, ratios)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=64, help="ARPG's steps (raster: one per token)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (1: none)")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds; medians are reported")
    p.add_argument("--target", type=float, default=3.5, help="an ARPG / raster ratio to test for reach")
    args = p.parse_args(argv)
    if args.batch < 1 or args.reps < 1:
        p.error("--batch and --reps must be >= 1")
    if args.target <= 1:
        p.error(f"--target must be above 1 (a lead of ARPG over raster), not {args.target:g}")

    threads = torch.get_num_threads()
    guided = args.cfg != 1.0
    torch.manual_seed(0)
    config = generation.CPU_CONFIG
    arpg = ARPG(config).eval()
    raster = RasterLM(config).eval()
    labels = torch.arange(args.batch) % config.num_classes
    rows = 2 * args.batch if guided else args.batch
    engines = {"arpg": Engine(arpg, rows), "raster": Engine(raster, rows)}
    steps = {"arpg": args.steps, "raster": None}
    plans = {name: generation_plans(e.model, args.batch, steps[name], "arccos", args.cfg, "constant", None, None)
             for name, e in engines.items()}
    work = {name: product_work(e.model, plans[name], threads, guided) for name, e in engines.items()}
    # One group holds the whole batch: every product of the generation once.
    flops = {name: sum(2 * w.numel() * r for w, r in product_work(e.model, plans[name], 1, guided)[0])
             for name, e in engines.items()}
    scratch: dict = {}

    def generate(name):
        return lambda: engines[name].generate(labels, steps[name], cfg_scale=args.cfg, seed=0)

    def products(name):
        in_group, after, side_by_side = work[name]

        def run():
            torch.set_num_threads(1 if side_by_side else threads)
            try:
                run_products(in_group, scratch)
            finally:
                torch.set_num_threads(threads)
            run_products(after, scratch)
        return run

    timed = {f"{kind} {name}": (generate if kind == "generation" else products)(name)
             for kind in ("generation", "products") for name in engines}
    for fn in timed.values():  # warm-up
        fn()
    times = {k: [] for k in timed}
    for _ in range(args.reps):
        for k, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {}
    for name in engines:
        n_steps = config.seq_len if steps[name] is None else steps[name]
        total, prod = med[f"generation {name}"], med[f"products {name}"]
        result[name] = dict(steps=n_steps, generation_ms=total, products_ms=prod, gflop=flops[name] / 1e9,
                            rest_per_step_ms=(total - prod) / n_steps)
    a, r = result["arpg"], result["raster"]
    result["ratio"] = r["generation_ms"] / a["generation_ms"]
    result["ratio_ends"] = None  # no bracket where noise made a rest negative
    if min(a["rest_per_step_ms"], r["rest_per_step_ms"]) > 0:
        rest = r["steps"] * r["rest_per_step_ms"] / (a["steps"] * a["rest_per_step_ms"])
        result["ratio_ends"] = tuple(sorted((r["products_ms"] / a["products_ms"], rest)))
    # T = P + W + S f: W the work per row outside the products (the same rows for both), f a fixed cost per step
    # (the same engine: about the same for both). target <= T_r / T_a needs f >= (target P_a - P_r + (target - 1)
    # W) / (S_r - target S_a), at least its W = 0 value, if S_r > target S_a (else no f reaches it).
    gap = r["steps"] - args.target * a["steps"]
    result["fixed_ms_needed"] = ((args.target * a["products_ms"] - r["products_ms"]) / gap if gap > 0
                                 else float("inf"))

    print(f"cpu-tiny, batch {args.batch}, CFG {args.cfg:g}, {threads} threads, medians of {args.reps} "
          "interleaved rounds")
    print("| | steps | generation ms | products ms (GFLOP) | rest per step ms |")
    print("|---|---|---|---|---|")
    for name in engines:
        x = result[name]
        print(f"| {name} | {x['steps']} | {x['generation_ms']:.1f} | {x['products_ms']:.1f} ({x['gflop']:.2f}) | "
              f"{x['rest_per_step_ms']:.3f} |")
    if result["ratio_ends"] is None:
        print("ARPG / raster: the products took longer alone than in a generation (a noisy machine?): no bracket")
    else:
        lo, hi = result["ratio_ends"]
        print(f"ARPG / raster: {result['ratio']:.2f}x measured; for any time per step outside the products (both "
              f"alike) between {lo:.2f}x and {hi:.2f}x")
    need = result["fixed_ms_needed"]
    if need == float("inf"):
        print(f"ARPG / raster = {args.target:g}x: out of reach of any cost per step ({a['steps']} steps against "
              f"{r['steps']})")
    elif need <= 0:
        print(f"ARPG / raster = {args.target:g}x: the products alone lead by that much (needs no fixed cost)")
    else:
        print(f"ARPG / raster = {args.target:g}x would need a fixed cost per step (the same for both, beside every "
              f"row's work) of at least {need:.2f} ms; a whole raster step takes "
              f"{r['generation_ms'] / r['steps']:.2f} ms here")
    return result


if __name__ == "__main__":
    main()
