#!/usr/bin/env bash
# The one-shot GPU check, for a session lent a GPU for a few minutes (README "GPU runs").
#
#   scripts/gpu_session.sh [--out DIR] [--budget SECONDS] [--rehearse]
#
# Stages, in order, each under its own timeout and never past the overall budget (default 470 s, inside
# the 8 minutes a borrowed GPU's call is planned for): env; build (the CUDA extension with
# TORCH_CUDA_ARCH_LIST=9.0 on every core, the CMake C++ kernel test beside it); GPU tests (pytest -m
# "gpu or cuda_ext"), with the C++ kernel test under compute-sanitizer memcheck and initcheck running
# beside them; the short benchmark grid (arpg-bench --short: generation, then kernels); Nsight Compute
# metrics of the paged kernel (B=128, kv 16/64/256, q_len 4/16/64) when ncu is present; then training.
# A stage that fails is recorded and the next one runs. Each stage writes its file into DIR (default
# $OUT, else ./gpu-out) as it finishes, eight files at most, flat (what a borrowed GPU sends back):
#   stages.tsv env.txt build.txt gpu_tests.txt sanitizer.txt bench.txt results.csv ncu.csv
# --rehearse runs every stage that a machine without a GPU can (the build, the collection of the GPU
# tests, the CMake build of the C++ test, argument parsing of the benchmark and ncu launchers), so that
# GPU minutes are spent measuring.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/gpu-out}
BUDGET=470
REHEARSE=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case $BUDGET in ''|*[!0-9]*) echo "gpu_session.sh: --budget must be whole seconds, not '$BUDGET'" >&2; exit 2 ;; esac
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)  # logs too many or too large to send back whole; their tails go into DIR
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
printf 'stage\trc\tseconds\tnote\n' > "$OUT_DIR/stages.tsv"

left() { echo $((DEADLINE - $(date +%s))); }
# stage NAME CAP_SECONDS LOG COMMAND...: run COMMAND under min(CAP, time left), append its output to LOG.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local t0 limit rc
  t0=$(date +%s)
  limit=$(( $(left) < cap ? $(left) : cap ))
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t0\tbudget spent\n' "$name" >> "$OUT_DIR/stages.tsv"
    echo "== $name: skipped (budget spent)"; return 0
  fi
  echo "== $name (at most ${limit}s; $(( $(date +%s) - START ))s in)" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "== $name: timed out after ${limit}s" >> "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$([ $rc -eq 124 ] && echo timeout)" >> "$OUT_DIR/stages.tsv"
  tail -n 4 "$log"
  return 0
}

# --- env
{
  date -u; nproc; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  for tool in nvcc ncu compute-sanitizer cmake ninja; do printf '%s: %s\n' "$tool" "$(command -v $tool || echo missing)"; done
  nvcc --version 2>/dev/null | tail -n 2
  echo "git commit: ${ARPG_GIT_COMMIT:-unset}"
} > "$OUT_DIR/env.txt" 2>&1
printf 'env\t0\t%s\t\n' "$(( $(date +%s) - START ))" >> "$OUT_DIR/stages.tsv"
cat "$OUT_DIR/env.txt"
if ! python3 -c "import torch, triton" 2> /dev/null; then
  echo "gpu_session.sh: $(command -v python3) cannot import torch and triton; every stage needs them" >&2; exit 2
fi

