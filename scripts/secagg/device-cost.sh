#!/usr/bin/env bash
# What a device's side of a SecAgg+ round costs in CPU time, stage by stage
# (docs/src/results/secure-aggregation.md, "CPU time on a device"): the example
# secagg/examples/device_cost.rs runs one device among n real clients (its k neighbours deal it
# real shares; only the device's calls are timed) for the input of LoRA r 8 on EfficientNet-Lite0
# (1 + 25 610 values), m = 16, clip 0.25, at n = 8, 64 and 1 000 clients with the aggregator's
# default k and t (k = 6, 12, 20; t = 4, 7, 11). With distributed DP ([dp]) the device also adds
# discrete Gaussian noise to its input: timed apart (σ = NOISE_STEPS quantization steps, default
# 300; 0 skips it), not in the totals.
# Builds the example natively and for aarch64 and armv7 (cross/config.toml) with [profile.edge]
# (what the board bundles are built with) and [profile.release], runs it natively and under qemu
# user-mode (cross/qemu-run: Cortex-A72 on aarch64), times the aggregator's side of the same
# rounds natively, and prints each run's table and a summary (median CPU ms per stage).
#   scripts/secagg/device-cost.sh [REPS]   (default 11 repetitions per run)
# SIZES (default "8 64 1000") picks n; LEN (default 25611) the input length; ARMV7=0 skips
# armv7; SERVER=0 skips the aggregator's side (1 000 clients take minutes of untimed client work).
# Needs the cross linkers and qemu (scripts/cross/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=${1:-11}
sizes=${SIZES:-8 64 1000}
len=${LEN:-25611}
out=${CARGO_TARGET_DIR:-target}
targets=(aarch64-unknown-linux-gnu)
[ "${ARMV7:-1}" = 0 ] || targets+=(armv7-unknown-linux-gnueabihf)
scripts/cross/setup.sh "${targets[@]}" >/dev/null
target_args=()
for t in "${targets[@]}"; do target_args+=(--target "$t"); done
for profile in edge release; do
  nice -n 10 cargo build -q --profile "$profile" -p fedpeft-secagg --example device_cost
  nice -n 10 cargo build -q --config cross/config.toml "${target_args[@]}" --profile "$profile" \
    -p fedpeft-secagg --example device_cost
done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "device-cost: $(date -u '+%Y-%m-%d %H:%M UTC'), working tree on top of $(git rev-parse --short HEAD)"
echo "device-cost: load before: $(uptime)"
run() { # NAME ARCH PROFILE N [EXTRA ARGS...]
  local name=$1 arch=$2 profile=$3 n=$4; shift 4
  local bin runner=()
  case $arch in
    native) bin=$out/$profile/examples/device_cost ;;
    aarch64) bin=$out/aarch64-unknown-linux-gnu/$profile/examples/device_cost; runner=(cross/qemu-run aarch64) ;;
    armv7) bin=$out/armv7-unknown-linux-gnueabihf/$profile/examples/device_cost; runner=(cross/qemu-run armv7) ;;
  esac
  echo
  echo "## $name, n = $n ($(uptime | sed 's/.*load average/load average/'))"
  "${runner[@]}" "$bin" --n "$n" --len "$len" --reps "$reps" --noise-steps "${NOISE_STEPS:-300}" "$@" \
    | tee "$tmp/$name-$n.txt"
}
for n in $sizes; do
  run native-edge native edge "$n"
  run native-release native release "$n"
  run aarch64-edge aarch64 edge "$n"
  run aarch64-release aarch64 release "$n"
  [ "${ARMV7:-1}" = 0 ] || run armv7-edge armv7 edge "$n"
done
if [ "${SERVER:-1}" != 0 ]; then
  for n in $sizes; do
    # The aggregator runs on a server: natively, [profile.release]. Fewer repetitions at large n
    # (every client's untimed share and mask work is in each).
    server_reps=$(( n >= 500 ? 1 : (n >= 50 ? 3 : 5) ))
    run server native release "$n" --server-reps "$server_reps"
  done
fi
echo
echo "device-cost: load after: $(uptime)"
echo
echo "## Summary: the device's median CPU ms per stage"
python3 - "$tmp" "$sizes" <<'PY'
import glob, os, re, sys
tmp, sizes = sys.argv[1], sys.argv[2].split()
runs = ["native-edge", "native-release", "aarch64-edge", "aarch64-release", "armv7-edge"]
tables = {}
for path in glob.glob(f"{tmp}/*.txt"):
    name, n = os.path.basename(path)[:-4].rsplit("-", 1)
    if name == "server":
        continue
    rows = []
    for line in open(path):
        m = re.match(r"\| (.+?) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    tables[(name, n)] = rows
stages = [("keys", "keys:"), ("share", "share:"), ("check_keys over all n (apart)", "(RosterEntry::check_keys over all n"),
          ("quantize", "quantize"), ("[dp] only: add_discrete_gaussian", "(with [dp]"),
          ("masked_input", "masked_input"), ("pack", "pack"),
          ("masked-input stage", "= masked-input"), ("unmask", "unmask:"),
          ("device total", "= device total")]
for n in sizes:
    have = [r for r in runs if (r, n) in tables]
    print(f"\nn = {n}\n")
    print("| stage | " + " | ".join(have) + " |")
    print("| --- |" + " ---: |" * len(have))
    for label, prefix in stages:
        cells = [next((v for k, v in tables[(r, n)] if k.startswith(prefix)), "-") for r in have]
        print(f"| {label} | " + " | ".join(cells) + " |")
PY
