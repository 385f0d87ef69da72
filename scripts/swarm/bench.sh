#!/usr/bin/env bash
# Swarm benchmark (issue 24): the release aggregator against `fedpeft-fleet swarm`, N virtual
# clients sampled every round, updates in int8 and f32, over the aggregator's embedded broker
# and over Mosquitto. Per run: round wall time, updates ingested per second, the aggregator's
# peak RSS (VmHWM) and CPU (utime + stime from /proc), the broker's CPU (Mosquitto's process;
# the embedded broker runs inside the aggregator's process, so its CPU and memory are in the
# aggregator's figures), the swarm's own CPU and memory per session. Then
# `fedpeft-fleet swarm --summarize` writes results.md / .csv / .json and the plots.
#
#   scripts/swarm/bench.sh                      # the whole matrix (long: the 10 000 runs)
#   NS="100 1000" BROKERS=mosquitto scripts/swarm/bench.sh
#   BAD="0 0.1" NS=1000 DTYPES=int8 scripts/swarm/bench.sh   # bad input against a clean run
#
# Settings (environment): NS, DTYPES (int8 f32), BROKERS (embedded mosquitto), BAD (bad
# fractions, default 0), ROUNDS (3), OUT (runs/swarm-bench), TEMPLATE (a run folder with
# globals/; default: made by a one-client quick-start trial in $OUT/template), CHUNK (update
# chunk size, 65536 as the quick start's packets), MAX_UPDATE (aggregator's max_update_bytes,
# 524288), CONNECT_RATE (500/s), ROUND_TIMEOUT (seconds, 1800), SWARM_THREADS (1),
# AGG_OUT_TMPFS (1: the aggregator's output folder, checkpoints included, on /dev/shm),
# MOSQ_INFLIGHT (Mosquitto's max_inflight_messages, 100: see below), TRAIN_MS (the swarm's
# --train-ms: 0 sends every update at once, the hardest burst), STRATEGY (fedavg; the
# swarm's exact check is FedAvg's, so another strategy's rounds are reported as failed checks),
# BIND (source addresses for the swarm, comma-separated; default: chosen when the ephemeral
# ports could run out), KEEP_LOGS (1: keep the aggregator's log).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
NS=${NS:-"100 1000 10000"}
DTYPES=${DTYPES:-"int8 f32"}
BROKERS=${BROKERS:-"embedded mosquitto"}
BAD=${BAD:-0}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-$ROOT/runs/swarm-bench}
CHUNK=${CHUNK:-65536}
MAX_UPDATE=${MAX_UPDATE:-524288}
CONNECT_RATE=${CONNECT_RATE:-500}
ROUND_TIMEOUT=${ROUND_TIMEOUT:-1800}
SWARM_THREADS=${SWARM_THREADS:-1}
AGG_OUT_TMPFS=${AGG_OUT_TMPFS:-0}
MOSQ_INFLIGHT=${MOSQ_INFLIGHT:-100}
TRAIN_MS=${TRAIN_MS:-0}
STRATEGY=${STRATEGY:-fedavg}
MAX_PACKET=1048576

