"""scripts/compile_gates.py: the ptxas report parser, the limits it enforces, and one real compile-only run."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compile_gates", ROOT / "scripts" / "compile_gates.py")
gates = importlib.util.module_from_spec(spec)
sys.modules["compile_gates"] = gates  # dataclasses look their module up there
spec.loader.exec_module(gates)

PTXAS_V = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_paged_attention_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _paged_attention_fwd_kernel
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, 1024 bytes smem, 560 bytes cmem[0]
ptxas info    : Compiling entry function '_merge' for 'sm_90a'
ptxas info    : Function properties for _merge
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, 544 bytes cmem[0]
"""


def test_ptxas_report_parses_registers_spills_and_shared_memory():
    report = gates._ptxas_report(PTXAS_V)
    assert report == {"_paged_attention_fwd_kernel": (255, 16, 1024), "_merge": (32, 0, 0)}


def test_row_limits_and_occupancy():
    ok = gates.Row("triton", "k", "", 90, threads=128, registers=128, spill_bytes=0, smem_bytes=40 * 1024)
    assert ok.problems() == []
    assert ok.ctas_per_sm() == 4  # 128 regs x 128 threads = 16K of the 64K register file
    spills = gates.Row("triton", "k", "", 90, threads=128, registers=255, spill_bytes=16, smem_bytes=0)
    assert spills.problems() == ["spills 16 B"]
    big = gates.Row("cuda", "k", "", 80, threads=128, registers=64, spill_bytes=0, smem_bytes=200 * 1024)
    assert big.problems() == [f"shared memory {200 * 1024} B > {163 * 1024} B"]  # A100: 163 KB a CTA


def test_compile_only_run_writes_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile_gates.py"), "--only", "triton", "--arch", "90",
         "--cases", "^merge bfloat16 D=64$", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if run.returncode == 2 and "no ptxas" in run.stdout:
        pytest.skip("Triton's ptxas is not available")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert {r["kernel"] for r in rows} == {"_merge_states_kernel", "_combine_splits_kernel"}
    for r in rows:
        assert r["arch"] == "sm_90" and int(r["registers"]) > 0 and r["problems"] == ""


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_gates.py"), "--only", "triton"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "TRITON_INTERPRET=1 is set" in run.stderr
