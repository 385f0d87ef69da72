#!/usr/bin/env bash
# onnxruntime's aarch64 library for the `ort` feature on a Raspberry Pi (and for running the
# aarch64 trunk under qemu): the PyPI wheel onnxruntime==1.31.1 for manylinux_2_28_aarch64,
# unpacked into models/build/onnxruntime-aarch64/. Idempotent: nothing is fetched when the
# library is there. Prints the library's path.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=1.31.1
out=models/build/onnxruntime-aarch64
lib=$out/libonnxruntime.so.$VERSION
if [ ! -f "$lib" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "onnxruntime-aarch64: fetching the onnxruntime==$VERSION manylinux_2_28_aarch64 wheel" >&2
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version 311 "onnxruntime==$VERSION" -d "$tmp" >&2
  python3 - "$tmp"/onnxruntime-*.whl "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(f"onnxruntime/capi/libonnxruntime.so.1.31.1", sys.argv[2])
PY
  mkdir -p "$out"
  mv "$tmp/onnxruntime/capi/libonnxruntime.so.$VERSION" "$lib.part"
  # An aarch64 ELF, not whatever else a misconfigured index might serve.
  head -c 20 "$lib.part" | od -An -tx1 | tr -d ' \n' | grep -q '^7f454c46020101.\{22\}b700' || {
    echo "onnxruntime-aarch64: $lib.part is not an aarch64 ELF library" >&2; exit 1; }
  mv "$lib.part" "$lib"
fi
echo "$PWD/$lib"
