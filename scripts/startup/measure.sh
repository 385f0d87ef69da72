#!/usr/bin/env bash
# The figures on the book's results page "Client start-up" (docs/src/results/start-up.md): how
# long an edge client takes from its process starting to its MQTT connection (from then on it is
# ready to train), for one client alone and for every client of a 64-client trial, with where
# the time went.
#   scripts/startup/measure.sh fleet [LABEL]    a short 64-client trial (sweeps/fedpeft.toml's
#                                               vision settings: EfficientNet-Lite0 at 96 px,
#                                               Dirichlet 0.5 over Fashion-MNIST, shared
#                                               activation cache; head, 1 round of 1 epoch),
#                                               its wall time and each client's start-up
#   scripts/startup/measure.sh alone [LABEL]    client 5 of the same 64-way split started on its
#                                               own against a Mosquitto broker, RUNS times
#   scripts/startup/measure.sh alone-cold [LABEL]  the same, the data set's decoded copy
#                                               (<cache dir>/datasets) removed before each run
#   scripts/startup/measure.sh report LABEL     the tables again from an earlier run's logs
# BIN (default ${CARGO_TARGET_DIR:-target}/release) holds fedpeft-fleet, aggregator and
# edge-client; CACHE_DIR (default data/cache/activations, the trials' own) must hold the
# whole-set activations already, or the first client runs the trunk over 60 000 images (the
# first `fleet` run does it once). CLIENTS (64), RUNS (5), OUT (runs/startup) as named.
# Every client is started through a wrapper that notes the time just before it execs the real
# edge-client; its log's lines `starting`, `local images read` (`opened` from the decoded
# copy), `local shard`, `trunk activations ready`, `local training ready` (absent before that
# line existed) and `connected` mark the phases.
# Prints `uptime` before each run and a markdown table per run (also in OUT/LABEL/result.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:?usage: measure.sh fleet|alone|alone-cold|report [LABEL]}
label=${2:-$mode}
bin=$(realpath -m "${BIN:-${CARGO_TARGET_DIR:-target}/release}")
cache=${CACHE_DIR:-data/cache/activations}
clients=${CLIENTS:-64}
runs=${RUNS:-5}
out=${OUT:-runs/startup}/$label
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/models/build/onnxruntime/libonnxruntime.so.1.31.1}
if [ "$mode" != report ]; then
  rm -rf "$out"; mkdir -p "$out/bin"
  exec > >(tee "$out/result.txt") 2>&1
  # The fleet finds its aggregator and edge-client beside its own executable (resolved
  # through symlinks), hence a copy of it beside the wrapper.
  cp "$bin/fedpeft-fleet" "$out/bin/fedpeft-fleet"
  ln -s "$bin/aggregator" "$out/bin/aggregator"
  cat >"$out/bin/edge-client" <<SH
#!/usr/bin/env bash
id=?; prev=
for a in "\$@"; do [ "\$prev" = --client-id ] && id=\$a; prev=\$a; done
echo "\$EPOCHREALTIME \$id" >>"$PWD/$out/spawned.log"
exec "$bin/edge-client" "\$@"
SH
  chmod +x "$out/bin/edge-client"
fi

# Per client: spawn -> `starting` -> `local training ready` -> `connected`, and the phases.
report() {
  python3 - "$out" "$1" <<'PY'
import datetime, glob, os, re, statistics, sys
out, logs = sys.argv[1], sys.argv[2]
spawned = {}
for line in open(os.path.join(out, "spawned.log")):
    t, cid = line.split()
    spawned.setdefault(cid, float(t))
def ts(line):
    return datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc).timestamp()
def field(line, key):
    m = re.search(rf"\b{key}=([0-9]+)", line)
    return int(m.group(1)) if m else None
rows = []
for path in sorted(glob.glob(os.path.join(logs, "client-*.log"))):
    cid = os.path.basename(path)[:-4]
    r = {"id": cid}
    for line in open(path, errors="replace"):
        if " starting " in line and "start" not in r:
            r["start"] = ts(line)
        elif "local images read" in line or "local images opened" in line:
            r["images"] = ts(line)
        elif "local shard" in line:
            r["shard"] = ts(line)
        elif "trunk activations ready" in line:
            r["acts"] = ts(line)
        elif "local training ready" in line:
            r["ready"] = ts(line)
            r["tail_ms"] = field(line, "tail_ms")
        elif " connected " in line and "connected" not in r:
            r["connected"] = ts(line)
    if cid in spawned and all(k in r for k in ("start", "images", "shard", "acts", "connected")):
        r["spawn"] = spawned[cid]
        rows.append(r)
