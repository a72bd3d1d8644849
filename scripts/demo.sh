#!/usr/bin/env bash
# The demo behind `./run.sh demo` (run.sh sets up and builds the CLI, its runtime and the shipped
# plugins first): the tiny Llama checkpoints made by transformers (tests/fixtures/archs/llama.py,
# once, cached), then the YAML jobs in configs/: load, logits checked against transformers' own,
# reload in place (plain and with fp8 online quantization), reports. Where a CUDA device is
# present, the same load and reload on it; elsewhere one line says why not.
set -euo pipefail
BUILD=${1:?usage: demo.sh BUILD_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${LOADKIT_PYTHON:?run through ./run.sh demo}
LOADKIT="$BUILD/bin/loadkit"
export LOADKIT_FIXTURES="$BUILD/fixtures" LOADKIT_OUT="$BUILD/demo"
mkdir -p "$LOADKIT_OUT"

# Only the module the demo uses; the test suite adds the others to the same folder.
"$PY" "$ROOT/tests/fixtures/gen_fixtures.py" "$LOADKIT_FIXTURES" llama 2>/dev/null

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
echo

echo "== CUDA"
if ! gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else exit(1)' 2>/dev/null); then
  echo "skipped: no CUDA device visible to torch on this machine (the same load and reload run on cuda:0 where there is one)"
  exit 0
fi
reference="$LOADKIT_FIXTURES/references/llama_fp32_gqa_b.safetensors"
tokens=$("$PY" -c 'import sys; from safetensors.torch import load_file; print(",".join(map(str, load_file(sys.argv[1])["tokens"].tolist())))' "$reference")
echo "device: cuda:0 ($gpu)"
"$LOADKIT" reload --device cuda:0 --model "$LOADKIT_FIXTURES/llama_fp32_gqa_sharded" \
  --from "$LOADKIT_FIXTURES/llama_fp32_gqa_b" --tokens "$tokens" --out "$LOADKIT_OUT/cuda_logits.safetensors" \
  --report "$LOADKIT_OUT/cuda_reload_report.json" --log-level info
"$PY" - "$LOADKIT_OUT/cuda_logits.safetensors" "$reference" "$LOADKIT_OUT/cuda_reload_report.json" "$gpu" <<'PY'
import json, sys
from safetensors.torch import load_file
ours, reference = load_file(sys.argv[1])["logits"], load_file(sys.argv[2])["logits"]
report = json.load(open(sys.argv[3]))
diff = (ours - reference).abs().max().item()
print(f"reloaded on {report['device']} ({sys.argv[4]}) in place: {report['bytes']} bytes, "
      f"{report['gb_per_s']:.2f} GB/s, pointers_stable={report['pointers_stable']}; "
      f"logits vs transformers: max |diff| {diff:.2e}")
sys.exit(0 if diff <= 1e-4 and report["pointers_stable"] else 1)
PY
