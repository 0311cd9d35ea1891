"""csrc/tests/cpu_kernel_tests.cpp: the torch-free CPU kernel headers against double-precision loops.

The program needs only a C++17 compiler (no torch, no CUDA). It is built twice, optimized as the
extension is (-O2 -ffp-contract=fast), and with AddressSanitizer and UndefinedBehaviorSanitizer, which
turn an out-of-bounds read of a page, a q row or an output row into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCE = CSRC / "tests" / "cpu_kernel_tests.cpp"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
VARIANTS = {
    "optimized": ["-O2", "-ffp-contract=fast"],
    "sanitizers": ["-O1", "-g", *SANITIZE],
}


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _traced() -> bool:
    """LeakSanitizer cannot run under ptrace (gdb, strace, some sandboxes)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in status.splitlines())


def _sanitizer_env() -> dict[str, str]:
    env = dict(os.environ)
    asan = ["abort_on_error=0"] + (["detect_leaks=0"] if _traced() else [])
    env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS", ""), *asan]))
    env["UBSAN_OPTIONS"] = ":".join(filter(None, [env.get("UBSAN_OPTIONS", ""), "print_stacktrace=1"]))
    return env


def _sanitizers_work(cxx: str, tmp_path: Path) -> str | None:
    """None if a trivial program builds and runs with the sanitizers, else why not."""
    src, exe = tmp_path / "probe.cpp", tmp_path / "probe"
    src.write_text("#include <vector>\nint main() { std::vector<int> v(3, 1); return v[2] - 1; }\n")
    build = subprocess.run([cxx, *SANITIZE, str(src), "-o", str(exe)], capture_output=True, text=True, timeout=120)
    if build.returncode != 0:
        return f"{cxx} cannot build with {' '.join(SANITIZE)}: {build.stderr.strip()[-300:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=_sanitizer_env())
    if run.returncode != 0:
        return f"a sanitized program does not run here (rc {run.returncode}): {run.stderr.strip()[-300:]}"
    return None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_kernels_against_double_precision_loops(variant, tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("needs a C++ compiler (g++ or c++ on PATH)")
    env = None
    if variant == "sanitizers":
        reason = _sanitizers_work(cxx, tmp_path)
        if reason is not None:
            pytest.skip(reason)
        env = _sanitizer_env()
    exe = tmp_path / f"arpg_cpu_kernel_tests_{variant}"
    build = subprocess.run(
        [cxx, "-std=c++17", *VARIANTS[variant], "-Wno-psabi", f"-I{CSRC / 'include'}", str(SOURCE), "-o", str(exe)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, f"rc {run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-4000:]}"
    assert "cases passed" in run.stdout, run.stdout[-2000:]