if not rows:
    sys.exit("no client reached `connected`")
def ms(a, b):
    return (b - a) * 1000
# Phases between log lines (the same lines in both builds), and the tail's share of the last.
cols = [
    ("process start: exec -> `starting`", lambda r: ms(r["spawn"], r["start"])),
    ("backbone manifest, data set: -> `local images read`/`opened`", lambda r: ms(r["start"], r["images"])),
    ("partition: -> `local shard`", lambda r: ms(r["images"], r["shard"])),
    ("cache key (whole-set hash) and activations: -> `trunk activations ready`",
     lambda r: ms(r["shard"], r["acts"])),
    ("tail and MQTT connect: -> `connected`", lambda r: ms(r["acts"], r["connected"])),
    ("... of which the tail (`local training ready` tail_ms)", lambda r: r.get("tail_ms")),
    ("... of which MQTT connect (`local training ready` -> `connected`)",
     lambda r: ms(r["ready"], r["connected"]) if "ready" in r else None),
    ("**start-up: exec -> `connected`**", lambda r: ms(r["spawn"], r["connected"])),
]
def summary(rs, name):
    print(f"\n{name}: {len(rs)} client(s); ms, median (min–max)\n")
    print("| phase | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for title, f in cols:
        v = [x for x in (f(r) for r in rs) if x is not None]
        if v:
            print(f"| {title} | {statistics.median(v):.0f} | {min(v):.0f} | {max(v):.0f} |")
        else:
            print(f"| {title} | — | — | — |")
first = [r for r in rows if r["id"] == "client-00"]
rest = [r for r in rows if r["id"] != "client-00"]
if first and rest:
    summary(first, "client-00 (starts alone; fills or finds the shared activations)")
    summary(rest, "the other clients (started together once client-00's activations are there)")
    a = min(r["spawn"] for r in rest)
    b = max(r["connected"] for r in rest)
    print(f"\nfirst of them started -> last of them connected: {b - a:.2f} s")
else:
    summary(rows, "runs")
PY
}

case $mode in
fleet)
  cat >"$out/trial.toml" <<TOML
# sweeps/fedpeft.toml's vision trials, cut to 1 round of 1 epoch (head): start-up dominates.
name = "startup"
rounds = 1
clients = $clients
fraction = 0.125
min_clients = 8
round_timeout_secs = 600
seed = 42
shared_cache = true
cache_dir = "$cache"

[model]
backbone = "models/build/efficientnet-lite0"
peft = "head"
runtime = "auto"
image_size = 96
eval_examples = 2000

[data]
dataset = "fashion-mnist"
partition = "dirichlet"
alpha = 0.5

[local]
epochs = 1
batch_size = 64
learning_rate = 0.1
optimizer = "sgd"
update_dtype = "int8"
TOML
  echo "uptime: $(uptime)"
  /usr/bin/time -f "trial wall time: %e s (fedpeft-fleet run, /usr/bin/time)" \
    "$out/bin/fedpeft-fleet" run "$out/trial.toml" --out "$out/run" 2>&1 \
    | grep -E "^fleet: shared|wall time" || true
  report "$out/run/logs"
  ;;
alone | alone-cold)
  mkdir -p "$out/logs"
  for run in $(seq "$runs"); do
    [ "$mode" = alone-cold ] && rm -rf "$cache/datasets"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mosquitto -p "$port" >"$out/mosquitto.log" 2>&1 &
    broker=$!
    sleep 0.3
    echo "uptime before run $run: $(uptime)"
    log=$out/logs/client-$(printf %02d "$run").log
    "$out/bin/edge-client" --broker "mqtt://127.0.0.1:$port" --fleet startup --client-id "client-$(printf %02d "$run")" \
      --run-id 1 --model-dir models/build/efficientnet-lite0 --runtime auto --peft head --image-size 96 \
      --dataset fashion-mnist --partition dirichlet --alpha 0.5 --num-clients "$clients" --client-index 5 \
      --seed 42 --max-packet-bytes 65536 --cache-dir "$cache" --cache-shared 2>"$log" &
    client=$!
    for _ in $(seq 600); do grep -q " connected " "$log" && break; sleep 0.1; done
    kill "$client" "$broker" 2>/dev/null || true
    wait "$client" "$broker" 2>/dev/null || true
  done
  report "$out/logs"
  ;;
report)
  # The tables again from an earlier run's logs: measure.sh report LABEL
  if [ -d "$out/run/logs" ]; then report "$out/run/logs"; else report "$out/logs"; fi
  ;;
*) echo "measure.sh: unknown mode $mode" >&2; exit 2 ;;
esac
