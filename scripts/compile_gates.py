"""Compile-time gates, no GPU needed: every kernel configuration compiled for sm_90 and sm_80, its
registers, spills and shared memory read off ptxas, the table written, any spill or over-limit shared
memory a failure.

Triton: the package's own launchers run on CPU tensors with Triton's driver replaced by one that only
compiles (for the target architecture) and never launches, so the kernels compiled are exactly the ones
a GPU would get for those inputs; autotuned kernels compile every config of their autotuner. The inputs
sweep what the launchers choose from (head_dim, dtype, the paged kernel's row blocks, split and causal
variants, the sampler's guided and greedy forms). ptxas (Triton's bundled copy) reports registers and
spills of each kernel's PTX.
CUDA: every instantiation in csrc/cuda/*_kernels.cu through `nvcc -Xptxas -v` (skipped, and said so,
without nvcc); dynamic shared memory is the kernels' own constant, printed by a host-only program
compiled from the headers.

    python3 scripts/compile_gates.py [--arch 90,80] [--out benchmarks/results/compile] [--only triton|cuda]

Exit status 1 when any kernel spills or needs more shared memory than the architecture has.
CTAs/SM: min over the register file (64K), the thread limit (2048), the CTA limit (32) and shared memory.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Shared memory a CTA can have (opt-in maximum) and per SM, bytes: sm_80 (A100) and sm_90 (H100/H200).
SMEM_PER_CTA = {80: 163 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM, THREADS_PER_SM, CTAS_PER_SM = 65536, 2048, 32


@dataclass
class Row:
    backend: str
    kernel: str
    config: str
    arch: int
    threads: int
    registers: int
    spill_bytes: int
    smem_bytes: int

    def ctas_per_sm(self) -> int:
        regs = self.registers * self.threads
        # Registers are allocated per warp in units of 256.
        per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = REGS_PER_SM // (per_warp * (self.threads // 32)) if regs else CTAS_PER_SM
        by_smem = SMEM_PER_SM[self.arch] // (self.smem_bytes + 1024) if self.smem_bytes else CTAS_PER_SM
        return min(by_regs, THREADS_PER_SM // self.threads, CTAS_PER_SM, by_smem)

    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.smem_bytes > SMEM_PER_CTA[self.arch]:
            out.append(f"shared memory {self.smem_bytes} B > {SMEM_PER_CTA[self.arch]} B")
        return out


def _ptxas_report(text: str) -> dict[str, tuple[int, int, int]]:
    """{function: (registers, spill store + load bytes, static shared bytes)} from ptxas -v output."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            out.setdefault(current, [0, 0, 0])
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current][1] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current][0] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            out[current][2] = int(m.group(1)) if m else 0
    return {k: tuple(v) for k, v in out.items()}


# --- Triton ---------------------------------------------------------------------------------------

