#!/usr/bin/env bash
# Checks a board bundle the way a person installs it: unpack dist/fedpeft-edge-NAME.tar.gz,
# run its install.sh into a scratch root (DESTDIR, and a non-default PREFIX and SYSCONFDIR),
# check every file landed with its placeholders filled, that a second install keeps an edited
# edge.toml, that `systemd-analyze verify` passes the unit (and the Jetson drop-in) without a
# single warning, and that the installed binary runs on the board's architecture (qemu).
#   scripts/cross/check-bundle.sh aarch64|armv7|jetson
set -euo pipefail
cd "$(dirname "$0")/../.."
dist=${BUNDLE_DIST:-dist}   # where bundles go
name=${1:?usage: check-bundle.sh aarch64|armv7|jetson}
case $name in
  aarch64|jetson) arch=aarch64 ;;
  armv7) arch=armv7 ;;
  *) echo "check-bundle: unknown board '$name'" >&2; exit 2 ;;
esac
tarball=$dist/fedpeft-edge-$name.tar.gz
[ -f "$tarball" ] || { echo "check-bundle: $tarball missing (make cross-$name)" >&2; exit 1; }
fail() { echo "check-bundle $name: FAIL: $*" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$tarball" -C "$tmp"
src=$tmp/fedpeft-edge-$name
root=$tmp/root
prefix=/opt/fedpeft
etc=/etc/fedpeft-test
"$src/install.sh" DESTDIR="$root" PREFIX="$prefix" SYSCONFDIR="$etc" >/dev/null

[ -x "$root$prefix/bin/edge-client" ] || fail "binary not installed"
for f in trunk.onnx tail.safetensors manifest.json; do
  cmp -s "$src/models/efficientnet-lite0/$f" "$root$prefix/share/fedpeft/models/efficientnet-lite0/$f" \
    || fail "model file $f not installed intact"
done
unit=$root/etc/systemd/system/fedpeft-edge.service
[ -f "$unit" ] && [ -f "$root$etc/edge.toml" ] || fail "unit or config not installed"
if grep -rq '@[A-Z_]*@' "$unit" "$root$etc" "$root/etc/systemd/system"; then
  fail "placeholders left: $(grep -rho '@[A-Z_]*@' "$unit" "$root$etc" | sort -u | tr '\n' ' ')"
fi
grep -qx "ExecStart=$prefix/bin/edge-client --config $etc/edge.toml" "$unit" || fail "ExecStart does not honour PREFIX/SYSCONFDIR"
grep -qx "dir = \"$prefix/share/fedpeft/models/efficientnet-lite0\"" "$root$etc/edge.toml" || fail "config's model dir does not honour PREFIX"
case $name in
  aarch64)
    [ -f "$root$prefix/lib/fedpeft/libonnxruntime.so.1.31.1" ] || fail "onnxruntime library not installed"
    grep -qx "Environment=ORT_DYLIB_PATH=$prefix/lib/fedpeft/libonnxruntime.so.1.31.1" "$unit" || fail "unit does not name the bundled onnxruntime" ;;
  jetson)
    [ -f "$root/etc/systemd/system/fedpeft-edge.service.d/jetson.conf" ] || fail "Jetson drop-in not installed" ;;
esac

# A second install (an upgrade) keeps the edited config and refreshes the example.
echo "# edited on the board" >>"$root$etc/edge.toml"
"$src/install.sh" DESTDIR="$root" PREFIX="$prefix" SYSCONFDIR="$etc" >/dev/null
grep -q "edited on the board" "$root$etc/edge.toml" || fail "reinstall overwrote edge.toml"

# systemd-analyze resolves the unit's dependencies (sysinit.target, ...) inside --root.
mkdir -p "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
out=$(systemd-analyze verify --root="$root" fedpeft-edge.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify warned: $out"
security=$(systemd-analyze security --offline=yes --root="$root" fedpeft-edge.service 2>&1 | tail -1)

version=$(cross/qemu-run "$arch" "$root$prefix/bin/edge-client" --version) || fail "installed binary does not run under qemu ($arch)"
echo "check-bundle $name: ok (installed into DESTDIR with PREFIX=$prefix, unit verified;" \
     "${security#→ }; $version runs on $arch)"
