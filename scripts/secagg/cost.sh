#!/usr/bin/env bash
# What secure aggregation costs a round (docs/src/results/secure-aggregation.md): the same
# trial (trials/secure.toml: LoRA r 8 on EfficientNet-Lite0, int8 updates in the plain run)
# with CLIENTS clients, all sampled, once plain and once with SecAgg+, on the embedded broker.
# Prints per client and round: bytes up and down (MQTT framing included, from report.json),
# the ratio, the wall time of each secure stage, and the time those bytes and message legs
# take on the NB-IoT and LTE-M link presets (computed, not emulated).
#   scripts/secagg/cost.sh [CLIENTS] [ROUNDS]   (default 8 clients, 3 rounds)
# Needs the release binaries (cargo build --release --bins).
set -euo pipefail
cd "$(dirname "$0")/../.."
clients=${1:-8}; rounds=${2:-3}
bin=${CARGO_TARGET_DIR:-target}/release
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 - "$clients" "$rounds" "$tmp" <<'PY'
import re, sys
clients, rounds, tmp = sys.argv[1:4]
text = open("trials/secure.toml").read()
text = re.sub(r"(?m)^clients = \d+", f"clients = {clients}", text)
text = re.sub(r"(?m)^min_clients = \d+", f"min_clients = {clients}", text)
text = re.sub(r"(?m)^quorum = \d+", f"quorum = {max(3, int(clients) * 3 // 4)}", text)
text = re.sub(r"(?m)^rounds = \d+", f"rounds = {rounds}", text)
text = re.sub(r"(?m)^max_examples = \d+", "max_examples = 200", text)
text = re.sub(r"(?m)^eval_examples = \d+", "eval_examples = 500", text)
# k and t from the defaults (2 log2 n, a majority), so 64 clients get a sparse graph.
text = re.sub(r"(?ms)^\[secure_aggregation\].*?(?=^\[model\])", "[secure_aggregation]\nmodulus_bits = 16\nclip = 0.25\n\n", text)
open(f"{tmp}/secure.toml", "w").write(text.replace('name = "secure"', 'name = "secure-on"'))
plain = re.sub(r"(?ms)^\[secure_aggregation\].*?(?=^\[model\])", "", text)
open(f"{tmp}/plain.toml", "w").write(plain.replace('name = "secure"', 'name = "secure-off"'))
PY
for v in plain secure; do
  /usr/bin/time -f "$v: %e s wall" "$bin/fedpeft-fleet" run "$tmp/$v.toml" --out "$tmp/$v" >"$tmp/$v.log" 2>&1 \
    || { tail -30 "$tmp/$v.log"; exit 1; }
  tail -1 "$tmp/$v.log"
done
python3 - "$tmp" "$clients" <<'PY'
import json, statistics, sys
tmp, n = sys.argv[1], int(sys.argv[2])
def load(v):
    r = json.load(open(f"{tmp}/{v}/report.json"))
    rows = [x for x in r["rounds"] if x["round"] > 0]
    ok = [x for x in rows if x["status"] == "ok"]
    up = statistics.mean(x["traffic"]["up_bytes"] / len(x["sampled"]) for x in ok)
    down = statistics.mean(x["traffic"]["down_bytes"] / len(x["sampled"]) for x in ok)
    acc = (rows[-1].get("eval_accuracy"), rows[-1].get("eval_loss"))
    return r, ok, up, down, acc
_, pok, pup, pdown, pacc = load("plain")
sr, sok, sup, sdown, sacc = load("secure")
links = {"nb-iot": (60.0, 30.0, 800.0), "lte-m": (375.0, 300.0, 75.0)}
# One-way legs per round on the client's link: plain = global + announcement down, update up;
# secure adds keys up, roster down, shares up, relay down, masked up, unmask down, reveal up.
legs = {"plain": 3, "secure": 9}
print(f"| {n} clients | up B/client/round | down B/client/round | total | nb-iot s | lte-m s | final accuracy | final loss |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, up, down, acc in (("plain int8", pup, pdown, pacc), ("SecAgg+", sup, sdown, sacc)):
    key = "plain" if name.startswith("plain") else "secure"
    t = {k: up * 8 / (u * 1000) + down * 8 / (d * 1000) + legs[key] * lat / 1000 for k, (u, d, lat) in links.items()}
    a = f"{acc[0] * 100:.2f} %" if acc[0] is not None else "-"
    loss = f"{acc[1]:.5f}" if acc[1] is not None else "-"
    print(f"| {name} | {up:,.0f} | {down:,.0f} | {up + down:,.0f} | {t['nb-iot']:.1f} | {t['lte-m']:.1f} | {a} | {loss} |")
print(f"\nratio secure / plain: up {sup / pup:.2f}x, down {sdown / pdown:.2f}x, total {(sup + sdown) / (pup + pdown):.2f}x")
sec = [x["secure"] for x in sok]
k, t, m = sec[0]["neighbours"], sec[0]["threshold"], sec[0]["modulus_bits"]
print(f"k = {k}, t = {t}, m = {m}; ok rounds: plain {len(pok)}, secure {len(sok)}")
for i, name in enumerate(["keys (incl. training)", "shares", "masked input", "unmasking"]):
    print(f"  stage {name}: median {statistics.median(s['stage_ms'][i] for s in sec):.0f} ms")
print(f"  round wall time: plain median {statistics.median(x['duration_ms'] for x in pok):.0f} ms, "
      f"secure median {statistics.median(x['duration_ms'] for x in sok):.0f} ms")
PY
