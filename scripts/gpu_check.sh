#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool): build, the GPU tests, the benchmark.
#
#   scripts/gpu_check.sh [tests|bench|all] [CTEST_REGEX]
#
# Expects the .deb files of ../shared/device (and libgloo-dev's headers) in
# .device-deps/ (carried with the call; DESIGN "Building on the two machines").
# Writes logs and results under $OUT (or ./gpu-out). Build dir: build-gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
REGEX=${2:-'[Cc]uda|Gpu|GPU|Staged|Nccl|python'}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the multi-GPU kinds (KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

for f in .device-deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
ldconfig
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

start=$(date +%s)
LOADKIT_BUILD_DIR=$PWD/build-gpu LOADKIT_JOBS=$(nproc) ./run.sh build >"$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"

status=0
if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  start=$(date +%s)
  (cd build-gpu && ctest -R "$REGEX" -j 4 --output-on-failure --timeout 400) >"$OUT/ctest.log" 2>&1 || status=1
  grep -E "tests passed|tests failed|Failed|\*\*\*|Not Run" "$OUT/ctest.log" | tail -30
  grep -h "MEASURE" build-gpu/Testing/Temporary/LastTest.log 2>/dev/null | sort -u > "$OUT/measure.txt"
  cp build-gpu/Testing/Temporary/LastTest.log "$OUT/LastTest.log" 2>/dev/null
  echo "tests: $(( $(date +%s) - start )) s"
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  start=$(date +%s)
  "${LOADKIT_PYTHON:-/opt/torch/.venv/bin/python3}" bench/load_bench.py --build build-gpu --work /tmp/loadkit-bench \
    --out "$OUT" ${BENCH_ARGS:---cold} >"$OUT/bench.log" 2>&1 || { status=1; tail -30 "$OUT/bench.log"; }
  cat "$OUT/bench.txt" 2>/dev/null
  echo "bench: $(( $(date +%s) - start )) s"
fi
exit $status