say() { printf 'bench: %s\n' "$*"; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

for bin in aggregator fedpeft-fleet edge-client; do
  [[ -x $TARGET/$bin ]] || die "$TARGET/$bin is missing: cargo build --release --bins first"
done
if [[ $BROKERS == *mosquitto* ]]; then
  MOSQUITTO=$(command -v mosquitto || true)
  [[ -n $MOSQUITTO ]] || MOSQUITTO=/usr/sbin/mosquitto
  [[ -x $MOSQUITTO ]] || die "mosquitto is not installed (Debian: apt-get install mosquitto)"
fi
mkdir -p "$OUT"

# --- OS limits -------------------------------------------------------------------------------
max_n=0
for n in $NS; do if (( n > max_n )); then max_n=$n; fi; done
# Every virtual client is one socket in the swarm and one in the broker (the embedded broker's
# are the aggregator's), plus each process's own files.
need=$(( max_n + 1024 ))
soft=$(ulimit -Sn); hard=$(ulimit -Hn)
if [[ $soft != unlimited ]] && (( soft < need )); then
  if [[ $hard == unlimited ]] || (( hard >= need )); then
    say "raising the open-file limit from $soft to $need (ulimit -n): each of the $max_n virtual clients is a socket in the swarm and another in the broker"
    ulimit -n "$need"
  else
    die "$max_n clients need $need open files per process; the hard limit is $hard: raise it (limits.conf / LimitNOFILE=) and run again"
  fi
else
  say "open-file limit $soft is enough for $max_n clients ($need needed: a socket each in the swarm and in the broker)"
fi
read -r port_lo port_hi < /proc/sys/net/ipv4/ip_local_port_range
ports=$(( port_hi - port_lo + 1 ))
if [[ -z ${BIND:-} ]] && (( max_n * 2 > ports )); then
  # One source address gives one ephemeral port range towards the broker's address; TIME_WAIT
  # sockets of the previous run still hold theirs. Every 127.x.y.z is loopback on Linux.
  k=$(( (max_n * 2 + ports - 1) / ports + 1 ))
  BIND=$(seq -s, -f '127.0.0.%g' 2 $(( k + 1 )))
  say "$max_n sessions could exhaust the $ports ephemeral ports ($port_lo-$port_hi) of one source address: connecting from $BIND"
fi

free_port() {
  python3 - <<'EOF'
import random, socket
for _ in range(200):
    p = random.randint(20000, 31999)
    try:
        s = socket.socket(); s.bind(("127.0.0.1", p)); s.close(); print(p); break
    except OSError:
        pass
EOF
}

# --- the template: a real client's update ------------------------------------------------------
if [[ -z ${TEMPLATE:-} ]]; then
  TEMPLATE=$OUT/template
  if [[ ! -f $TEMPLATE/globals/index.json ]]; then
    say "making the template: a one-client LoRA r 8 trial (its round-1 global minus round 0 is that client's update)"
    sed -e 's/^name = .*/name = "swarm-template"/' -e 's/^rounds = .*/rounds = 1/' \
        -e 's/^clients = .*/clients = 1/' -e 's/^min_clients = .*/min_clients = 1/' \
        -e 's/^quorum = .*/quorum = 1/' "$ROOT/trials/quickstart.toml" > "$OUT/template.toml"
    (cd "$ROOT" && "$TARGET/fedpeft-fleet" run "$OUT/template.toml" --out "$TEMPLATE" > "$OUT/template.log" 2>&1) \
      || die "the template trial failed: see $OUT/template.log"
  fi
fi
LAYOUT=$("$TARGET/fedpeft-fleet" swarm --template "$TEMPLATE" --print-layout)

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: $COMMIT$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' + working tree')"
  echo "machine: $(nproc) cores, $(free -m | awk '/Mem:/ {print $2}') MiB; $(uname -sr)"
  echo "settings: NS=$NS DTYPES=$DTYPES BROKERS=$BROKERS BAD=$BAD ROUNDS=$ROUNDS CHUNK=$CHUNK MAX_UPDATE=$MAX_UPDATE CONNECT_RATE=$CONNECT_RATE AGG_OUT_TMPFS=$AGG_OUT_TMPFS MOSQ_INFLIGHT=$MOSQ_INFLIGHT TRAIN_MS=$TRAIN_MS STRATEGY=$STRATEGY BIND=${BIND:-}"
} > "$OUT/machine.txt"

MPID=""; APID=""
cleanup() {
  if [[ -n $APID ]]; then kill "$APID" 2>/dev/null || true; fi
  if [[ -n $MPID ]]; then kill "$MPID" 2>/dev/null || true; fi
}
trap cleanup EXIT

