#!/usr/bin/env bash
# The performance run on the GPU machine (the `device` tool), one step per call:
#
#   scripts/gpu_perf.sh build    build in build-gpu                  (fresh machine: ~5 min)
#   scripts/gpu_perf.sh tests    build, then the GPU tests of the fast paths (TEST_REGEX; ~2 min)
#   scripts/gpu_perf.sh bench    build, then bench/load_bench.py        (~5-6 min after the build)
#   scripts/gpu_perf.sh all      the three in a row (longer than one call of the device tool)
#   scripts/gpu_perf.sh ab       a change measured against this tree in one call (below; ~8 min
#                                when a `bench` call left the build and the checkpoints)
#
# ab: A is this tree, B this tree with AB_PATCH applied (default .device-deps/ab.patch, e.g.
# `git format-patch main..BRANCH --stdout`). In one build folder, one after the other: A's bench
# rows, the patch applied and an incremental build, B's tests (AB_TESTS, default the staged
# stream's), B's rows, the patch undone and A's rows again (the drift between the two A runs
# says how far B's difference can be trusted). Rows AB_ROWS (default reload,blockfp8), shapes
# and repeats from BENCH_ARGS (default --shapes moe --repeats 3); each run's files in logs/ab-*/.
#
# The build is incremental (ninja, ccache) when the machine is still warm from the previous call,
# so `tests` in one call and `bench` right after keeps each call under the tool's 10 minutes.
# The bench's rows stop at BENCH_BUDGET_S seconds (default: what is left of 9 minutes since this
# script started, the build included), and the rows it skips are listed.
# Expects, carried with the call: .device-deps/*.deb (Boost.Program_options, see
# scripts/gpu_check.sh) and the peer loaders' wheels in .device-deps/wheels/ (InstantTensor,
# fastsafetensors, the Run:ai streamer; PEER_WHEELS names another folder). A peer whose wheel
# is not there shows as missing in the tables, never silently dropped.
#
# Environment: OUT (default ./gpu-out), BENCH_WORK (checkpoints; default /dev/shm/loadkit-bench
# when /dev/shm has 48 GB free, else /tmp/loadkit-bench), BENCH_ARGS (more load_bench.py flags,
# e.g. "--shapes moe,dense8 --repeats 2"), BENCH_BUDGET_S, TEST_REGEX, TEST_EXCLUDE (ctest -E), CTEST_JOBS
# (default 4), BENCH_PIECES (e.g. "3072 4096": after the bench, its shapes again at each staged piece
# size in KiB, rows BENCH_PIECE_ROWS, default "reload,blockfp8"; each run's files in logs/piece-KB/).
#
# What comes back under $OUT (the tool returns at most 8 files): summary.txt (printed last),
# bench.txt, bench.json, bench.png, raw_probe.txt, logs.tar.gz (build, ctest and bench logs,
# raw_probe.json, the debug profiles).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-bench}
STARTED=$(date +%s)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${LOADKIT_PYTHON:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
status=0
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

for f in .device-deps/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
ldconfig
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/logs/gpu.txt"

build() {  # [log name suffix]
  local start=$(date +%s) log="$OUT/logs/build${1:+-$1}.log"
  LOADKIT_BUILD_DIR=$PWD/build-gpu LOADKIT_JOBS=$(nproc) ./run.sh build >"$log" 2>&1 ||
    { tail -40 "$log"; summary "BUILD FAILED (logs.tar.gz: $(basename "$log"))"; pack; exit 1; }
  summary "build${1:+ $1}: $(( $(date +%s) - start )) s"
}

tests() {  # [log name suffix]
  local start=$(date +%s) sfx=${1:+-$1}
  local regex=${TEST_REGEX:-'QuantKernels|QuantScratch|StagedMoE|StagedLoad|ReloadGpu|WeightSyncGpu\.Fsdp|Reload\..*_cuda|(fp8|int8)_cuda|UpdatePlanGpu|PinnedPool|SteadyState.*cuda|python.steady_state_cuda'}
  # shellcheck disable=SC2086
  (cd build-gpu && ctest -R "$regex" ${TEST_EXCLUDE:+-E "$TEST_EXCLUDE"} -j "${CTEST_JOBS:-4}" --output-on-failure \
    --timeout 400) >"$OUT/logs/ctest$sfx.log" 2>&1 || status=1
  grep -h "MEASURE" build-gpu/Testing/Temporary/LastTest.log 2>/dev/null | sort -u >"$OUT/logs/measure$sfx.txt"
  cp build-gpu/Testing/Temporary/LastTest.log "$OUT/logs/LastTest$sfx.log" 2>/dev/null
  summary "tests${1:+ $1} ($regex): $(grep -E 'tests passed|tests failed' "$OUT/logs/ctest$sfx.log" | tail -1) in $(( $(date +%s) - start )) s"
  grep -E "^\s+[0-9]+ - .*\((Failed|Timeout|SEGFAULT|Exception)" "$OUT/logs/ctest$sfx.log" | tee -a "$OUT/summary.txt"
  grep -E "MoE reload|fp8 (linear|experts)|processing peak" "$OUT/logs/measure$sfx.txt" | tee -a "$OUT/summary.txt"
}

install_peers() {
  local wheels=${PEER_WHEELS:-.device-deps/wheels}
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$wheels"/*.whl >"$OUT/logs/peers_install.log" 2>&1 &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ||
      summary "peer wheels did not install (logs.tar.gz: peers_install.log): peers show as missing"
  else
    summary "no peer wheels in $wheels: InstantTensor, fastsafetensors and Run:ai show as missing"
  fi
}

bench_work() {  # where the checkpoints go
  local work=${BENCH_WORK:-}
  if [ -z "$work" ]; then
    local free_kb=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)
    if [ "${free_kb:-0}" -gt $((48 * 1024 * 1024)) ]; then work=/dev/shm/loadkit-bench; else work=/tmp/loadkit-bench; fi
  fi
  echo "$work"
}

