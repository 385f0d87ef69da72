#!/usr/bin/env bash
# The monitor's cost to a run (docs/src/guide/monitoring.md): the same trial twice, without
# and with `[monitor]` — with it, DASHBOARDS connections follow /api/events and /metrics is
# scraped every second throughout — and for each the rounds' wall time (report.json) and, with
# the monitor, the aggregator's own account of the time it spent building snapshots.
#   scripts/monitor/overhead.sh [TRIAL] [DASHBOARDS]   (default trials/quickstart.toml, 4)
# Needs the release binaries (cargo build --release --bins) and curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
trial=${1:-trials/quickstart.toml}; dashboards=${2:-4}
bin=${CARGO_TARGET_DIR:-target}/release
tmp=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cp "$trial" "$tmp/off.toml"
{ cat "$trial"; printf '\n[monitor]\nlisten = "127.0.0.1:%s"\n' "$port"; } > "$tmp/on.toml"
summary() {
  python3 - "$1/report.json" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
d = [x["duration_ms"] / 1000 for x in r["rounds"] if x["round"] > 0]
print(f"| {sys.argv[2]} | {len(d)} | {sum(d)/len(d):.2f} | {min(d):.2f} | {max(d):.2f} |")
PY
}
echo "| monitor | rounds | mean round s | min | max |"
echo "| --- | ---: | ---: | ---: | ---: |"
"$bin/fedpeft-fleet" run "$tmp/off.toml" --out "$tmp/off" >"$tmp/off.log" 2>&1
summary "$tmp/off" "off"
"$bin/fedpeft-fleet" run "$tmp/on.toml" --out "$tmp/on" >"$tmp/on.log" 2>&1 &
fleet=$!
until curl -sf "http://127.0.0.1:$port/api/state" >/dev/null; do sleep 0.2; kill -0 $fleet || exit 1; done
for _ in $(seq "$dashboards"); do curl -sN "http://127.0.0.1:$port/api/events" >/dev/null & done
while kill -0 $fleet 2>/dev/null; do curl -sf "http://127.0.0.1:$port/metrics" >/dev/null || true; sleep 1; done
wait $fleet
summary "$tmp/on" "on ($dashboards dashboards, /metrics every s)"
grep -h "building snapshots" "$tmp/on/logs/aggregator.log" | sed 's/^/  /'
