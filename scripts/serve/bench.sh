#!/usr/bin/env bash
# The figures of the book's results page "Serving" (docs/src/results/serving.md): latency and
# throughput of `edge-client serve` answering POST /predict, one markdown row per setting.
#   scripts/serve/bench.sh RUN_DIR BODY_FILE CONTENT_TYPE [RUNTIME] [ARCH]
#     RUN_DIR       a finished run's results folder (its globals/ and index; the best round)
#     BODY_FILE     the request body (a PNG for image backbones, a text for MiniLM)
#     CONTENT_TYPE  image/png, text/plain, ...
#     RUNTIME       ort | tract (default ort)
#     ARCH          native | aarch64 (under qemu user-mode, cross/qemu-run; default native)
# EDGE (default target/release/edge-client; for aarch64 dist/fedpeft-edge-aarch64/bin/edge-client),
# LOAD (default target/release/examples/serve_load), THREADS (trunk threads, default 2),
# REQUESTS (default 200; 50 under qemu), CONCURRENCY (a list, default "1 8") pick the rest.
# At concurrency 1 each request waits for the one before (latency); at 8 requests queue and the
# server batches them (throughput). The load generator runs natively on the same machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
run=${1:?usage: bench.sh RUN_DIR BODY_FILE CONTENT_TYPE [ort|tract] [native|aarch64]}
body=${2:?}; ctype=${3:?}; runtime=${4:-ort}; arch=${5:-native}
out=${CARGO_TARGET_DIR:-target}
load=${LOAD:-$out/release/examples/serve_load}
threads=${THREADS:-2}
if [ "$arch" = aarch64 ]; then
  edge=${EDGE:-dist/fedpeft-edge-aarch64/bin/edge-client}
  requests=${REQUESTS:-50}
  if [ "$runtime" = ort ]; then export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(scripts/cross/onnxruntime-aarch64.sh)}; fi
  launch=(cross/qemu-run aarch64 "$edge")
else
  edge=${EDGE:-$out/release/edge-client}
  requests=${REQUESTS:-200}
  launch=("$edge")
fi
log=$(mktemp)
"${launch[@]}" serve --adapter "$run" --listen 127.0.0.1:0 --runtime "$runtime" \
  --threads "$threads" >"$log" 2>"$log.err" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log" "$log.err"' EXIT
for _ in $(seq 600); do grep -q '^http://' "$log" && break; sleep 0.5; done
url=$(grep -m1 '^http://' "$log") || { cat "$log.err" >&2; exit 1; }
backbone=$(grep -o 'backbone=[^ ]*' "$log.err" | head -1 | cut -d= -f2)
for c in ${CONCURRENCY:-1 8}; do
  r=$("$load" "$url" "$body" --type "$ctype" --requests "$requests" --concurrency "$c" --warmup 5)
  python3 - "$r" "$backbone" "$arch" "$runtime" "$threads" "$c" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
b, arch, rt, th, c = sys.argv[2:]
print(f"| {b} | {arch} | {rt} | {th} | {c} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests_per_s']:.1f} | {r['requests']} |")
EOF
done
