#!/usr/bin/env bash
# Installs what fedpeft needs on a fresh Debian 12 machine. Idempotent: safe to run every time.
#   scripts/setup.sh            system packages + Rust targets for building and testing
set -euo pipefail

# chromium and prometheus (for promtool): the monitor's test opens the dashboard in a real
# browser and checks /metrics with Prometheus' own parser. nats-server: the broker cluster's
# test (tests/tests/cluster.rs) runs a fleet on three nodes of it.
need_apt=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in build-essential pkg-config python3 python3-venv python3-pip python3-torch \
           dataset-fashion-mnist mosquitto nats-server iproute2 fonts-dejavu-core nodejs npm \
           chromium prometheus; do
  have_pkg "$pkg" || need_apt+=("$pkg")
done
# Node may come from elsewhere than Debian (e.g. a preinstalled toolchain): only ask apt for it if missing.
if command -v node >/dev/null && command -v npm >/dev/null; then
  tmp=(); for p in "${need_apt[@]}"; do [[ "$p" == nodejs || "$p" == npm ]] || tmp+=("$p"); done
  need_apt=("${tmp[@]}")
fi
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
# The protocol crate is checked on a bare-metal target to keep it no_std.
rustup target list --installed | grep -q '^thumbv7em-none-eabihf$' || rustup target add thumbv7em-none-eabihf

# The book (`make book`, part of `make test`): mdbook from crates.io, pinned, without its
# live-reload server (`serve`, `watch`); search stays in.
MDBOOK_VERSION=0.5.4
if [ "$(mdbook --version 2>/dev/null)" != "mdbook v$MDBOOK_VERSION" ]; then
  echo "setup: installing mdbook $MDBOOK_VERSION (cargo install, a few minutes)"
  cargo install mdbook --locked --version "$MDBOOK_VERSION" --no-default-features --features search
fi
