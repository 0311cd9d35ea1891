#!/usr/bin/env bash
# Build the source distribution and, from it, a CUDA wheel and its CPU-only sibling for a stated torch:
#
#   scripts/build_wheels.sh [--torch 2.14.1] [--cuda 13.0] [--index-url URL] [--out DIR]
#
# The sdist is made from a clean copy of the work tree (tracked and untracked-but-not-ignored files, so
# no build output can slip in). The wheels name the torch/CUDA pair in their local version, as flash-attn
# and xformers do (0.1.0+cu130torch2.14, 0.1.0+cputorch2.14), and require that torch minor release, whose
# C++ ABI their extensions link against. They are built against the active environment's torch when it is
# the stated one (default: whatever is active), otherwise in a fresh build environment that gets
# torch==VERSION (from --index-url when given, e.g. https://download.pytorch.org/whl/cu130). --cuda checks
# torch.version.cuda. The CUDA wheel needs nvcc (CUDA_HOME or PATH); TORCH_CUDA_ARCH_LIST defaults to
# "8.0;9.0", MAX_JOBS to 2. The wheels are linux_x86_64 (not manylinux): for a direct download or
# --find-links, not for PyPI. Prints the files and their sizes; the last lines name the sdist and wheels.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

torch_version="" cuda_version="" index_url="" out="$root/dist"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --torch) torch_version="$2"; shift 2 ;;
        --cuda) cuda_version="$2"; shift 2 ;;
        --index-url) index_url="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "build_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

py=python3
active=$($py -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [[ -n "$torch_version" && "$active" != "$torch_version" ]]; then
    echo "+ build environment with torch==$torch_version (the active one has '${active:-no torch}')"
    $py -m venv "$work/venv"
    py="$work/venv/bin/python"
    $py -m pip install -q ${index_url:+--index-url "$index_url"} "torch==$torch_version"
    $py -m pip install -q setuptools wheel ninja build
fi
$py -c 'import build' 2>/dev/null || $py -m pip install -q build
$py - "$cuda_version" <<'EOF'
import sys, torch
want = sys.argv[1]
if want and torch.version.cuda != want:
    sys.exit(f"build_wheels.sh: asked for CUDA {want}, but torch {torch.__version__} is built for CUDA {torch.version.cuda}")
print(f"+ building against torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF

# The sdist, from a clean copy.
mkdir "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
    | tar -xf - -C "$work/src"
(cd "$work/src" && ARPG_SKIP_CUDA_BUILD=1 $py -m build --sdist --no-isolation --outdir "$out" . >"$work/sdist.log" 2>&1) \
    || { cat "$work/sdist.log" >&2; exit 1; }
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/arpg_kernels/_version.py")
sdist="$out/arpg_kernels-$version.tar.gz"
[[ -f "$sdist" ]] || { echo "build_wheels.sh: expected $sdist" >&2; exit 1; }

# The wheels, from the sdist, outside the source tree. --no-cache-dir: pip would otherwise hand back the
# first wheel it built from this archive for the second build.
cd "$work"
echo "+ CUDA wheel (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
ARPG_LOCAL_VERSION=auto FORCE_CUDA=1 $py -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir \
    -w "$work/cuda" "$sdist"
echo "+ CPU-only wheel"
ARPG_LOCAL_VERSION=auto ARPG_SKIP_CUDA_BUILD=1 $py -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir \
    -w "$work/cpu" "$sdist"
cuda_wheel=$(ls "$work"/cuda/*.whl) cpu_wheel=$(ls "$work"/cpu/*.whl)
mv "$cuda_wheel" "$cpu_wheel" "$out"/
cuda_wheel="$out/$(basename "$cuda_wheel")" cpu_wheel="$out/$(basename "$cpu_wheel")"
case "$(basename "$cuda_wheel")" in *+cu*torch*) ;; *) echo "build_wheels.sh: $cuda_wheel has no CUDA extension" >&2; exit 1 ;; esac
ls -l "$sdist" "$cuda_wheel" "$cpu_wheel" | awk '{printf "%10.1f KiB  %s\n", $5 / 1024, $NF}'
echo "sdist: $sdist"
echo "cuda wheel: $cuda_wheel"
echo "cpu wheel: $cpu_wheel"
