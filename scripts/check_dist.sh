#!/usr/bin/env bash
# The packaging check that .ci/run runs after the test suite (a CPU machine, no GPU needed):
#   1. scripts/build_wheels.sh: the sdist from a clean copy of the work tree, then from that sdist a CUDA
#      wheel (FORCE_CUDA=1) and its CPU-only sibling, against the active environment's torch;
#   2. the archives hold what they should: the sdist every kernel source, header and CMake file, README
#      and LICENSE; the wheels only arpg/, arpg_kernels/ and their metadata, no tests;
#   3. each wheel installed into a fresh virtual environment and used from outside the source tree
#      (`python -I`, another folder): the C++ ops are registered, the ops answer like the reference,
#      `arpg --help`, `arpg-bench --help`, the shipped digits model samples, `pip check` is clean,
#      nothing is imported from the source tree and Triton is not imported with the package;
#   4. under another torch (ARPG_CHECK_OTHER_TORCH, default torch==2.13.0+cpu; empty skips this step) the
#      extensions are not loaded, one warning line says why, and the reference ops answer.
# Usage: scripts/check_dist.sh   (run in an environment with torch, setuptools, wheel and ninja)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
other_torch=${ARPG_CHECK_OTHER_TORCH-torch==2.13.0+cpu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

torch_version=$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')
"$root/scripts/build_wheels.sh" --torch "$torch_version" --out "$tmp/dist" | tee "$tmp/build.log"
sdist=$(sed -n 's/^sdist: //p' "$tmp/build.log")
cuda_wheel=$(sed -n 's/^cuda wheel: //p' "$tmp/build.log")
cpu_wheel=$(sed -n 's/^cpu wheel: //p' "$tmp/build.log")

echo "+ archive contents"
python3 - "$root" "$sdist" "$cuda_wheel" "$cpu_wheel" <<'EOF'
import subprocess, sys, tarfile, zipfile
from pathlib import Path

root, sdist, cuda_wheel, cpu_wheel = sys.argv[1:]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
need = set(tracked) | {"CMakeLists.txt", "LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in",
                       "arpg_kernels/_version.py", "arpg/data/digits_arpg.safetensors"}
missing = sorted(need - names)
stray = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build.json")
               or n.startswith("benchmarks/results"))
assert not missing, f"the sdist lacks {missing}"
assert not stray, f"the sdist holds build outputs or records: {stray}"
print(f"sdist: {len(names)} files, {len(tracked)} of them under csrc/, all there")
for wheel, ext in ((cuda_wheel, {"arpg_kernels/_C.abi3.so", "arpg_kernels/_cpu.abi3.so"}),
                   (cpu_wheel, {"arpg_kernels/_cpu.abi3.so"})):
    files = zipfile.ZipFile(wheel).namelist()
    tops = sorted({f.split("/")[0] for f in files})
    assert len(tops) == 3 and tops[:2] == ["arpg", "arpg_kernels"] and tops[2].endswith(".dist-info"), tops
    tests = [f for f in files if "/tests/" in f or Path(f).name.startswith("test_") or Path(f).name == "conftest.py"]
    assert not tests, f"{wheel} holds tests: {tests}"
    have = {f for f in files if f.endswith(".so")}
    assert have == ext, f"{Path(wheel).name}: extensions {sorted(have)}, expected {sorted(ext)}"
    assert "arpg_kernels/_build.json" in files and "arpg/data/digits_arpg.safetensors" in files
    print(f"{Path(wheel).name}: {len(files)} files in {tops}, extensions {sorted(have)}, no tests")
EOF

echo "+ fresh environment with torch==$torch_version and the CUDA wheel"
python3 -m venv "$tmp/venv"
venv_py="$tmp/venv/bin/python"
"$venv_py" -m pip install -q "torch==$torch_version"
"$venv_py" -m pip install -q "$cuda_wheel"
"$venv_py" -m pip check
mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"

