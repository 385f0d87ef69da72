#!/usr/bin/env bash
# `make test-cross-ort`: onnxruntime running the EfficientNet-Lite0 trunk on aarch64 under qemu.
# The backbone's trunk parity test (tract and ort against PyTorch at 96 and 224 px) built for
# aarch64 with the `ort` feature, loading PyPI's aarch64 libonnxruntime (ORT_DYLIB_PATH). It runs
# through cross/qemu-run, which shows onnxruntime an ARM /proc/cpuinfo in a private mount
# namespace (with the host's x86 one it crashes under qemu).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/cross/setup.sh aarch64-unknown-linux-gnu
lib=$(scripts/cross/onnxruntime-aarch64.sh)
ORT_DYLIB_PATH=$lib cargo test --config cross/config.toml --target aarch64-unknown-linux-gnu \
  -p fedpeft-backbone --features ort --test trunk_parity -- --nocapture efficientnet
