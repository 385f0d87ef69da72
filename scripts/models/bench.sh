#!/usr/bin/env bash
# Trunk throughput: ort and tract (Rust) against onnxruntime's Python API, same machine,
# models, inputs, batch and threads. Prints JSON lines, then a table of ratios.
#   scripts/models/bench.sh [--threads 2] [--batch 32] [--seconds 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/models/build.sh >/dev/null
out=$(mktemp)
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo run -q --release -p fedpeft-backbone --features ort \
  --example trunk_throughput -- "$@" | tee "$out"
.venv-models/bin/python scripts/models/bench_onnxruntime.py "$@" | tee -a "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
py = {(r["model"], r["input"]): r["per_second"] for r in rows if r["runtime"] == "onnxruntime-python"}
print(f"\n{'model':20} {'input':7} {'runtime':7} {'per s':>8} {'vs onnxruntime-python':>22}")
for r in rows:
    if r["runtime"] == "onnxruntime-python":
        continue
    ref = py[(r["model"], r["input"])]
    print(f"{r['model']:20} {r['input']:7} {r['runtime']:7} {r['per_second']:8.1f} {r['per_second'] / ref:21.2f}x")
for (m, i), v in py.items():
    print(f"{m:20} {i:7} {'python':7} {v:8.1f} {1.0:21.2f}x")
PY
rm -f "$out"