run_one() {
  local broker=$1 dtype=$2 n=$3 bad=$4
  local name="$broker-$dtype-n$n"
  if [[ $bad != 0 ]]; then name="$name-bad$bad"; fi
  local dir=$OUT/$name
  rm -rf "$dir"; mkdir -p "$dir"
  local out=$dir/out
  if [[ $AGG_OUT_TMPFS == 1 ]]; then
    out=/dev/shm/fedpeft-swarm-bench-$name
    rm -rf "$out"
  fi
  local port run_id=$(( RANDOM * 32768 + RANDOM ))
  port=$(free_port)
  printf '{"broker": "%s", "dtype": "%s", "clients": %d, "bad_fraction": %s, "chunk_bytes": %d, "strategy": "%s", "mosquitto_inflight": %d, "train_ms": %d, "load_before": "%s"}\n' \
    "$broker" "$dtype" "$n" "$bad" "$CHUNK" "$STRATEGY" "$MOSQ_INFLIGHT" "$TRAIN_MS" "$(cut -d' ' -f1-3 /proc/loadavg)" > "$dir/bench.json"
  local broker_table url
  MPID=""
  if [[ $broker == mosquitto ]]; then
    # The default max_queued_messages (1000) caps the aggregator's session queue: the excess
    # of a burst of updates would be discarded. max_inflight_messages bounds what Mosquitto
    # hands the aggregator before its acknowledgements: MQTT 3.1.1 has no receive maximum, so
    # with 0 (unlimited) the whole backlog of a round moves into the aggregator's memory.
    cat > "$dir/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_packet_size $MAX_PACKET
max_connections -1
max_queued_messages 0
max_inflight_messages $MOSQ_INFLIGHT
set_tcp_nodelay true
log_dest file $dir/mosquitto.log
log_type error
log_type warning
EOF
    "$MOSQUITTO" -c "$dir/mosquitto.conf" > /dev/null 2>&1 &
    MPID=$!
    for _ in $(seq 100); do
      python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
      sleep 0.1
    done
    broker_table="url = \"mqtt://127.0.0.1:$port\""
  else
    broker_table=$'url = "embedded"\n'"port = $port"
  fi
  url=mqtt://127.0.0.1:$port
  cat > "$dir/aggregator.toml" <<EOF
fleet = "swarm"
run_id = $run_id
rounds = $ROUNDS
seed = 1
min_clients = $n
fraction = 1.0
quorum = $n
round_timeout_secs = $ROUND_TIMEOUT
max_update_bytes = $MAX_UPDATE

[strategy]
kind = "$STRATEGY"

[local]
update_dtype = "$dtype"

[broker]
$broker_table
max_packet_bytes = $MAX_PACKET

$LAYOUT
[output]
dir = "$out"
resume = false
EOF
  RUST_LOG=${RUST_LOG:-warn} "$TARGET/aggregator" --config "$dir/aggregator.toml" > "$dir/aggregator.log" 2>&1 &
  APID=$!
  for _ in $(seq 600); do
    grep -q "aggregator ready" "$dir/aggregator.log" && break
    kill -0 "$APID" 2>/dev/null || die "$name: the aggregator exited: see $dir/aggregator.log"
    sleep 0.1
  done
  local watch=(--watch "aggregator=$APID")
  if [[ -n $MPID ]]; then watch+=(--watch "mosquitto=$MPID"); fi
  local bind=()
  if [[ -n ${BIND:-} ]]; then bind=(--bind "$BIND"); fi
  say "$name: $n clients, $dtype updates, $broker broker, ${bad} bad"
  local timeout=$(( ROUND_TIMEOUT * (ROUNDS + 1) + n / CONNECT_RATE + 120 ))
  "$TARGET/fedpeft-fleet" swarm --broker "$url" --fleet swarm --run-id "$run_id" \
    --clients "$n" --template "$TEMPLATE" --bad-fraction "$bad" \
    --max-update-bytes "$MAX_UPDATE" --chunk-bytes "$CHUNK" --max-packet-bytes "$MAX_PACKET" \
    --connect-rate "$CONNECT_RATE" --threads "$SWARM_THREADS" --timeout-secs "$timeout" \
    --train-ms "$TRAIN_MS" \
    "${bind[@]}" "${watch[@]}" --report "$dir/swarm.json" --aggregator-report "$out/report.json" \
    2>&1 | tee "$dir/swarm.log" || say "$name: the swarm reported a failure (see $dir/swarm.json)"
  for _ in $(seq 300); do kill -0 "$APID" 2>/dev/null || break; sleep 0.1; done
  kill "$APID" 2>/dev/null || true
  wait "$APID" 2>/dev/null || true
  APID=""
  if [[ -n $MPID ]]; then kill "$MPID" 2>/dev/null || true; wait "$MPID" 2>/dev/null || true; MPID=""; fi
  if [[ $AGG_OUT_TMPFS == 1 ]]; then
    cp "$out/report.json" "$dir/aggregator-report.json" 2>/dev/null || true
    rm -rf "$out"
  fi
  if [[ ${KEEP_LOGS:-0} != 1 ]]; then gzip -f "$dir/aggregator.log"; fi
  printf '%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" > "$dir/load_after.txt"
}

for broker in $BROKERS; do
  for dtype in $DTYPES; do
    for bad in $BAD; do
      for n in $NS; do
        run_one "$broker" "$dtype" "$n" "$bad"
      done
    done
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
"$TARGET/fedpeft-fleet" swarm --summarize "$OUT"
cat "$OUT/results.md"