bench() {
  install_peers
  local work
  work=$(bench_work)
  summary "bench checkpoints in $work ($(df -h --output=avail "$(dirname "$work")" | tail -1 | tr -d ' ') free there)"
  local start=$(date +%s)
  # What is left of 9 minutes since this script started, less packing; at least 2 minutes.
  local budget=${BENCH_BUDGET_S:-$(( 510 - (start - STARTED) ))}
  [ "$budget" -lt 120 ] && budget=120
  summary "bench budget: $budget s"
  mkdir -p "$OUT/bench"
  # shellcheck disable=SC2086
  "$PY" bench/load_bench.py --build build-gpu --work "$work" --out "$OUT/bench" \
    --budget-s "$budget" ${BENCH_ARGS:-} >"$OUT/logs/bench.log" 2>&1 ||
    { status=1; tail -30 "$OUT/logs/bench.log"; }
  summary "bench: $(( $(date +%s) - start )) s"
  # Then the same shapes again at each of BENCH_PIECES (KiB per staged piece), rows BENCH_PIECE_ROWS.
  local kb
  for kb in ${BENCH_PIECES:-}; do
    mkdir -p "$OUT/logs/piece-$kb"
    # shellcheck disable=SC2086
    LOADKIT_STAGING_PIECE_KB=$kb "$PY" bench/load_bench.py --build build-gpu --work "$work" --out "$OUT/logs/piece-$kb" \
      ${BENCH_ARGS:-} --rows "${BENCH_PIECE_ROWS:-reload,blockfp8}" >"$OUT/logs/piece-$kb/bench.log" 2>&1 || status=1
    rm -f "$OUT/logs/piece-$kb/bench.png"
    summary "pieces of $kb KiB ($(( $(date +%s) - start )) s):"
    [ -e "$OUT/logs/piece-$kb/bench.txt" ] &&
      grep -E "^(loadkit_reload|  [a-z_0-9]+_vs_[a-z_0-9]+: |  profile loadkit_reload)" "$OUT/logs/piece-$kb/bench.txt" |
      cut -c1-600 >>"$OUT/summary.txt"
  done
  for f in bench.txt bench.json bench.png raw_probe.txt; do [ -e "$OUT/bench/$f" ] && mv "$OUT/bench/$f" "$OUT/"; done
  mv "$OUT"/bench/* "$OUT/logs/" 2>/dev/null
  rmdir "$OUT/bench" 2>/dev/null
  # The short table: each shape's headline rows, its ratios and profile, and the targets.
  [ -e "$OUT/bench.txt" ] && awk '/^== targets/ {t = 1} t || /^== / || /^device/ || /^  [a-z_0-9]+: / ||
      /^(loadkit_|peer_|pinned_h2d|d2d_copy_one_block)/ || /^  profile/' "$OUT/bench.txt" >>"$OUT/summary.txt"
}

ab() {
  local patch=${AB_PATCH:-.device-deps/ab.patch} work start=$(date +%s)
  [ -e "$patch" ] || { summary "ab: no patch at $patch"; status=1; return; }
  work=$(bench_work)
  summary "ab: A = this tree, B = A + $patch; checkpoints in $work"
  run_rows() {  # name
    local dir="$OUT/logs/ab-$1"
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    "$PY" bench/load_bench.py --build build-gpu --work "$work" --out "$dir" ${BENCH_ARGS:---shapes moe --repeats 3} \
      --rows "${AB_ROWS:-reload,blockfp8}" >"$dir/bench.log" 2>&1 || { status=1; tail -5 "$dir/bench.log"; }
    rm -f "$dir/bench.png"
    summary "== $1 ($(( $(date +%s) - start )) s):"
    [ -e "$dir/bench.txt" ] && grep -E "^(loadkit_reload|loadkit_sync|  [a-z_0-9]+_vs_[a-z_0-9]+: |  profile loadkit_reload)" \
      "$dir/bench.txt" | cut -c1-700 >>"$OUT/summary.txt"
  }
  run_rows a
  git apply "$patch" 2>"$OUT/logs/ab-apply.log" || patch -p1 <"$patch" >>"$OUT/logs/ab-apply.log" 2>&1 ||
    { summary "ab: the patch does not apply (logs.tar.gz: ab-apply.log)"; status=1; return; }
  build b
  TEST_REGEX=${AB_TESTS:-'StagedLoad|StagedMoE|ShardedStaged|PinnedPool'} tests b
  run_rows b
  git apply -R "$patch" 2>>"$OUT/logs/ab-apply.log" || patch -R -p1 <"$patch" >>"$OUT/logs/ab-apply.log" 2>&1 ||
    { summary "ab: the patch does not come off again: no second A run"; status=1; return; }
  # The device tool stops a call at 10 minutes: the second A run (a build and the rows again, ~2-3
  # minutes) only when the call is young enough for it (AB_AGAIN_BY_S since the script started).
  if [ $(( $(date +%s) - STARTED )) -gt "${AB_AGAIN_BY_S:-390}" ]; then
    summary "ab: no second A run: $(( $(date +%s) - STARTED )) s into the call (AB_AGAIN_BY_S=${AB_AGAIN_BY_S:-390})"
    return
  fi
  build a-again
  run_rows a-again
}

pack() {
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null && rm -rf "$OUT/logs"
}

case "$MODE" in
  build) build ;;
  tests) build; tests ;;
  bench) build; bench ;;
  all) build; tests; bench ;;
  ab) build; ab ;;
  *) echo "usage: scripts/gpu_perf.sh build|tests|bench|all|ab" >&2; exit 2 ;;
esac
pack
echo
echo "===== summary ($OUT/summary.txt) ====="
cat "$OUT/summary.txt"
exit $status
