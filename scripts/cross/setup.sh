#!/usr/bin/env bash
# Installs what cross-building and emulating the edge client needs, for the targets named:
#   scripts/cross/setup.sh aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
# Debian cross linkers and C libraries, qemu user-mode, systemd-analyze (to check the unit) and
# the Rust standard library of each target. Idempotent, and quick when everything is present:
# it asks apt and rustup only for what is missing.
set -euo pipefail
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

need_apt=()
want=(qemu-user-static systemd)
for triple in "$@"; do
  case $triple in
    aarch64-unknown-linux-gnu) want+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
    armv7-unknown-linux-gnueabihf) want+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    *) echo "cross setup: unsupported target $triple" >&2; exit 2 ;;
  esac
done
for pkg in "${want[@]}"; do have_pkg "$pkg" || need_apt+=("$pkg"); done
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "cross setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

installed=$(rustup target list --installed)
for triple in "$@"; do
  grep -qx "$triple" <<<"$installed" || rustup target add "$triple"
done
