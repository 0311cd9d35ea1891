#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a session that is lent one (see README "GPU runs").
# Builds the package with the CUDA extension, runs the GPU tests, the C++ kernel test under
# compute-sanitizer, and the benchmarks; everything it produces lands in ${OUT:-./gpu-out}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
{
  nvidia-smi || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

step() { echo "== $1"; }
step build
time python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 5 | tee "$OUT/build.txt"

step "gpu tests"
python3 -m pytest -q -m "gpu or cuda_ext" tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -n 30

step "c++ kernel test + compute-sanitizer"
if cmake -S . -B build/cmake -G Ninja -DWITH_CUDA=ON \
     -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
     > "$OUT/cmake.txt" 2>&1 && cmake --build build/cmake -j "$MAX_JOBS" >> "$OUT/cmake.txt" 2>&1; then
  ./build/cmake/arpg_kernel_tests 2>&1 | tee "$OUT/cpp_tests.txt" | tail -n 20
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" ./build/cmake/arpg_kernel_tests > "$OUT/sanitizer_$tool.txt" 2>&1
    tail -n 3 "$OUT/sanitizer_$tool.txt"
  done
else
  echo "cmake build failed; see cmake.txt"; tail -n 20 "$OUT/cmake.txt"
fi

step benchmarks
python3 -m arpg.bench.run --out "$OUT/bench" ${ARPG_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | tail -n 60
