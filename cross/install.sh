#!/bin/sh
# Installs this fedpeft edge-client bundle. Run from the unpacked bundle, as root:
#   sudo ./install.sh
# Variables (environment or VAR=value arguments):
#   PREFIX      where the binary, models and libraries go            (default /usr/local)
#   DESTDIR     staging root prepended to every path (packaging, tests; default empty)
#   SYSCONFDIR  where edge.toml goes                                  (default /etc/fedpeft)
#   UNITDIR     where the systemd unit goes                           (default /etc/systemd/system)
# An existing edge.toml is kept (the example is written beside it as edge.toml.example).
# Without DESTDIR, systemd is reloaded; start with: systemctl enable --now fedpeft-edge
set -eu
for arg in "$@"; do
  case $arg in
    PREFIX=*|DESTDIR=*|SYSCONFDIR=*|UNITDIR=*) eval "${arg%%=*}=\${arg#*=}" ;;
    *) echo "install.sh: unknown argument '$arg' (PREFIX=, DESTDIR=, SYSCONFDIR=, UNITDIR=)" >&2; exit 2 ;;
  esac
done
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SYSCONFDIR=${SYSCONFDIR:-/etc/fedpeft}
UNITDIR=${UNITDIR:-/etc/systemd/system}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/bundle.env"   # TARGET, ORT_DYLIB (the library path the unit names; may be empty)

models=$PREFIX/share/fedpeft/models
case ${ORT_DYLIB:-} in
  bundled:*) ort_dylib=$PREFIX/lib/fedpeft/${ORT_DYLIB#bundled:} ;;
  *) ort_dylib=${ORT_DYLIB:-} ;;
esac
fill() {
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" -e "s|@ORT_DYLIB@|$ort_dylib|g" "$1"
}

install -d "$DESTDIR$PREFIX/bin" "$DESTDIR$models" "$DESTDIR$SYSCONFDIR" "$DESTDIR$UNITDIR"
install -m 0755 "$here/bin/edge-client" "$DESTDIR$PREFIX/bin/edge-client"
for dir in "$here"/models/*/; do
  id=$(basename "$dir")
  install -d "$DESTDIR$models/$id"
  install -m 0644 "$dir"* "$DESTDIR$models/$id/"
done
if [ -d "$here/lib" ]; then
  install -d "$DESTDIR$PREFIX/lib/fedpeft"
  install -m 0644 "$here"/lib/* "$DESTDIR$PREFIX/lib/fedpeft/"
fi

fill "$here/edge.example.toml" >"$DESTDIR$SYSCONFDIR/edge.toml.example"
if [ ! -e "$DESTDIR$SYSCONFDIR/edge.toml" ]; then
  cp "$DESTDIR$SYSCONFDIR/edge.toml.example" "$DESTDIR$SYSCONFDIR/edge.toml"
fi
chmod 0644 "$DESTDIR$SYSCONFDIR/edge.toml" "$DESTDIR$SYSCONFDIR/edge.toml.example"
fill "$here/fedpeft-edge.service" >"$DESTDIR$UNITDIR/fedpeft-edge.service"
chmod 0644 "$DESTDIR$UNITDIR/fedpeft-edge.service"
if [ -f "$here/jetson.conf" ]; then
  install -d "$DESTDIR$UNITDIR/fedpeft-edge.service.d"
  fill "$here/jetson.conf" >"$DESTDIR$UNITDIR/fedpeft-edge.service.d/jetson.conf"
  chmod 0644 "$DESTDIR$UNITDIR/fedpeft-edge.service.d/jetson.conf"
fi

echo "installed fedpeft edge client ($TARGET) into ${DESTDIR:-/}: $PREFIX/bin/edge-client," \
     "$SYSCONFDIR/edge.toml, $UNITDIR/fedpeft-edge.service"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "next: edit $SYSCONFDIR/edge.toml (broker url, client id, data index), then" \
       "systemctl enable --now fedpeft-edge"
fi