def _install_compile_only_driver(arch: int):
    """Make every @triton.jit launch compile for sm_<arch> and return without launching; returns the
    list the compiled kernels are appended to, as (kernel name, CompiledKernel)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    if getattr(JITFunction, "_arpg_arch", arch) != arch:
        # JITFunction caches its target per device on first use: a second arch needs a fresh process.
        raise RuntimeError(f"compile_gates: this process compiled for sm_{JITFunction._arpg_arch} already")
    JITFunction._arpg_arch = arch
    driver.set_active(CompileOnlyDriver())
    compiled: list = []
    if not hasattr(JITFunction, "_arpg_original_run"):
        JITFunction._arpg_original_run = JITFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            kernel = JITFunction._arpg_original_run(self, *args, grid=grid, warmup=True, **kwargs)
            consts = {k: v for k, v in kwargs.items() if k.isupper() and k not in ("INTERP_BF16",)}
            JITFunction._arpg_sink.append((self.fn.__name__, kernel, consts))
            return kernel

        def autotune_all(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))
            for config in self.prune_configs(kwargs):  # what a GPU's autotuner would compile and time
                self.fn.run(*args, **kwargs, **config.all_kwargs())

        JITFunction.run = run
        Autotuner.run = autotune_all
    JITFunction._arpg_sink = compiled
    return compiled


def _triton_cases():
    """(description, thunk) pairs: each thunk calls a launcher on CPU tensors."""
    import torch

    import arpg_kernels.triton as tk
    from arpg_kernels.triton.merge import combine_splits

    g = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dn = str(dtype).replace("torch.", "")
        for d in (64, 128):
            for rows in (16, 32, 64):  # the paged kernel's BLOCK_M choices (q_len x group rounded up)
                for causal, split, lse in ((False, 1, False), (True, 4, True)):
                    def paged(dtype=dtype, d=d, rows=rows, causal=causal, split=split, lse=lse):
                        b, hkv, group, page = 2, 2, 2, 16
                        q_len = rows // group
                        kc = torch.randn(32, page, hkv, d).to(dtype)  # 256 keys a sequence: room for 4 splits
                        q = torch.randn(b * q_len, hkv * group, d).to(dtype)
                        table = torch.arange(32, dtype=torch.int32).view(b, 16)
                        lens = torch.full((b,), 256, dtype=torch.int32)
                        cu = torch.arange(b + 1, dtype=torch.int32) * q_len
                        tk.paged_attention(q, kc, kc.clone(), table, lens, cu, q_len, causal, d ** -0.5, lse,
                                           num_splits=split)
                    cases.append((f"paged_attention {dn} D={d} rows={rows} causal={causal} splits={split}", paged))
            t, h = 4, 16

            def merge(dtype=dtype, d=d):
                a, b_ = (torch.randn(t, h, d).to(dtype) for _ in range(2))
                la, lb = (torch.randn(t, h) for _ in range(2))
                tk.merge_attention_states(a, la, b_, lb)
                combine_splits(torch.randn(4, t, h, d), torch.randn(4, t, h), torch.empty(t, h, d, dtype=dtype),
                               torch.empty(t, h))
            cases.append((f"merge {dn} D={d}", merge))

            def append(dtype=dtype, d=d):
                k = torch.randn(t, 4, d).to(dtype)
                cache = torch.zeros(2, 16, 4, d, dtype=dtype)
                slots = torch.arange(t, dtype=torch.int64)
                tk.append_kv(k, k, cache, cache.clone(), slots)
                rope = torch.randn(t, d // 2, 2)
                tk.append_kv_rope(k, k, cache, cache.clone(), slots, rope)
            cases.append((f"append_kv(+rope) {dn} D={d}", append))
            if dtype != torch.float16:
                def dense(dtype=dtype, d=d):
                    q = torch.randn(1, 64, 4, d).to(dtype)
                    k = torch.randn(1, 64, 2, d).to(dtype)
                    out, lse = tk.attention_forward(q, k, k, True, d ** -0.5)
                    tk.attention_backward(out, torch.zeros_like(lse), q, k, k, out, lse, True, d ** -0.5)
                cases.append((f"attention fwd+bwd {dn} D={d} causal", dense))
    for cfg in (True, False):
        for greedy in (False, True):
            def sample(cfg=cfg, greedy=greedy):
                logits = torch.randn(2, 16384, generator=g)
                tk.sample_tokens(logits, logits if cfg else None, torch.ones(2), torch.rand(2, dtype=torch.float64),
                                 0.0 if greedy else 1.0, 100, 0.9)
            cases.append((f"sample_tokens cfg={cfg} greedy={greedy}", sample))
    return cases


def _config_of(kernel, consts: dict) -> tuple[str, int]:
    """The kernel's constexpr keywords (tiles, flags) and launch shape as text, and its thread count."""
    meta = kernel.metadata
    parts = [f"{k}={v}" for k, v in sorted(consts.items())]
    parts += [f"warps={meta.num_warps}", f"stages={meta.num_stages}"]
    return " ".join(parts), 32 * meta.num_warps


def triton_rows(arch: int, ptxas: str, workdir: Path, log, cases: str | None = None) -> list[Row]:
    compiled = _install_compile_only_driver(arch)
    seen: dict[str, Row] = {}
    for desc, thunk in _triton_cases():
        if cases and not re.search(cases, desc):
            continue
        start, t0 = len(compiled), time.time()
        thunk()
        for name, kernel, consts in compiled[start:]:
            ptx = kernel.asm["ptx"]
            target = re.search(r"^\.target (\S+)", ptx, re.MULTILINE).group(1)
            path = workdir / f"{name}.ptx"
            path.write_text(ptx)
            res = subprocess.run([ptxas, "-v", f"-arch={target}", str(path), "-o", str(workdir / "k.cubin")],
                                 capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"ptxas failed on {name} ({desc}):\n{res.stderr}")
            report = _ptxas_report(res.stderr + res.stdout)
            regs, spills, static_smem = next(iter(report.values()))
            config, threads = _config_of(kernel, consts)
            config = f"{desc} | {config}"
            row = Row("triton", name, config, arch, threads, regs, spills, max(kernel.metadata.shared, static_smem))
            seen[f"{name}|{config}"] = row
        log(f"  sm_{arch} {desc}: {len(compiled) - start} kernels, {time.time() - t0:.1f} s")
    return list(seen.values())


# --- CUDA -----------------------------------------------------------------------------------------

