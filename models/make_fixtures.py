"""Reference outputs for the Rust parity tests, from the original unsplit models in PyTorch.

Writes models/fixtures/{efficientnet-lite0,all-minilm-l6-v2}.safetensors and tokenizer.json.
Inputs are real: Fashion-MNIST test images (Debian dataset-fashion-mnist) and English
sentences; token ids come from the reference `tokenizers` implementation of the model's own
tokenizer.json. Run after `make models`:
    .venv-models/bin/python models/make_fixtures.py
"""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import export_efficientnet_lite0 as eff  # noqa: E402
import export_minilm as mini  # noqa: E402

OUT = HERE / "fixtures"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Héllo WORLD!!! Café prices rose 3.5% in Zürich, didn't they?",
    "Subject: [ILUG] Re: RedHat 7.3 install fails -- can't find /dev/hda1 (help)",
    "unbelievably long-winded antidisestablishmentarianism discussions",
    "东京 is in Japan; \"quotes\" and (brackets) & ampersands <html> tags.",
    "FREE!!! Click http://www.example.com/win?id=42 NOW to claim your $1,000,000 prize",
]


def fashion_test_images(n):
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    return np.frombuffer(raw[16:16 + n * 784], dtype=np.uint8).reshape(n, 28, 28).copy()


def preprocess(images_u8, size):
    x = torch.from_numpy(images_u8.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(eff_mean())[None, :, None, None]
    std = torch.tensor(eff_std())[None, :, None, None]
    return (x - mean) / std


def eff_mean():
    return [127.0 / 255.0] * 3


def eff_std():
    return [128.0 / 255.0] * 3


def efficientnet():
    net = eff.load()
    trunk = eff.Trunk(net).eval()
    images = fashion_test_images(4)
    out = {"images_u8": images}
    with torch.no_grad():
        x96 = preprocess(images, 96)
        out["features_96"] = trunk(x96).numpy()
        out["logits_96"] = net(x96).numpy()
        x224 = preprocess(images[:2], 224)
        out["features_224"] = trunk(x224[:1]).numpy()
        out["logits_224"] = net(x224).numpy()
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(OUT / "efficientnet-lite0.safetensors"))


def minilm():
    from tokenizers import Tokenizer

    w, cfg, src = mini.load()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    fixture = []
    for s in SENTENCES:
        fixture.append({"text": s, "ids": tok.encode(s).ids})
    tok.enable_truncation(max_length=16)
    fixture.append({"text": SENTENCES[1], "max_len": 16, "ids": tok.encode(SENTENCES[1]).ids})
    (OUT / "tokenizer.json").write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")

    batch = SENTENCES[:3]
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=32)
    enc = tok.encode_batch(batch)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    layers = cfg["num_hidden_layers"]
    trunk = mini.Bert(w, cfg, layers - 2).eval()
    full = mini.Bert(w, cfg, layers).eval()
    with torch.no_grad():
        out = {
            "input_ids": ids.numpy(),
            "attention_mask": mask.numpy(),
            "hidden_split": trunk(ids, mask).numpy(),
            "embedding": mini.mean_pool(full(ids, mask), mask).numpy(),
        }
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(OUT / "all-minilm-l6-v2.safetensors"))


def main():
    OUT.mkdir(exist_ok=True)
    torch.set_num_threads(2)
    efficientnet()
    minilm()
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
