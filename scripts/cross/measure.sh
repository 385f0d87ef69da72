#!/usr/bin/env bash
# The figures in README "On the device": one edge client joining an aggregator and training one
# round of LoRA on a 500-example Fashion-MNIST shard, with its peak RSS and time to "joined".
#   scripts/cross/measure.sh BINARY ARCH RUNTIME [CACHE_DIR]
#     BINARY   an edge-client build (e.g. target/aarch64-unknown-linux-gnu/edge/edge-client)
#     ARCH     native | aarch64 | armv7 (the last two run under qemu user-mode: cross/qemu-run)
#     RUNTIME  tract | ort (ort needs ORT_DYLIB_PATH)
#     CACHE_DIR  activation cache; default a fresh one (the trunk runs over the shard: a cold start)
# The aggregator (AGGREGATOR, default target/debug/aggregator) runs natively with its embedded
# broker on loopback: 1 round, 1 client, held-out evaluation on 200 images. Peak RSS is GNU
# time's maximum resident set size of the client's process; under qemu that process is the
# emulator, so the figure includes qemu's own memory and translated code.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:?usage: measure.sh BINARY native|aarch64|armv7 tract|ort [CACHE_DIR]}
arch=${2:?}; runtime=${3:?}
tmp=$(mktemp -d)
cache=${4:-$tmp/cache}
agg=${AGGREGATOR:-${CARGO_TARGET_DIR:-target}/debug/aggregator}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/agg.toml" <<TOML
fleet = "measure"
run_id = 1
rounds = 1
min_clients = 1
quorum = 1
round_timeout_secs = 3600
[local]
epochs = 2
batch_size = 32
learning_rate = 0.001
optimizer = "adamw"
[broker]
port = $port
[model]
backbone = "models/build/efficientnet-lite0"
peft = "lora"
eval_examples = 200
cache_dir = "$tmp/agg-cache"
[output]
dir = "$tmp/out"
resume = false
TOML
"$agg" --config "$tmp/agg.toml" >"$tmp/agg.log" 2>&1 &
agg_pid=$!
trap 'kill $agg_pid 2>/dev/null; rm -rf "$tmp"' EXIT
until grep -q "aggregator ready" "$tmp/agg.log"; do
  kill -0 $agg_pid 2>/dev/null || { cat "$tmp/agg.log" >&2; exit 1; }
  sleep 0.2
done
run=()
[ "$arch" = native ] || run=(cross/qemu-run "$arch")
t0=$(date +%s.%N)
/usr/bin/time -v -o "$tmp/time.txt" "${run[@]}" "$bin" --broker "mqtt://127.0.0.1:$port" \
  --fleet measure --run-id 1 --client-id m-01 --model-dir models/build/efficientnet-lite0 \
  --runtime "$runtime" --peft lora --partition dirichlet --num-clients 8 --client-index 0 \
  --max-examples 500 --cache-dir "$cache" >"$tmp/edge.log" 2>&1 &
edge_pid=$!
until grep -q "client joined" "$tmp/agg.log"; do
  kill -0 $edge_pid 2>/dev/null || { cat "$tmp/edge.log" >&2; exit 1; }
  sleep 0.1
done
t_join=$(date +%s.%N)
wait $edge_pid || { cat "$tmp/edge.log" >&2; exit 1; }
t_end=$(date +%s.%N)
wait $agg_pid || true
rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tmp/time.txt")
grep -E "trunk opened|trunk activations ready|update published" "$tmp/edge.log" | sed 's/^/  /'
grep -E "round 1|accuracy" "$tmp/agg.log" | tail -2 | sed 's/^/  /'
printf 'measure: %s %s %s: binary %s bytes; joined after %.1f s; round done and exited after %.1f s; peak RSS %.1f MiB\n' \
  "$arch" "$runtime" "$(basename "$bin")" "$(stat -L -c %s "$bin")" \
  "$(echo "$t_join - $t0" | bc)" "$(echo "$t_end - $t0" | bc)" "$(echo "$rss / 1024" | bc -l)"
