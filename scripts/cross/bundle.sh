#!/usr/bin/env bash
# Builds the edge client for a board and packs what it needs into dist/fedpeft-edge-NAME.tar.gz:
#   scripts/cross/bundle.sh aarch64|armv7|jetson
#     aarch64  Raspberry Pi 4/5 (64-bit OS): tract + onnxruntime (load-dynamic), with onnxruntime's
#              aarch64 library bundled (PyPI onnxruntime==1.31.1)
#     armv7    Raspberry Pi 2/3/Zero 2 W (32-bit OS): tract only (no onnxruntime build exists)
#     jetson   Jetson (JetPack, aarch64): onnxruntime with the CUDA and TensorRT providers; the
#              library is JetPack's onnxruntime-gpu, installed on the board, not bundled
# The binary is built with [profile.edge] (fat LTO, 1 codegen unit, panic=abort, stripped).
# Needs `make models` (the EfficientNet-Lite0 trunk) and scripts/cross/setup.sh for the target.
# BUNDLE_MODELS (space-separated backbone ids, default efficientnet-lite0) picks the models the
# bundle carries, e.g. BUNDLE_MODELS="efficientnet-lite0 dinov2-vits14" for the ViT as well.
# BUNDLE_PROFILE (default edge) and BUNDLE_FEATURES (cargo feature flags, default per board) let
# `make test-cross` pack the debug build its tests already made, to check the install.
set -euo pipefail
cd "$(dirname "$0")/../.."
dist=${BUNDLE_DIST:-dist}   # where bundles go
name=${1:?usage: bundle.sh aarch64|armv7|jetson}
case $name in
  aarch64) triple=aarch64-unknown-linux-gnu; features=(--no-default-features --features ort) ;;
  armv7) triple=armv7-unknown-linux-gnueabihf; features=(--no-default-features) ;;
  jetson) triple=aarch64-unknown-linux-gnu; features=(--no-default-features --features ort,cuda,tensorrt) ;;
  *) echo "bundle: unknown board '$name' (aarch64, armv7, jetson)" >&2; exit 2 ;;
esac
read -r -a models <<<"${BUNDLE_MODELS:-efficientnet-lite0}"
for m in "${models[@]}"; do
  for f in trunk.onnx tail.safetensors manifest.json; do
    [ -f "models/build/$m/$f" ] || { echo "bundle: models/build/$m/$f is missing: run make models" >&2; exit 1; }
  done
done

if [ -n "${BUNDLE_FEATURES+set}" ]; then read -r -a features <<<"$BUNDLE_FEATURES"; fi
profile=${BUNDLE_PROFILE:-edge}
cargo build --config cross/config.toml --target "$triple" --profile "$profile" -p fedpeft-edge \
  --bin edge-client "${features[@]}"
bin=${CARGO_TARGET_DIR:-target}/$triple/$([ "$profile" = dev ] && echo debug || echo "$profile")/edge-client

stage=$dist/fedpeft-edge-$name
mkdir -p "$dist"
rm -rf "$stage" && mkdir -p "$stage/bin"
cp "$bin" "$stage/bin/edge-client"
for m in "${models[@]}"; do
  mkdir -p "$stage/models/$m"
  cp "models/build/$m"/{trunk.onnx,tail.safetensors,manifest.json} "$stage/models/$m/"
done
cp cross/install.sh cross/fedpeft-edge.service cross/edge.example.toml "$stage/"
ort_dylib=""
case $name in
  aarch64)
    lib=$(scripts/cross/onnxruntime-aarch64.sh)
    mkdir -p "$stage/lib" && cp "$lib" "$stage/lib/"
    ort_dylib="bundled:$(basename "$lib")" ;;
  jetson)
    cp cross/jetson.conf "$stage/"
    ort_dylib=/usr/local/lib/python3.10/dist-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 ;;
esac
printf "TARGET='%s'\nORT_DYLIB='%s'\n" "$name: $triple ${features[*]:-default features}" "$ort_dylib" \
  >"$stage/bundle.env"
tar -C "$dist" --owner=0 --group=0 -czf "$dist/fedpeft-edge-$name.tar.gz" "fedpeft-edge-$name"
size=$(stat -c %s "$stage/bin/edge-client")
echo "bundle: $dist/fedpeft-edge-$name.tar.gz ($(stat -c %s "$dist/fedpeft-edge-$name.tar.gz") bytes;" \
     "edge-client $size bytes)"
