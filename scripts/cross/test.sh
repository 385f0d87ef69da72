#!/usr/bin/env bash
# `make test-cross` (part of `make test`): the edge client on the boards' architectures, under
# qemu user-mode, for aarch64 and armv7 (tract only, [profile.cross-test]):
#   1. build `edge-client` for both targets (one cargo run: host build scripts and proc-macros
#      are built once, the two targets' crates in parallel);
#   2. run the edge client's unit tests and tests/board_config.rs on both under qemu;
#   3. tests/tests/board.rs: each board binary under qemu joins the host's aggregator and its
#      embedded rumqttd on loopback and trains one round on the real EfficientNet-Lite0 trunk
#      (tract, emulated) over real Fashion-MNIST; the update must be accepted and the new global
#      must equal FedAvg over it (both boards at once);
#   4. pack each board's bundle with that binary, install it into a scratch root (DESTDIR) and
#      check the systemd unit with `systemd-analyze verify` (scripts/cross/check-bundle.sh).
# The in-process broker tests (tests/broker.rs, tests/real_trunk.rs; feature `broker-tests`)
# run on the host in `make test`; CROSS_BROKER_TESTS=1 builds and runs them on the boards too.
set -euo pipefail
cd "$(dirname "$0")/../.."
targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
profile=cross-test
scripts/cross/setup.sh "${targets[@]}"
start=$SECONDS
target_args=()
for t in "${targets[@]}"; do target_args+=(--target "$t"); done
cross=(--config cross/config.toml "${target_args[@]}" --profile "$profile" -p fedpeft-edge
       --no-default-features)
out=${CARGO_TARGET_DIR:-target}

echo "test-cross: building edge-client for ${targets[*]}"
cargo build "${cross[@]}" --bin edge-client
echo "test-cross: built in $((SECONDS - start)) s"

t0=$SECONDS
tests=(--lib --test board_config)
if [ "${CROSS_BROKER_TESTS:-0}" = 1 ]; then
  cross+=(--features broker-tests)
  tests=(--lib --tests)
fi
cargo test "${cross[@]}" "${tests[@]}" --no-fail-fast
echo "test-cross: edge-client tests under qemu in $((SECONDS - t0)) s"

# The host side: the aggregator binary and the test (what `make test` builds anyway; the whole
# workspace, so the features and thus the build are the same ones).
t0=$SECONDS
export FEDPEFT_BOARD_CLIENT_AARCH64=$out/aarch64-unknown-linux-gnu/$profile/edge-client
export FEDPEFT_BOARD_CLIENT_ARMV7=$out/armv7-unknown-linux-gnueabihf/$profile/edge-client
cargo build --workspace --bins
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --test board --run-ignored only --no-fail-fast
else
  cargo test --workspace --test board --no-fail-fast -- --ignored
fi
echo "test-cross: a round on each board under qemu in $((SECONDS - t0)) s"

export BUNDLE_DIST=dist/test
for board in aarch64 armv7; do
  BUNDLE_PROFILE=$profile BUNDLE_FEATURES=--no-default-features \
    scripts/cross/bundle.sh "$board" >/dev/null
  scripts/cross/check-bundle.sh "$board"
done
echo "test-cross: both targets in $((SECONDS - start)) s"
