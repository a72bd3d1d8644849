#!/usr/bin/env bash
# The demo behind `./run.sh demo` (run.sh sets up and builds first): tiny
# checkpoints made by transformers (once, cached), then the YAML jobs in
# configs/: load, logits checked against transformers' own, reload in place
# (plain and with fp8 online quantization), reports.
set -euo pipefail
BUILD=${1:?usage: demo.sh BUILD_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${LOADKIT_PYTHON:?run through ./run.sh demo}
LOADKIT="$BUILD/bin/loadkit"
export LOADKIT_FIXTURES="$BUILD/fixtures" LOADKIT_OUT="$BUILD/demo"
mkdir -p "$LOADKIT_OUT"

"$PY" "$ROOT/tests/fixtures/gen_fixtures.py" "$LOADKIT_FIXTURES" 2>/dev/null

echo "== plugins"
"$LOADKIT" plugins list
echo
echo "== loadkit run configs/demo.yaml"
"$LOADKIT" run "$ROOT/configs/demo.yaml" --log-level warn
echo
echo "== loadkit run configs/reload_fp8.yaml"
"$LOADKIT" run "$ROOT/configs/reload_fp8.yaml" --log-level warn
echo
echo "== reload report (plain)"
cat "$LOADKIT_OUT/reload_report.json"
echo
echo "== reload report (fp8)"
cat "$LOADKIT_OUT/fp8_reload_report.json"
