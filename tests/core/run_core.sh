#!/usr/bin/env bash
# Builds the torch-free core on its own (cmake/loadkitCore.cmake) and runs it:
#
#   run_core.sh sanitize SOURCE_DIR WORK_DIR CXX [LAUNCHER]
#       LOADKIT_SANITIZE=address,undefined with CXX; runs the torch-free suites
#       (test_safetensors_reader, test_jobs) under ASan (leak checking on) and
#       UBSan (every report fatal).
#   run_core.sh fuzz SOURCE_DIR WORK_DIR FIXTURES_DIR [LAUNCHER]
#       clang + libFuzzer + ASan/UBSan; runs every fuzz target for
#       LOADKIT_FUZZ_SECONDS (default 20) from its seed corpus (our fixtures).
#
# Exit 77 (ctest SKIP_RETURN_CODE) with the reason where the toolchain lacks
# what is needed (no clang, no sanitizer runtime): a skip, never a silent pass.
set -euo pipefail
MODE=$1 SRC=$2 WORK=$3
skip() { echo "SKIPPED: $*"; exit 77; }
log() { echo "[core.$MODE] $*"; }

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
JOBS=${LOADKIT_CORE_JOBS:-1}
probe() {  # compiler flags...: can it link a trivial program with these flags?
  local cxx=$1; shift
  mkdir -p "$WORK"
  printf '#include <cstdint>\n#include <cstddef>\n%s\n' "$PROBE_MAIN" > "$WORK/probe.cpp"
  "$cxx" "$@" "$WORK/probe.cpp" -o "$WORK/probe" >"$WORK/probe.log" 2>&1
}

case "$MODE" in
  sanitize)
    CXX=$4 LAUNCHER=${5:-}
    PROBE_MAIN='int main() { return 0; }'
    probe "$CXX" -fsanitize=address,undefined ||
      skip "$CXX cannot link with -fsanitize=address,undefined ($(head -c 300 "$WORK/probe.log"))"
    BUILD=$WORK/build
    cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" \
      ${LAUNCHER:+-DCMAKE_CXX_COMPILER_LAUNCHER=$LAUNCHER} -DLOADKIT_SANITIZE=address,undefined -DLOADKIT_BUILD_TESTS=ON >/dev/null
    SUITES=(test_safetensors_reader test_jobs)
    cmake --build "$BUILD" -j "$JOBS" --target "${SUITES[@]}"
    for suite in "${SUITES[@]}"; do
      log "running $suite under ASan+UBSan"
      ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:detect_stack_use_after_return=1 \
      UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$BUILD/bin/$suite"
    done
    ;;
  fuzz)
    FIXTURES=$4 LAUNCHER=${5:-}
    SECONDS_EACH=${LOADKIT_FUZZ_SECONDS:-20}
    CXX=""
    for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
      if command -v "$c" >/dev/null; then CXX=$(command -v "$c"); break; fi
    done
    [ -n "$CXX" ] || skip "no clang++ here (libFuzzer needs clang; apt-get install clang)"
    PROBE_MAIN='extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }'
    probe "$CXX" -fsanitize=fuzzer,address,undefined ||
      skip "$CXX cannot link with -fsanitize=fuzzer,address,undefined ($(head -c 300 "$WORK/probe.log"))"
    BUILD=$WORK/build
    cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" \
      ${LAUNCHER:+-DCMAKE_CXX_COMPILER_LAUNCHER=$LAUNCHER} -DLOADKIT_FUZZ=ON -DLOADKIT_SANITIZE=address,undefined \
      -DLOADKIT_BUILD_TESTS=OFF >/dev/null
    cmake --build "$BUILD" -j "$JOBS"
    python3 "$SRC/tests/fuzz/make_seeds.py" "$FIXTURES" "$WORK/seeds"
    mkdir -p "$WORK/artifacts"
    status=0
    while read -r target; do
      [ -n "$target" ] || continue
      mkdir -p "$WORK/corpus/$target"
      dict=()
      [ -f "$SRC/tests/fuzz/$target.dict" ] && dict=(-dict="$SRC/tests/fuzz/$target.dict")
      log "$target: ${SECONDS_EACH} s"
      if ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
         "$BUILD/bin/$target" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
           "${dict[@]}" -artifact_prefix="$WORK/artifacts/$target-" "$WORK/corpus/$target" "$WORK/seeds/$target" \
           >"$WORK/$target.log" 2>&1; then
        log "$target: $(grep -h 'stat::number_of_executed_units' "$WORK/$target.log" | awk '{print $2}') executions, no finding"
      else
        status=1
        log "$target: FAILED (artifacts in $WORK/artifacts)"
        tail -60 "$WORK/$target.log"
      fi
    done < "$BUILD/fuzz_targets.txt"
    exit $status
    ;;
  *) echo "usage: run_core.sh sanitize|fuzz SOURCE_DIR WORK_DIR ..." >&2; exit 2 ;;
esac
