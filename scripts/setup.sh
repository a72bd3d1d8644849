#!/usr/bin/env bash
# Installs what a fresh machine lacks, then prints `export` lines for the
# environment the build needs (run.sh evals them). Idempotent; quiet when
# everything is already there. Messages go to stderr.
#
# - Debian/Ubuntu packages (after `apt-get update`) when a header or tool is missing.
# - torch 2.11 + transformers + safetensors: a python that already imports
#   torch 2.11 is used as it is (the GPU machine, which has no network);
#   otherwise a venv in ~/.cache/loadkit/venv, outside the repo, so that CI's
#   fresh clone reuses it.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

# "test:package" pairs; the test is a header under /usr/include, a library, or a command.
required=(
  "h:boost/dll.hpp:libboost-dev"
  "h:boost/program_options.hpp:libboost-program-options-dev"
  "l:libboost_program_options.so:libboost-program-options-dev"
  "h:yaml-cpp/yaml.h:libyaml-cpp-dev"
  "h:spdlog/spdlog.h:libspdlog-dev"
  "h:nlohmann/json.hpp:nlohmann-json3-dev"
  "g:gtest:libgtest-dev"
  "c:cmake:cmake"
  "c:g++:g++"
)
# Gloo's headers: libtorch has Gloo inside but ships no gloo/*.h, which c10d's
# ProcessGroupGloo.hpp includes; without them CPU tensor parallelism is left out.
# clang: libFuzzer for the core.fuzz test (skipped with the reason without it).
optional=("c:ccache:ccache" "c:ninja:ninja-build" "h:gloo/algorithm.h:libgloo-dev" "c:clang++:clang")

present() {  # kind:name
  local kind=${1%%:*} name=${1#*:}
  case $kind in
    h) [ -e "/usr/include/$name" ] ;;
    l) ldconfig -p 2>/dev/null | grep -q "$name" || ls /usr/lib/*/"$name" >/dev/null 2>&1 ;;
    c) command -v "$name" >/dev/null 2>&1 ;;
    # GoogleTest: installed, or its sources (which CMake builds) where no package can be had.
    g) [ -e /usr/include/gtest/gtest.h ] || [ -n "${LOADKIT_GTEST_SOURCE_DIR:-}" ] || [ -e /usr/src/googletest/CMakeLists.txt ] ;;
  esac
}

missing() {  # prints the packages whose test fails
  local entry
  for entry in "$@"; do
    present "${entry%:*}" || echo "${entry##*:}"
  done | sort -u
}

want=$(missing "${required[@]}" "${optional[@]}")
if [ -n "$want" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing: $(echo $want)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || log "apt-get update failed (no network?)"
    # One by one, so that an optional package that cannot be had blocks nothing.
    for pkg in $want; do
      apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 || log "could not install $pkg"
    done
  fi
  still=$(missing "${required[@]}")
  if [ -n "$still" ]; then
    log "missing required packages: $(echo $still)"
    exit 1
  fi
fi

torch_ok() {  # $1 = python; true when it imports torch 2.11, transformers and safetensors
  "$1" - <<'PY' >/dev/null 2>&1
import torch, transformers, safetensors
assert torch.__version__.startswith("2.11")
PY
}

PY=""
for cand in "${LOADKIT_PYTHON:-}" /opt/torch/.venv/bin/python python3; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && torch_ok "$cand"; then
    PY=$(command -v "$cand")
    break
  fi
done
if [ -z "$PY" ]; then
  VENV="${LOADKIT_VENV:-$HOME/.cache/loadkit/venv}"
  if [ ! -x "$VENV/bin/python" ] || ! torch_ok "$VENV/bin/python"; then
    log "creating $VENV with torch==2.11.0, transformers, safetensors (first run only; several GB)"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q torch==2.11.0 transformers safetensors >&2
  fi
  PY="$VENV/bin/python"
fi
torch_ok "$PY" || { log "no usable torch 2.11 at $PY"; exit 1; }
echo "export LOADKIT_PYTHON='$PY'"
