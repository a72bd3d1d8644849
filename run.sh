#!/usr/bin/env bash
# The two README commands:
#   ./run.sh demo   set up, build the CLI and plugins, run the demo jobs on a tiny model
#   ./run.sh test   set up, build, run the whole test suite (ctest)
# Environment: LOADKIT_BUILD_DIR (default ./build), LOADKIT_JOBS (default: cores),
# CTEST_ARGS (extra ctest arguments, e.g. "-R Logits").
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
MODE=${1:-}
case "$MODE" in
  demo|test|build) ;;
  *) echo "usage: ./run.sh demo|test" >&2; exit 2 ;;
esac

eval "$(scripts/setup.sh)"
export LOADKIT_PYTHON
BUILD=${LOADKIT_BUILD_DIR:-$ROOT/build}
JOBS=${LOADKIT_JOBS:-$(nproc)}

# ccache keyed relative to the repo root, so that a fresh clone elsewhere hits the cache.
if command -v ccache >/dev/null; then
  export CCACHE_BASEDIR=$ROOT CCACHE_NOHASHDIR=true CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/loadkit/ccache}
  export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
  LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
else
  LAUNCHER=()
fi
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
COMPILER=()
if [ -z "${CXX:-}" ] && [ -x /opt/gcc/bin/g++ ]; then COMPILER=(-DCMAKE_CXX_COMPILER=/opt/gcc/bin/g++); fi

TORCH_PREFIX=$("$LOADKIT_PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" "${LAUNCHER[@]}" "${COMPILER[@]}" \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DLOADKIT_PYTHON="$LOADKIT_PYTHON" ${LOADKIT_CMAKE_ARGS:-} >&2
fi
# The demo needs the CLI, its runtime and the shipped plugins; test (and build) everything.
TARGETS=()
[ "$MODE" = demo ] && TARGETS=(--target loadkit_cli_and_plugins)
cmake --build "$BUILD" -j "$JOBS" "${TARGETS[@]}" >&2

case "$MODE" in
  build) ;;
  test)
    cd "$BUILD"
    ctest --output-on-failure -j "$JOBS" ${CTEST_ARGS:-}
    ;;
  demo)
    exec "$ROOT/scripts/demo.sh" "$BUILD"
    ;;
esac
