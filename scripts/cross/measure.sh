#!/usr/bin/env bash
# The figures on the book's results page "Boards" (docs/src/results/boards.md): one edge client joining an aggregator and training one
# round of LoRA on a 500-example Fashion-MNIST shard, with its peak RSS and time to "joined".
#   scripts/cross/measure.sh BINARY ARCH RUNTIME [CACHE_DIR]
#     BINARY   an edge-client build (e.g. target/aarch64-unknown-linux-gnu/edge/edge-client)
#     ARCH     native | aarch64 | armv7 (the last two run under qemu user-mode: cross/qemu-run)
#     RUNTIME  tract | ort (ort needs ORT_DYLIB_PATH, a library of ARCH)
#     CACHE_DIR  activation cache; default a fresh one (the trunk runs over the shard: a cold start)
#   scripts/cross/measure.sh table
#     the results page's table: the board bundles' binaries (make cross-aarch64 cross-armv7) and the
#     same client built natively with [profile.edge] (NATIVE, default target/edge/edge-client:
#     cargo build --profile edge -p fedpeft-edge --no-default-features --features ort), each
#     with tract (and onnxruntime where it exists), from an empty activation cache and again
#     with the cache it left (a restart); one markdown row per run.
# MODEL (a backbone id, default efficientnet-lite0), IMAGE_SIZE (default the aggregator's, 96) and
# MAX_EXAMPLES (default 500) pick another backbone and shard, e.g. MODEL=dinov2-vits14
# IMAGE_SIZE=112 MAX_EXAMPLES=100 for the ViT as the fedpeft-vit sweep trains it.
# The aggregator (AGGREGATOR, default target/debug/aggregator) runs natively with its embedded
# broker on loopback: 1 round, 1 client, held-out evaluation on 200 images. Peak RSS is GNU
# time's maximum resident set size of the client's process; under qemu that process is the
# emulator, so the figure includes qemu's own memory and translated code. "Joined" is the time
# from starting the client to the aggregator logging `client joined`: the client first opens
# its trunk and computes (or reads) the activations of its shard, then connects.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${CARGO_TARGET_DIR:-target}
if [ "${1:-}" = table ]; then
  native=${NATIVE:-$out/edge/edge-client}
  for b in "$native" dist/fedpeft-edge-aarch64/bin/edge-client dist/fedpeft-edge-armv7/bin/edge-client; do
    [ -f "$b" ] || { echo "measure: $b missing (see the usage above)" >&2; exit 1; }
  done
  lib_native=$PWD/models/build/onnxruntime/libonnxruntime.so.1.31.1
  lib_arm=$(scripts/cross/onnxruntime-aarch64.sh)
  echo "| target | runtime | stripped binary | cache | joined after | round done, exited after | peak RSS |"
  echo "| --- | --- | ---: | --- | ---: | ---: | ---: |"
  while read -r arch runtime bin lib; do
    cache=$(mktemp -d)
    for start in empty filled; do
      line=$(ORT_DYLIB_PATH=$lib scripts/cross/measure.sh "$bin" "$arch" "$runtime" "$cache" | tail -1)
      # measure: ARCH RUNTIME NAME: binary N bytes; joined after J s; ... after E s; peak RSS R MiB
      read -r size join end rss < <(sed -E 's/.*binary ([0-9]+) bytes; joined after ([0-9.]+) s; .* after ([0-9.]+) s; peak RSS ([0-9.]+) MiB/\1 \2 \3 \4/' <<<"$line")
      printf '| %s | %s | %.2f MB (%s bytes) | %s | %s s | %s s | %s MiB |\n' "$arch" "$runtime" \
        "$(echo "$size / 1000000" | bc -l)" "$size" "$start" "$join" "$end" "$rss"
    done
    rm -rf "$cache"
  done <<ROWS
native tract $native $lib_native
native ort $native $lib_native
aarch64 tract dist/fedpeft-edge-aarch64/bin/edge-client $lib_arm
aarch64 ort dist/fedpeft-edge-aarch64/bin/edge-client $lib_arm
armv7 tract dist/fedpeft-edge-armv7/bin/edge-client -
ROWS
  exit 0
fi
bin=${1:?usage: measure.sh BINARY native|aarch64|armv7 tract|ort [CACHE_DIR] | measure.sh table}
arch=${2:?}; runtime=${3:?}
tmp=$(mktemp -d)
cache=${4:-$tmp/cache}
agg=${AGGREGATOR:-$out/debug/aggregator}
model=${MODEL:-efficientnet-lite0}
size=${IMAGE_SIZE:-96}
max_examples=${MAX_EXAMPLES:-500}
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
backbone = "models/build/$model"
peft = "lora"
image_size = $size
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
  --fleet measure --run-id 1 --client-id m-01 --model-dir "models/build/$model" --image-size "$size" \
  --runtime "$runtime" --peft lora --partition dirichlet --num-clients 8 --client-index 0 \
  --max-examples "$max_examples" --cache-dir "$cache" >"$tmp/edge.log" 2>&1 &
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
