#!/usr/bin/env bash
# `make test-cross`: the edge client's tests on the boards' architectures, under qemu user-mode.
# For aarch64 and armv7: build the edge client's library, binary and test binaries (tract only,
# debug profile), run them all under qemu (cross/qemu-run): unit tests, the broker tests and
# one round on the real EfficientNet-Lite0 trunk (tests/real_trunk.rs); then pack that binary
# as a board bundle and check its install into a scratch root and its systemd unit.
set -euo pipefail
cd "$(dirname "$0")/../.."
targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
scripts/cross/setup.sh "${targets[@]}"
start=$SECONDS
for triple in "${targets[@]}"; do
  t0=$SECONDS
  echo "test-cross: $triple"
  cargo test --config cross/config.toml --target "$triple" -p fedpeft-edge \
    --no-default-features --lib --bins --tests --no-fail-fast
  board=${triple%%-*}
  export BUNDLE_DIST=dist/test
  BUNDLE_PROFILE=dev BUNDLE_FEATURES=--no-default-features scripts/cross/bundle.sh "$board" >/dev/null
  scripts/cross/check-bundle.sh "$board"
  echo "test-cross: $triple done in $((SECONDS - t0)) s"
done
echo "test-cross: both targets in $((SECONDS - start)) s"