# --- build: the C++ kernel test (CMake) starts first, in the background, on a quarter of the cores
CMAKE_LOG=$WORK/cmake.txt
BUILD_DIR=$WORK/cmake
(
  cmake -S . -B "$BUILD_DIR" -G Ninja -DWITH_CUDA=ON -DWITH_TORCH=OFF -DARPG_EMU_TESTS=OFF \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CUDA_ARCHITECTURES="$(echo "${TORCH_CUDA_ARCH_LIST//./}" | tr ';' ' ' | awk '{print $NF}')" &&
  cmake --build "$BUILD_DIR" --target arpg_kernel_tests -j $(( MAX_JOBS / 4 > 1 ? MAX_JOBS / 4 : 1 ))
) > "$CMAKE_LOG" 2>&1 &
CMAKE_PID=$!
stage build 240 "$WORK/build.txt" python3 -m pip install --no-build-isolation --no-deps -e . -v
grep -E "^==|arpg_kernels: |error|Error|ERROR|warning|Successfully installed|timed out" "$WORK/build.txt" | tail -n 60 > "$OUT_DIR/build.txt"
python3 -c "import json, arpg_kernels, arpg_kernels.cuda as c; print('extension available:', c.is_available()); print(json.load(open(arpg_kernels.__path__[0] + '/_build.json')))" \
  >> "$OUT_DIR/build.txt" 2>&1

# --- sanitizer (background, beside the GPU tests): the C++ kernel test plain, under memcheck and initcheck
SAN=$OUT_DIR/sanitizer.txt
sanitize() {
  while kill -0 "$CMAKE_PID" 2>/dev/null && [ "$(left)" -gt 30 ]; do sleep 2; done
  echo "--- cmake (tail)"; tail -n 15 "$CMAKE_LOG"
  local exe=$BUILD_DIR/arpg_kernel_tests
  if [ ! -x "$exe" ]; then echo "arpg_kernel_tests was not built"; return 1; fi
  if [ "$REHEARSE" = 1 ]; then echo "rehearsal: built $exe; not run (no GPU)"; return 0; fi
  echo "--- plain"; timeout 60 "$exe" 2>&1 | tail -n 25
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck initcheck; do
      echo "--- compute-sanitizer --tool $tool"
      # At most 90 s a tool: the benchmarks wait for the sanitizer (below), and they hold the headline numbers.
      local cap=$(( $(left) / 3 < 90 ? $(left) / 3 : 90 ))
      timeout $(( cap > 20 ? cap : 20 )) compute-sanitizer --tool "$tool" --error-exitcode 9 "$exe" 2>&1 | tail -n 25
      echo "rc=${PIPESTATUS[0]}"
    done
  else
    echo "compute-sanitizer: not on PATH"
  fi
}
SAN_T0=$(date +%s)
( sanitize > "$SAN" 2>&1 ) &
SAN_PID=$!

# --- GPU tests (on a CPU machine: their collection)
TESTS_LOG=$OUT_DIR/gpu_tests.txt
TIMEOUT_FLAG=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90")
if [ "$REHEARSE" = 1 ]; then
  stage gpu-tests 150 "$TESTS_LOG" python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors --collect-only -m "gpu or cuda_ext" tests
else
  stage gpu-tests 150 "$TESTS_LOG" python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -rfEs $TIMEOUT_FLAG -m "gpu or cuda_ext" tests
fi
# The sanitizer gets at most 60 s more once the tests are done, then the GPU is the benchmarks'.
SAN_WAIT_END=$(( $(date +%s) + 60 ))
while kill -0 "$SAN_PID" 2>/dev/null && [ "$(left)" -gt 20 ] && [ "$(date +%s)" -lt "$SAN_WAIT_END" ]; do sleep 2; done
kill "$SAN_PID" 2>/dev/null && echo "sanitizer stage stopped (budget or its 60 s after the tests)" >> "$SAN"
wait "$SAN_PID" 2>/dev/null
printf 'sanitizer\t%s\t%s\t%s\n' "$(grep -c '^rc=0' "$SAN")/$(grep -c '^rc=' "$SAN") clean" \
  "$(( $(date +%s) - SAN_T0 ))" "$(grep -m1 -E 'ERROR SUMMARY' "$SAN" | tr -d '\t' || true)" >> "$OUT_DIR/stages.tsv"
tail -n 8 "$SAN"

# --- benchmarks: the short grid into one CSV, generation (the headline point) first
BENCH=$WORK/bench
BENCH_LOG=$OUT_DIR/bench.txt
if [ "$REHEARSE" = 1 ]; then
  stage bench-args 30 "$BENCH_LOG" python3 -m arpg.bench.run --short --device cuda --help
  stage ncu-args 30 "$BENCH_LOG" python3 scripts/ncu_paged.py --dry-run
else
  stage bench-generation 120 "$BENCH_LOG" python3 -m arpg.bench.run --short --only generation --out "$BENCH"
  cp "$BENCH/results.csv" "$OUT_DIR/results.csv" 2>/dev/null
  stage bench-kernels 150 "$BENCH_LOG" python3 -m arpg.bench.run --short --only kernels --out "$BENCH"
  cp "$BENCH/results.csv" "$OUT_DIR/results.csv" 2>/dev/null
  if command -v ncu > /dev/null; then
    stage ncu 60 "$WORK/ncu.txt" ncu --clock-control none --kernel-name regex:"[Pp]aged|MergeSplits|_combine_splits" --csv --page raw \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,launch__occupancy_limit_registers,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size \
      python3 scripts/ncu_paged.py
    cp "$WORK/ncu.txt" "$OUT_DIR/ncu.csv"
  else
    printf 'ncu\tskipped\t0\tncu not on PATH\n' >> "$OUT_DIR/stages.tsv"
  fi
  stage bench-training 90 "$BENCH_LOG" python3 -m arpg.bench.run --short --only training --out "$BENCH"
  cp "$BENCH/results.csv" "$OUT_DIR/results.csv" 2>/dev/null
fi
echo "== done in $(( $(date +%s) - START ))s"
column -t -s $'\t' "$OUT_DIR/stages.tsv" 2>/dev/null || cat "$OUT_DIR/stages.tsv"
rm -rf "$WORK"