_PROBE = r"""
#include <cstdio>
#include "arpg/append_kv.cuh"
#include "arpg/merge_states.cuh"
#include "arpg/paged_attention.cuh"
int main() {
  using namespace arpg::detail;
  std::printf("PagedAttentionKernel 64 %d %zu\n", PagedAttentionTile<64>::kThreads, PagedAttentionTile<64>::kSmemBytes);
  std::printf("PagedAttentionKernel 128 %d %zu\n", PagedAttentionTile<128>::kThreads, PagedAttentionTile<128>::kSmemBytes);
  std::printf("MergeSplitsKernel 0 %d 0\n", kMergeThreads);
  std::printf("AppendKVKernel 0 %d 0\n", kAppendThreads);
  std::printf("MergeStatesKernel 0 %d 0\n", kMergeStatesThreads);
  return 0;
}
"""


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def cuda_rows(arch: int, nvcc: str, workdir: Path, log) -> list[Row]:
    inc = ROOT / "csrc" / "include"
    probe = workdir / "probe.cu"
    probe.write_text(_PROBE)
    exe = workdir / "probe"
    subprocess.run([nvcc, "-std=c++17", f"-I{inc}", str(probe), "-o", str(exe)], check=True, capture_output=True)
    launch = {}  # (kernel, head_dim or 0) -> (threads, dynamic shared bytes), as the launchers use them
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        name, d, threads, smem = line.split()
        launch[(name, int(d))] = (int(threads), int(smem))
    rows = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*_kernels.cu")):
        res = subprocess.run(
            [nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", f"-I{inc}", f"-I{ROOT / 'csrc' / 'cuda'}",
             "-c", str(cu), "-o", str(workdir / "k.o")],
            capture_output=True, text=True,
        )
        if res.returncode:
            raise RuntimeError(f"nvcc failed on {cu.name}:\n{res.stderr[-3000:]}")
        report = _ptxas_report(res.stderr)
        names = _demangle(list(report))
        for mangled, (regs, spills, smem) in report.items():
            pretty = names[mangled]
            kernel = pretty.split("(")[0].split("<")[0].split("::")[-1].replace("void ", "")
            m = re.search(r"<([^>]*)>", pretty)
            config = m.group(1) if m else ""
            d = int(config.rsplit(",", 1)[-1]) if kernel == "PagedAttentionKernel" else 0
            if (kernel, d) not in launch:
                raise RuntimeError(f"compile_gates: no launch constants for {pretty}: extend _PROBE")
            threads, dynamic = launch[(kernel, d)]
            rows.append(Row("cuda", kernel, f"{cu.name} <{config}>", arch, threads, regs, spills, smem + dynamic))
        log(f"  sm_{arch} {cu.name}: {len(report)} kernels")
    return rows


def _find_tools() -> tuple[str | None, str | None]:
    """(ptxas for Triton's PTX: Triton's bundled copy, else one on PATH; nvcc or None)."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptxas = str(ptxas) if ptxas.is_file() else shutil.which("ptxas")
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.is_file() else None
    return ptxas, nvcc


def _task(task: tuple[str, int, str | None]) -> tuple[list[Row], list[str]]:
    """One (backend, arch) in its own process (the compile-only driver is per process): rows, log lines."""
    backend, arch, cases = task
    lines: list[str] = []
    ptxas, nvcc = _find_tools()
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "triton":
            rows = triton_rows(arch, ptxas, Path(tmp), lines.append, cases)
        else:
            rows = cuda_rows(arch, nvcc, Path(tmp), lines.append)
    return rows, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile")
    parser.add_argument("--only", choices=["triton", "cuda"], default=None)
    parser.add_argument("--cases", default=None, help="regular expression: only the Triton cases it matches")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes, one (backend, arch) each (default: the CPU count)")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch {args.arch!r}: give compute capabilities such as 90,80")
    unknown = [a for a in archs if a not in SMEM_PER_CTA]
    if unknown:
        parser.error(f"--arch {unknown}: known architectures are {sorted(SMEM_PER_CTA)}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the gates compile real kernels; unset it")
    ptxas, nvcc = _find_tools()
    tasks = []
    if args.only in (None, "triton"):
        if ptxas is None:
            print("compile_gates: no ptxas (Triton's bundled copy or on PATH): cannot gate the Triton kernels")
            return 2
        tasks += [("triton", a, args.cases) for a in archs]
    if args.only in (None, "cuda"):
        if nvcc is None:
            print("compile_gates: nvcc not found (PATH, CUDA_HOME): the CUDA kernels are not gated here")
        else:
            tasks += [("cuda", a, None) for a in archs]
    t0 = time.time()
    rows: list[Row] = []
    import multiprocessing

    # One task per process (maxtasksperchild=1): a process's Triton kernels keep the first target they saw.
    with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(tasks)), maxtasksperchild=1) as pool:
        for task, (task_rows, lines) in zip(tasks, pool.imap(_task, tasks)):
            print(f"{task[0]} sm_{task[1]}:", *lines, sep="\n  ", flush=True)
            rows += task_rows
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backend", "kernel", "config", "arch", "threads", "registers", "spill_bytes", "smem_bytes",
                    "ctas_per_sm", "problems"])
        for r in rows:
            w.writerow([r.backend, r.kernel, r.config, f"sm_{r.arch}", r.threads, r.registers, r.spill_bytes,
                        r.smem_bytes, r.ctas_per_sm(), "; ".join(r.problems())])
    bad = [r for r in rows if r.problems()]
    print(f"compile_gates: {len(rows)} kernel configurations, {len(bad)} failing, in {time.time() - t0:.0f} s; "
          f"table in {path}")
    for r in bad:
        print(f"  FAIL {r.backend} {r.kernel} sm_{r.arch} [{r.config}]: {'; '.join(r.problems())}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
