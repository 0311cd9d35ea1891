"""The benchmark harness: time-budgeted timings, where `arpg-bench` writes, the summary's numbers and the
plots; and it runs end to end on a tiny grid, leaving a CSV, plots and a summary."""

import csv
import json
import time

import pytest
import torch

import arpg_kernels as ak
import arpg_kernels.cpu  # noqa: F401

from arpg.config import ARPGConfig
from arpg.bench import generation, kernels, plot, run
from arpg.bench.common import FIELDS, Budget, Record, fmt, read_rows, time_fn, timing


def test_time_fn_rotates_inputs_and_reports_quantiles():
    seen = []
    t = time_fn(lambda x: seen.append(x), [(1,), (2,), (3,)], warmup=2, budget=Budget(0, 0, min_reps=7, max_reps=7))
    assert seen[2:] == [1, 2, 3, 1, 2, 3, 1]
    assert t.n == 7 and t.q20 <= t.median <= t.q80 and t.spread >= 0


@pytest.mark.parametrize("work", [0.0, 0.01], ids=["fast", "10ms"])
def test_time_fn_takes_the_minimum_time_and_samples(work):
    budget = Budget(min_time_s=0.05, max_time_s=0.2, min_reps=5)
    t0 = time.perf_counter()
    t = time_fn(lambda: time.sleep(work) if work else sum(range(100)), budget=budget, warmup=1)
    wall = time.perf_counter() - t0
    assert t.n >= budget.min_reps and wall >= budget.min_time_s
    assert wall < 1.0  # stopped by the stable median or max_time_s, not run on
    if not work:
        assert t.n > 50  # the minimum time, not the minimum samples, bounded a fast call
    assert 0 <= t.spread < float("inf")


def test_budget_stops_on_a_stable_median_or_the_time_limit():
    b = Budget(min_time_s=0.1, max_time_s=1.0, min_reps=5)
    assert not b.done([1.0] * 4, 10.0)  # too few samples, however long
    assert not b.done([1.0] * 5, 0.05)  # too little time
    assert b.done([1.0] * 5, 0.2)
    drifting = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # the newer half's median is 2, all of them 1.5
    assert not b.done(drifting, 0.5) and b.done(drifting, 1.0)


def test_timing_spread_is_the_interquartile_range_over_the_median():
    t = timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.n) == (3.0, 5) and t.spread == pytest.approx(2 / 3)


def test_fmt_gives_three_significant_digits():
    assert fmt(0.0123) == "0.0123" and fmt(0.00045678) == "0.000457"
    assert fmt(28.26) == "28.3" and fmt(3.0) == "3"
    assert fmt(999.7) == "1000" and fmt(123456.7) == "123457"


def test_default_out_is_a_new_folder_under_arpg_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "run", lambda record, device, quick, progress_factory=None: None)
    run.main(["--device", "cpu", "--only", "kernels"])
    (out,) = (tmp_path / "arpg-results").iterdir()
    assert out.name.startswith("bench-cpu-")
    assert {"results.csv", "summary.md"} <= {p.name for p in out.iterdir()}
    assert f"results in {out.relative_to(tmp_path)}/" in capsys.readouterr().out


