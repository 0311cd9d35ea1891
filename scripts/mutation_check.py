"""Do the kernel tests catch real bugs? Plant one bug at a time in a copy of the tree and run the tests.

    python3 scripts/mutation_check.py            # every mutation below; exit 1 if one survives
    python3 scripts/mutation_check.py --list
    python3 scripts/mutation_check.py -m paged-drop-key -m paged-causal-offset

Each mutation is a single textual change to one source file (a key dropped from the softmax, a causal
offset off by one, ...). The tree is copied (tracked files only) to a temporary folder, the change is
applied there, and the named tests run from that copy (the copy comes first on sys.path, so the
installed package is not what they import). The same tests first run unmutated: a mutation only
counts as caught when its tests pass without it and fail with it. The fp32 selections exist because
fp32's allowance is the loosest in ulps (see tests/kv_cases.py, `ULPS`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments
    occurrence: int = 0  # which match of `old` to change (0: the first)


PAGED = "arpg_kernels/triton/paged_attention.py"
DENSE = "arpg_kernels/triton/attention.py"
TRITON_PAGED_FP32 = ("tests/triton/test_paged_attention.py", "-k", "fp32")
TRITON_DENSE_FP32 = ("tests/triton/test_attention.py", "-k", "fp32")

MUTATIONS = [
    Mutation(
        "paged-drop-key", PAGED,
        "kv_len = tl.minimum(tl.maximum(tl.load(kv_lens + i_b), 0), max_kv)",
        "kv_len = tl.minimum(tl.maximum(tl.load(kv_lens + i_b) - 1, 0), max_kv)",
        TRITON_PAGED_FP32,
    ),
    Mutation(
        "paged-causal-offset", PAGED,
        "b_limit = kv_len - (q_len - 1 - o_i)",
        "b_limit = kv_len - (q_len - o_i)",
        TRITON_PAGED_FP32,
    ),
    Mutation(
        "paged-scale", PAGED,
        "scale * math.log2(math.e),",
        "1.0001 * scale * math.log2(math.e),",
        TRITON_PAGED_FP32,
    ),
    Mutation(
        "dense-fwd-drop-key", DENSE,
        "b_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + LK\n        full_end = LK\n",
        "b_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + LK - 1\n        full_end = LK - 1\n",
        TRITON_DENSE_FP32,
    ),
    Mutation(
        "dense-fwd-causal-offset", DENSE,
        "b_limit = o_m + (LK - LQ + 1)",
        "b_limit = o_m + (LK - LQ + 2)",
        TRITON_DENSE_FP32,
    ),
    Mutation(
        "dense-dq-causal-offset", DENSE,
        "b_limit = o_m + (LK - LQ + 1)",
        "b_limit = o_m + (LK - LQ + 2)",
        TRITON_DENSE_FP32,
        occurrence=1,
    ),
    Mutation(
        "reference-causal-offset", "arpg_kernels/reference.py",
        "limit = kv_len[:, None] - q_lens[:, None] + qi[None, :] + 1",
        "limit = kv_len[:, None] - q_lens[:, None] + qi[None, :] + 2",
        ("tests/test_ops.py",),
    ),
    Mutation(
        "attention-backward-default-scale", "arpg_kernels/ops.py",
        "ctx.causal, ctx.scale)",
        "ctx.causal, None)",
        ("tests/test_ops.py",),
    ),
    Mutation(
        "append-kv-v-dtype", "arpg_kernels/checks.py",
        'for name, t in (("k", k), ("v", v)):',
        'for name, t in (("k", k),):',
        ("tests/test_ops.py",),
    ),
    Mutation(
        "vq-raw-codebook", "arpg/vq.py",
        "            emb = F.normalize(emb, p=2, dim=-1)\n",
        "",
        ("tests/arpg/test_vq.py",),
    ),
    Mutation(
        "cfg-mix", "arpg/sampling.py",
        "return uncond + (cond - uncond) * scale",
        "return (uncond + cond) / 2 + (cond - uncond) * scale",
        ("tests/arpg/test_arpg_engine.py",),
    ),
    Mutation(
        "cuda-drop-key", "csrc/include/arpg/paged_attention.cuh",
        "Min<int64_t>(kv_len, kv_cap)",
        "Min<int64_t>(kv_len - 1, kv_cap)",
        ("tests/test_cuda_ext.py::test_kernels_under_simt_emulation",),
    ),
    Mutation(
        "cuda-causal-offset", "csrc/include/arpg/paged_attention.cuh",
        "const int64_t limit = int64_t(kv_len) - q_len + 1 + i;",
        "const int64_t limit = int64_t(kv_len) - q_len + 2 + i;",
        ("tests/test_cuda_ext.py::test_kernels_under_simt_emulation",),
    ),
]


def copy_tree(dst: Path) -> None:
    """The tracked files of the repository (as they are in the work tree) into dst."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def apply(tree: Path, m: Mutation) -> None:
    path = tree / m.path
    text = path.read_text()
    at = -1
    for _ in range(m.occurrence + 1):
        at = text.find(m.old, at + 1)
        if at < 0:
            raise SystemExit(f"mutation {m.name}: {m.old!r} (match {m.occurrence}) not found in {m.path}")
    path.write_text(text[:at] + m.new + text[at + len(m.old):])


def run_tests(tree: Path, tests: tuple[str, ...], timeout: int) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'error' | 'timeout', seconds, the last lines of pytest's output)."""
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.strip().splitlines()[-3:])
    # Exit 1 is "tests failed"; anything else (collection or import errors) is not a caught bug.
    status = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    return status, time.perf_counter() - t0, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--mutation", action="append", choices=[m.name for m in MUTATIONS],
                        help="run only this mutation (repeatable; default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run (default 1200)")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.path}: {m.old.strip()!r} -> {m.new.strip()!r}; tests {' '.join(m.tests)}")
        return 0
    chosen = [m for m in MUTATIONS if not args.mutation or m.name in args.mutation]
    survived = 0
    with tempfile.TemporaryDirectory(prefix="arpg-mutation-") as tmp:
        base = Path(tmp) / "base"
        copy_tree(base)
        for tests in dict.fromkeys(m.tests for m in chosen):
            status, secs, tail = run_tests(base, tests, args.timeout)
            print(f"baseline {' '.join(tests)}: {status} ({secs:.0f} s)", flush=True)
            if status != "passed":
                print(tail)
                return 2
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(base, tree)
            apply(tree, m)
            status, secs, tail = run_tests(tree, m.tests, args.timeout)
            caught = status == "failed"
            survived += not caught
            first = next((line for line in tail.splitlines() if line.startswith("FAILED")), tail.splitlines()[-1] if tail else "")
            print(f"{'caught  ' if caught else 'SURVIVED'} {m.name} ({status}, {secs:.0f} s): {first}", flush=True)
            shutil.rmtree(tree)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
