"""The benchmark harness runs end to end on a tiny grid and leaves a CSV, plots and a summary."""

import json

import torch

from arpg.config import ARPGConfig
from benchmarks import generation, kernels, plot
from benchmarks.common import FIELDS, Record, read_rows, time_fn


def test_time_fn_rotates_inputs_and_reports_quantiles():
    seen = []
    t = time_fn(lambda x: seen.append(x), [(1,), (2,), (3,)], warmup=2, rep=7)
    assert seen[2:] == [1, 2, 3, 1, 2, 3, 1]
    assert t.n == 7 and t.q20 <= t.median <= t.q80


def test_generation_and_kernel_benchmarks_write_a_record(tmp_path, monkeypatch):
    monkeypatch.setattr(
        generation, "CPU_CONFIG",
        ARPGConfig(dim=32, n_layer=2, n_head=1, vocab_size=16, num_classes=4, grid_size=4, ffn_multiple_of=32),
    )
    record = Record(tmp_path / "results.csv", "cpu")
    summaries = generation.bench_generation(
        record, torch.device("cpu"), dict(models=["cpu-tiny"], steps=[4], batches=[2]), torch.float32, repeats=1
    )
    (s,) = summaries
    assert s["engine_vs_eager"] > 0 and s["arpg_vs_raster"] > 0
    assert s["arpg-engine"]["mem_mib"] > 0
    grid = dict(heads=[2], head_dim=[32], kv_len=[17], q_per_seq=[3], batch=[2], page_size=[16])
    kernels.bench_paged(record, torch.device("cpu"), grid, torch.float32, bandwidth=1e10, rep=2)
    rows = read_rows(tmp_path / "results.csv")
    assert set(rows[0]) == set(FIELDS)
    providers = {r["provider"] for r in rows if r["bench"] == "kernels"}
    assert {"arpg-reference", "sdpa-gathered"} <= providers
    metrics = {r["metric"] for r in rows}
    assert {"latency", "images_per_s", "ms_per_step", "kv_cache_memory", "ratio_engine/eager", "ratio_arpg/raster",
            "bandwidth", "bandwidth_fraction"} <= metrics
    assert all(json.loads(r["config"]) is not None and r["device"] for r in rows)

    made = plot.make_plots(rows, tmp_path)
    assert made and all(p.stat().st_size > 0 for p in made)
    summary = plot.summary_markdown(rows)
    assert "| cpu-tiny | 4 | 2 | arpg-engine |" in summary and "engine/eager" in summary