# python -I: no PYTHONPATH, no user site, no current folder on sys.path.
use_package() {  # $1: cuda | cpu (which wheel is installed)
    "$venv_py" -I - "$root" "$1" <<'EOF'
import sys, time

t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import arpg_kernels as ak
import arpg
t2 = time.perf_counter()
assert "triton" not in sys.modules, "importing the package imported Triton"
root, kind = sys.argv[1:]
from importlib.metadata import version
from pathlib import Path

import arpg.bench.run, arpg.digits, arpg_kernels.cpu, arpg_kernels.cuda, arpg_kernels.reference
ours = {name: Path(m.__file__).resolve() for name, m in sys.modules.items()
        if name.split(".")[0] in ("arpg", "arpg_kernels") and getattr(m, "__file__", None)}
inside = [n for n, f in ours.items() if f.is_relative_to(Path(root).resolve()) or "site-packages" not in f.parts]
assert not inside, f"imported from outside site-packages: {inside}"
assert version("arpg-kernels").split("+")[0] == ak.__version__ == arpg.__version__
tag = version("arpg-kernels").split("+")[1]
assert tag.startswith("cu" if kind == "cuda" else "cpu") and tag.endswith("torch" + ".".join(torch.__version__.split(".")[:2])), tag
assert ak.cpu.is_available(), ak.cpu.load_error()
if kind == "cuda":
    assert ak.cuda.is_available(), ak.cuda.load_error()
else:
    assert "not built" in ak.cuda.load_error(), ak.cuda.load_error()

g = torch.Generator().manual_seed(0)
q = torch.randn(6, 4, 64, generator=g)
k_cache, v_cache = torch.randn(2, 5, 16, 2, 64, generator=g).unbind(0)
block_table = torch.tensor([[3, 1, 0], [2, 4, 0]], dtype=torch.int32)
kv_lens = torch.tensor([40, 17], dtype=torch.int32)
cu_q_lens = torch.tensor([0, 4, 6], dtype=torch.int32)
args = (q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, 4)
assert ak.resolve_backend("paged_attention", q, k_cache, block_table) is ak.cpu
out, _ = ak.paged_attention(*args)
torch.testing.assert_close(out, ak.reference.paged_attention(*args, False, 64 ** -0.5, False)[0])
model = arpg.digits.load_digits_model()
tokens = arpg.generate(model, torch.arange(10), num_steps=4, cfg_scale=2.0, seed=0)
assert tokens.shape == (10, 64) and 0 <= int(tokens.min()) and int(tokens.max()) < model.config.vocab_size
print(f"{kind} wheel {version('arpg-kernels')} from site-packages: ops registered, paged_attention == reference, "
      f"digits model sampled; import torch {t1 - t0:.2f} s, then arpg_kernels + arpg {t2 - t1:.2f} s")
EOF
}
use_package cuda
"$tmp/venv/bin/arpg" --help >/dev/null
"$tmp/venv/bin/arpg-bench" --help >/dev/null
"$tmp/venv/bin/arpg" sample --ckpt digits --num-per-class 1 --steps 4 --no-progress --png "$tmp/elsewhere/digits.png" >/dev/null
test -s "$tmp/elsewhere/digits.png"
echo "arpg --help, arpg-bench --help and arpg sample --ckpt digits ran"

echo "+ the CPU-only wheel in the same environment"
"$venv_py" -m pip install -q --force-reinstall --no-deps "$cpu_wheel"
"$venv_py" -m pip check
use_package cpu

if [[ -n "$other_torch" ]]; then
    echo "+ the CUDA wheel under $other_torch"
    "$venv_py" -m pip install -q --force-reinstall --no-deps "$cuda_wheel"
    "$venv_py" -m pip install -q --force-reinstall --no-deps "$other_torch"
    other_check() {  # $1: record (the record is there) | raw (it is not: the import itself must fail cleanly)
        "$venv_py" -I - "$1" <<'EOF'
import sys, warnings
import torch
import arpg_kernels as ak

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import arpg_kernels.cuda
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 32, generator=g)
    k_cache, v_cache = torch.randn(2, 2, 16, 2, 32, generator=g).unbind(0)
    args = (q, k_cache, v_cache, torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32), 3)
    out, _ = ak.paged_attention(*args)
    ak.cuda.is_available()
lines = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert all("\n" not in line for line in lines), lines
torch.testing.assert_close(out, ak.reference.paged_attention(*args, False, 32 ** -0.5, False)[0])
print("\n".join(lines))
assert not ak.cuda.is_available()
if sys.argv[1] == "record":  # one line per extension, neither loaded
    assert len(lines) == 2 and all(f"this is torch {torch.__version__}" in line for line in lines), lines
    assert not ak.cpu.is_available()
else:  # the CUDA library cannot load under a CPU-only torch; the CPU one may load (then it must answer right)
    assert len(lines) == 1 + (not ak.cpu.is_available()), lines
    print(f"(arpg_kernels._cpu built for another torch {'loaded' if ak.cpu.is_available() else 'did not load'})")
EOF
    }
    other_check record
    rm "$("$venv_py" -I -c 'import arpg_kernels, os; print(os.path.dirname(arpg_kernels.__file__))')/_build.json"
    echo "(without the record, the import itself:)"
    other_check raw
fi
echo "check_dist.sh: passed in $((SECONDS - start)) s"
