#!/usr/bin/env bash
# Trunk throughput: ort and tract (Rust) against onnxruntime's Python API, same machine,
# models, inputs, batch and threads. Runs the Rust example and the Python peer alternately
# `--runs` times (default 2), printing every JSON line and `uptime` before each run, then a
# table of medians and ratios.
#   scripts/models/bench.sh [--runs 2] [--threads 2] [--batch 32] [--seconds 5]
# The Rust side loads onnxruntime from ORT_DYLIB_PATH, else models/build/onnxruntime/ (the same
# libonnxruntime.so.1.31.1 that .venv-models' onnxruntime uses).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=2
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
scripts/models/build.sh >/dev/null
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/models/build/onnxruntime/libonnxruntime.so.1.31.1}
target=${CARGO_TARGET_DIR:-target}
CARGO_TARGET_DIR=$target cargo build -q --release -p fedpeft-backbone --features ort \
  --example trunk_throughput
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq "$runs"); do
  echo "# run $i/$runs: $(uptime)"
  "$target/release/examples/trunk_throughput" "${args[@]}" | tee -a "$out"
  .venv-models/bin/python scripts/models/bench_onnxruntime.py "${args[@]}" | tee -a "$out"
done
echo "# done: $(uptime)"
python3 - "$out" <<'PY'
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
runs = defaultdict(list)
for r in rows:
    runs[(r["model"], r["input"], r["runtime"])].append(r["per_second"])
med = {k: statistics.median(v) for k, v in runs.items()}
b, t = rows[0]["batch"], rows[0]["threads"]
print(f"\nmedians over {max(len(v) for v in runs.values())} runs, batch {b}, threads {t}")
print(f"{'model':20} {'input':7} {'ort':>8} {'tract':>8} {'ort-py':>8} {'ort/py':>7} {'tract/py':>8} {'tract/ort':>9}")
for m, i in dict.fromkeys((m, i) for m, i, _ in runs):
    o, tr, py = (med.get((m, i, k), float("nan")) for k in ("ort", "tract", "onnxruntime-python"))
    print(f"{m:20} {i:7} {o:8.1f} {tr:8.1f} {py:8.1f} {o / py:6.2f}x {tr / py:7.2f}x {tr / o:8.2f}x")
print("runs:", {f"{m} {i} {k}": v for (m, i, k), v in runs.items()})
PY
