#!/usr/bin/env bash
# The demo behind `./run.sh demo` (run.sh sets up and builds first):
# a tiny Llama checkpoint made by transformers (once, cached), loaded by
# loadkit, logits compared with transformers' own, and the load report.
set -euo pipefail
BUILD=${1:?usage: demo.sh BUILD_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${LOADKIT_PYTHON:?run through ./run.sh demo}
LOADKIT="$BUILD/bin/loadkit"
FIXTURES="$BUILD/fixtures"
OUT="$BUILD/demo"
mkdir -p "$OUT"

"$PY" "$ROOT/tests/fixtures/gen_fixtures.py" "$FIXTURES" 2>/dev/null
MODEL="$FIXTURES/llama_fp32_gqa_sharded"
TOKENS=$("$PY" -c "import json,sys; f=[x for x in json.load(open(sys.argv[1]))['fixtures'] if x['name']=='llama_fp32_gqa_sharded'][0]; print(','.join(map(str, f['tokens'])))" "$FIXTURES/fixtures.json")

echo "== plugins"
"$LOADKIT" plugins list
echo
echo "== load $MODEL"
"$LOADKIT" load --model "$MODEL" --report "$OUT/load_report.json" --log-level warn
echo
echo "== logits for tokens $TOKENS"
"$LOADKIT" logits --model "$MODEL" --tokens "$TOKENS" --out "$OUT/logits.safetensors" --log-level warn
"$PY" - "$OUT/logits.safetensors" "$FIXTURES/references/llama_fp32_gqa_sharded.safetensors" <<'PY'
import sys
from safetensors.torch import load_file
ours = load_file(sys.argv[1])["logits"]
ref = load_file(sys.argv[2])["logits"]
print(f"logits {list(ours.shape)}; next-token argmax per position: {ours.argmax(-1).tolist()}")
print(f"transformers agrees on every argmax: {bool((ours.argmax(-1) == ref.argmax(-1)).all())}; "
      f"max |loadkit - transformers| = {(ours - ref).abs().max().item():.2e}")
PY

B="$FIXTURES/llama_fp32_gqa_b"
echo
echo "== reload in place from $B (fp8 online quantization), logits after"
"$LOADKIT" reload --model "$MODEL" --from "$B" --quantization fp8 --tokens "$TOKENS" \
  --out "$OUT/logits_reloaded.safetensors" --report "$OUT/reload_report.json" --log-level warn
"$PY" - "$OUT/logits_reloaded.safetensors" "$FIXTURES/references/llama_fp32_gqa_b.safetensors" <<'PY'
import sys, torch
from safetensors.torch import load_file
ours = load_file(sys.argv[1])["logits"]
ref = load_file(sys.argv[2])["logits"]
cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
print(f"after reload (fp8): argmax {ours.argmax(-1).tolist()}; min cosine vs transformers on the new weights {cos:.4f}")
PY
echo
echo "== load report"
cat "$OUT/load_report.json"
echo
echo "== reload report"
cat "$OUT/reload_report.json"