def test_gen_seconds_sets_the_generation_budget(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(generation, "bench_generation",
                        lambda record, device, grid, dtype, budget, progress=None: seen.append(budget) or [])
    monkeypatch.setattr(generation, "profile_engine_step", lambda *args: None)
    run.main(["--device", "cpu", "--only", "generation", "--gen-seconds", "7.5", "--out", str(tmp_path / "a")])
    assert seen[-1].min_time_s == 7.5 and seen[-1].max_time_s >= 7.5
    run.main(["--device", "cpu", "--only", "generation", "--out", str(tmp_path / "b")])
    assert seen[-1] == generation.GENERATION_BUDGET
    with pytest.raises(SystemExit):
        run.main(["--device", "cpu", "--only", "generation", "--gen-seconds", "0", "--out", str(tmp_path / "c")])


def _rows(tmp_path, bandwidth_batches, copy_gbs=12.0, spread=0.01, load=0.0):
    record = Record(tmp_path / "results.csv", "cpu")
    record.add("process", "load", "start", {"cpus": 2}, "loadavg_1min", "load", load)
    record.add("kernels", "copy", "torch", {}, "bandwidth", "GB/s", copy_gbs)
    for batch in bandwidth_batches:
        cfg = dict(heads=16, head_dim=64, kv_len=257, q_per_seq=1, batch=batch, page_size=16, dtype="float32")
        record.add("kernels", "paged_attention", "arpg-reference", cfg, "latency", "ms", 28.0, 27.0, 30.0, 9, spread)
        record.add("kernels", "paged_attention", "arpg-reference", cfg, "bandwidth", "GB/s", 0.0123, n=9, spread=spread)
        record.add("kernels", "paged_attention", "arpg-reference", cfg, "bandwidth_fraction", "ratio", 0.001)
    gen = dict(model="cpu-tiny", steps=32, batch=1, cfg_scale=4.0, dtype="float32", weights_mib=4.1, decode_steps=32)
    record.add("generation", "generate", "arpg-engine", gen, "images_per_s", "img/s", 2.6, 2.5, 2.7, 3, spread)
    record.add("generation", "generate", "arpg-engine", gen, "kv_cache_memory", "MiB", 1.6)
    return record.rows


def test_bandwidth_plot_has_the_copy_line_and_no_log_axis_for_one_x(tmp_path):
    ax = plot.make_figures(_rows(tmp_path, [4]))["paged_attention_bandwidth.png"].axes[0]
    assert ax.get_xscale() == "linear"
    (ref,) = [line for line in ax.get_lines() if line.get_label().startswith("measured copy bandwidth")]
    assert ref.get_label() == "measured copy bandwidth 12 GB/s" and list(ref.get_ydata()) == [12.0, 12.0]
    assert ax.get_legend() is not None
    two = plot.make_figures(_rows(tmp_path / "two", [4, 16]))["paged_attention_bandwidth.png"].axes[0]
    assert two.get_xscale() == "log"


def test_summary_shows_small_numbers_separate_memory_columns_and_warnings(tmp_path):
    quiet = plot.summary_markdown(_rows(tmp_path, [4]))
    assert "| 0.0123 |" in quiet and "0.1%" in quiet  # GB/s and fraction of copy bandwidth, not "0"
    assert "| GPU peak MiB | CPU K/V MiB |" in quiet and "| - | 1.6 |" in quiet
    assert "## Warnings" not in quiet
    assert plot.run_warnings(_rows(tmp_path / "quiet", [4])) == []
    noisy = _rows(tmp_path / "noisy", [4], spread=0.25, load=5.0)
    warnings = plot.run_warnings(noisy)
    assert len(warnings) == 2 and "machine loaded" in warnings[0] and "above its 2 CPUs" in warnings[0]
    assert "arpg-reference" in warnings[1] and "batch=4" in warnings[1] and "25%" in warnings[1]
    assert "## Warnings" in plot.summary_markdown(noisy)


def test_record_rewrites_an_older_header(tmp_path):
    path = tmp_path / "results.csv"
    old = [f for f in FIELDS if f != "spread"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({k: "x" for k in old})
    Record(path, "cpu").add("kernels", "copy", "torch", {}, "bandwidth", "GB/s", 1.0)
    rows = read_rows(path)
    assert list(rows[0]) == FIELDS and rows[0]["spread"] == "" and rows[0]["median"] == "x"
    assert rows[1]["median"] == "1.0"


def test_generation_and_kernel_benchmarks_write_a_record(tmp_path, monkeypatch):
    monkeypatch.setattr(
        generation, "CPU_CONFIG",
        ARPGConfig(dim=32, n_layer=2, n_head=1, vocab_size=16, num_classes=4, grid_size=4, ffn_multiple_of=32),
    )
    record = Record(tmp_path / "results.csv", "cpu")
    summaries = generation.bench_generation(
        record, torch.device("cpu"), dict(models=["cpu-tiny"], steps=[4], batches=[2]), torch.float32,
        budget=Budget(0, 0, min_reps=2),
    )
    (s,) = summaries
    assert s["engine_vs_eager"] > 0 and s["arpg_vs_raster"] > 0 and s["fused_vs_unfused"] > 0
    assert s["whole_step_vs_op_by_op"] > 0 and s["arpg-engine-op-by-op"]["images_per_s"] > 0
    assert s["head_guidance_vs_logit_guidance"] > 0 and s["arpg-engine-logit-guidance"]["images_per_s"] > 0
    assert s["thread_groups_vs_one_group"] > 0 and s["arpg-engine-one-group"]["images_per_s"] > 0
    assert s["generation_op_vs_step_calls"] > 0 and s["arpg-engine-step-calls"]["images_per_s"] > 0
    assert s["arpg-engine"]["kv_cache_memory"] > 0 and s["arpg-engine"]["spread"] >= 0
    parts = generation.profile_engine_step(record, torch.device("cpu"), "cpu-tiny", 2, 4, torch.float32)
    # Every part was seen, none is negative, and the parts add up to the profiled wall time.
    assert all(parts[p] > 0 for p in ("attention", "projections", "other_model_ops", "sampling"))
    assert all(parts[p] >= 0 for p in plot.STEP_PARTS) and parts["unprofiled_step"] > 0
    assert sum(parts[p] for p in plot.STEP_PARTS) >= 0.999 * parts["profiled_step"]
    grid = dict(heads=[2], head_dim=[32], kv_len=[17], q_per_seq=[3], batch=[2], page_size=[16])
    budget = Budget(0, 0, min_reps=2)
    kernels.bench_paged(record, torch.device("cpu"), grid, torch.float32, bandwidth=1e10, budget=budget)
    kernels.bench_sampling(record, torch.device("cpu"), dict(shapes=[(3, 50)], settings=[(1.0, 5, 0.9), (1.0, 0, 1.0)]),
                           budget=budget)
    rows = read_rows(tmp_path / "results.csv")
    sampling = {r["provider"] for r in rows if r["name"] == "sample_tokens" and r["metric"] == "latency"}
    assert sampling == {"torch-ops", "arpg-cpu" if ak.cpu.is_available() else "arpg-reference"}
    assert list(rows[0]) == FIELDS
    providers = {r["provider"] for r in rows if r["bench"] == "kernels"}
    assert {"arpg-reference", "sdpa-gathered"} <= providers
    metrics = {r["metric"] for r in rows}
    assert {"latency", "images_per_s", "ms_per_step", "kv_cache_memory", "ratio_engine/eager", "ratio_arpg/raster",
            "ratio_fused/unfused", "ratio_whole-step/op-by-op", "ratio_head-guidance/logit-guidance",
            "ratio_thread-groups/one-group", "ratio_generation-op/step-calls",
            "bandwidth", "bandwidth_fraction", "ms_attention", "ms_sampling"} <= metrics
    assert all(json.loads(r["config"]) is not None and r["device"] for r in rows)
    assert all(int(r["n"]) >= 2 and float(r["spread"]) >= 0 for r in rows if r["metric"] == "latency")

    made = plot.make_plots(rows, tmp_path)
    assert made and all(p.stat().st_size > 0 for p in made)
    summary = plot.summary_markdown(rows)
    assert "| cpu-tiny | 4 | 2 | arpg-engine |" in summary and "engine/eager" in summary
    assert "Engine step, host ms per step by part" in summary and "| cpu-tiny | 4 | 2 |" in summary
    assert "| sample_tokens | torch-ops |" in summary


def test_summary_has_paged_speedups_with_geometric_mean_and_minimum(tmp_path):
    record = Record(tmp_path / "results.csv", "cpu")
    for batch, ours, gathered in ((4, 1.0, 2.0), (16, 4.0, 2.0)):  # 2x and 0.5x: geomean 1x, minimum 0.5x
        cfg = dict(heads=16, head_dim=64, kv_len=257, q_per_seq=16, batch=batch, page_size=16, dtype="bfloat16")
        record.add("kernels", "paged_attention", "arpg-cpu", cfg, "latency", "ms", ours, ours, ours, 5, 0.01)
        record.add("kernels", "paged_attention", "gather+sdpa", cfg, "latency", "ms", gathered, gathered, gathered, 5, 0.01)
    summary = plot.summary_markdown(record.rows)
    assert "| config | dtype | arpg-cpu vs gather+sdpa |" in summary
    assert "| bfloat16 | 2x |" in summary and "| bfloat16 | 0.5x |" in summary
    assert "| geometric mean | | 1x |" in summary and "| minimum | | 0.5x |" in summary


def test_serving_benchmark_writes_a_record(tmp_path, monkeypatch):
    from arpg.bench import serving

    monkeypatch.setattr(
        generation, "CPU_CONFIG",
        ARPGConfig(dim=32, n_layer=2, n_head=1, vocab_size=16, num_classes=4, grid_size=4, ffn_multiple_of=32),
    )
    record = Record(tmp_path / "results.csv", "cpu")
    stream = dict(model="cpu-tiny", requests=6, max_images=3, steps=[2, 4], max_rows=8, rounds=2)
    s = serving.bench_serving(record, torch.device("cpu"), torch.float32, stream)
    for provider in ("sequential", "queue"):
        m = s[provider]
        assert m["images_per_s"] > 0 and 0 < m["p50_s"] <= m["p95_s"] and m["kv_cache_memory"] > 0
    assert s["queue_vs_sequential"] > 0 and s["config"]["rate_per_s"] > 0
    rows = read_rows(tmp_path / "results.csv")
    assert {r["metric"] for r in rows} == {"images_per_s", "latency_p50", "latency_p95", "kv_cache_memory",
                                            "ratio_queue/sequential"}
    summary = plot.summary_markdown(rows)
    assert "## Serving" in summary and "| queue |" in summary and "queue / sequential images/s" in summary
    # The latencies of one server taking requests in arrival order, from service times alone.
    lat, span = serving._sequential_latencies([1.0, 1.0, 0.5], [0.0, 0.5, 5.0])
    assert lat == [1.0, 1.5, 0.5] and span == 5.5


def test_training_benchmark_writes_a_record(tmp_path, monkeypatch):
    from arpg.bench import training

    monkeypatch.setattr(
        generation, "CPU_CONFIG",
        ARPGConfig(dim=32, n_layer=2, n_head=1, vocab_size=16, num_classes=4, grid_size=4, ffn_multiple_of=32),
    )
    record = Record(tmp_path / "results.csv", "cpu")
    out = training.bench_training(record, torch.device("cpu"), dict(model="cpu-tiny", batch=4, steps=6, warmup=2,
                                                                    compile=[False]))
    assert out[0]["tokens_per_s"] > 0 and out[0]["peak_mib"] > 0
    rows = read_rows(tmp_path / "results.csv")
    assert {r["metric"] for r in rows} == {"tokens_per_s", "images_per_s", "peak_mib"}
    assert {int(json.loads(r["config"])["steps"]) for r in rows} == {4}  # the warm-up's 2 steps left out
    summary = plot.summary_markdown(rows)
    assert "## Training" in summary and "| arpg.train |" in summary


def test_bound_counts_every_product_once_and_groups_as_the_op_does():
    from arpg.bench.bound import product_work
    from arpg.engine import generation_plans
    from arpg.model import ARPG
    from arpg.raster import RasterLM

    cfg = ARPGConfig(dim=32, n_layer=2, n_head=1, vocab_size=16, num_classes=4, grid_size=4, ffn_multiple_of=32)
    arpg, raster = ARPG(cfg), RasterLM(cfg)
    numel = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
    flop = lambda work: sum(2 * w.numel() * r for w, r in work)  # noqa: E731
    def plans(model, b, steps):
        return generation_plans(model, b, steps, "arccos", 1.0, "constant", None, None)

    # Raster feeds the class token and every token but the last, one row each through every layer and the head.
    work, after, side = product_work(raster, plans(raster, 3, None), 1, guided=False)
    assert flop(work) == 2 * 3 * cfg.seq_len * numel(raster) and after == [] and not side
    # ARPG in one step: the class token through the self layers and the shared K/V, every query through the rest.
    fed = numel(arpg.layers.self_dec) + arpg.layers.to_k.weight.numel() + arpg.layers.to_v.weight.numel()
    work, _, _ = product_work(arpg, plans(arpg, 3, 1), 1, guided=False)
    assert flop(work) == 2 * 3 * (fed + cfg.seq_len * (numel(arpg.layers.cross_dec) + arpg.head.weight.numel()))
    # Guided, two groups of whole pairs: the largest holds 2 of 3 pairs (4 sequences) and heads 2 samples' rows.
    work, after, side = product_work(raster, plans(raster, 3, None), 2, guided=True)
    assert side and after == [] and {r for w, r in work if w is raster.head.weight} == {2}
    assert {r for w, r in work if w is not raster.head.weight} == {4}
    # One sample guided: its two sequences in two groups, the head after them; unguided it is one group.
    work, after, side = product_work(raster, plans(raster, 1, None), 2, guided=True)
    assert side and {r for _, r in work} == {1} and len(after) == cfg.seq_len
    assert not product_work(raster, plans(raster, 1, None), 2, guided=False)[2]


def test_bound_runs_and_brackets_the_measured_ratio(monkeypatch, capsys):
    from arpg.bench import bound

    monkeypatch.setattr(
        generation, "CPU_CONFIG",
        ARPGConfig(dim=32, n_layer=2, n_head=1, vocab_size=16, num_classes=4, grid_size=4, ffn_multiple_of=32),
    )
    out = bound.main(["--batch", "2", "--steps", "8", "--reps", "1"])
    assert out["arpg"]["steps"] == 8 and out["raster"]["steps"] == 16
    assert all(out[n]["generation_ms"] > 0 and out[n]["products_ms"] > 0 and out[n]["gflop"] > 0
               for n in ("arpg", "raster"))
    if out["ratio_ends"] is not None:  # a mediant lies between its ends
        lo, hi = out["ratio_ends"]
        assert lo <= out["ratio"] <= hi
    assert out["fixed_ms_needed"] == float("inf")  # 16 raster steps against 3.5 x 8: no fixed cost reaches it
    text = capsys.readouterr().out
    assert "| arpg | 8 |" in text and "out of reach of any cost per step" in text
    out = bound.main(["--batch", "2", "--steps", "8", "--reps", "1", "--target", "1.5"])
    a, r = out["arpg"], out["raster"]
    assert out["fixed_ms_needed"] == pytest.approx((1.5 * a["products_ms"] - r["products_ms"]) / (16 - 1.5 * 8))
    for bad in (["--batch", "0"], ["--target", "1"]):
        with pytest.raises(SystemExit):
            bound.main(bad)
