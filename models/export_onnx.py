#!/usr/bin/env python3
"""One self-contained ONNX model from a backbone's trunk and a merged tail.

    python models/export_onnx.py --backbone models/build/dinov2-vits14 \
        --tail model/tail-merged.safetensors --model model/model.json --out model/model.onnx

`edge-client export --onnx` runs it. The tail's graph is written from the merged weights
(`Tail::merged`: LoRA folded into its weights, trained biases, adapters, prompt tokens, the
classifier as `classifier.*`) after the trunk's output, in the trunk's opset, so the model
takes the trunk's input (`pixels`, normalised as the manifest's `input` says, recorded in the
model's metadata) and gives `logits [batch, classes]`.

Families: `conv_head` (EfficientNet-Lite0: 1x1 conv, folded BatchNorm, ReLU6, global average
pooling, classifier), `vit` (DINOv2: pre-LN blocks with layer scale, optional adapters and
prompt tokens, final LayerNorm, the CLS token under the classifier) and `transformer` (MiniLM:
post-LN BERT blocks, the padded keys masked with the manifest's `mask_bias`, optional adapters
and prompt tokens in front of the text, the masked mean of the text's tokens under the
classifier). A text model takes the trunk's `input_ids` and `attention_mask`.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def read_safetensors(path):
    """The tensors of a safetensors file (f32 only) as numpy arrays, and its metadata."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    out = {}
    for name, h in header.items():
        if h["dtype"] != "F32":
            sys.exit(f"{path}: tensor {name} is {h['dtype']}, expected F32")
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(h["shape"]).copy()
    return out, meta


class Graph:
    """Appends nodes and initialisers with unique names."""

    def __init__(self, prefix="tail"):
        self.nodes, self.inits, self.n, self.prefix = [], [], 0, prefix

    def name(self, hint):
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def const(self, array, hint="c"):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def const_i64(self, values, hint="shape"):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x, w, b=None):
        """x @ W^T + b for W [out, in]."""
        y = self.op("MatMul", [x, self.const(np.ascontiguousarray(w.T), "wT")])
        return self.op("Add", [y, self.const(b, "b")]) if b is not None else y

    def layer_norm(self, x, w, b, eps):
        """LayerNorm over the last axis from basic ops (valid in every opset >= 13)."""
        mean = self.op("ReduceMean", [x], axes=[-1], keepdims=1)
        xc = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Mul", [xc, xc])], axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(np.float32(eps), "eps")])])
        y = self.op("Div", [xc, std])
        return self.op("Add", [self.op("Mul", [y, self.const(w, "lnw")]), self.const(b, "lnb")])

    def gelu(self, x):
        """Exact (erf) GELU."""
        e = self.op("Erf", [self.op("Mul", [x, self.const(np.float32(1 / np.sqrt(2)), "k")])])
        return self.op("Mul", [self.op("Mul", [x, self.const(np.float32(0.5), "half")]),
                               self.op("Add", [e, self.const(np.float32(1.0), "one")])])


def conv_head(g, x, t, hyper):
    """x [B, Cin, H, W] -> logits."""
    w = t["conv_head.weight"]
    w = w.reshape(w.shape[0], w.shape[1], 1, 1)
    y = g.op("Conv", [x, g.const(w, "conv_w")], kernel_shape=[1, 1])
    c = w.shape[0]
    y = g.op("Mul", [y, g.const(t["bn_head.scale"].reshape(1, c, 1, 1), "bn_scale")])
    y = g.op("Add", [y, g.const(t["bn_head.shift"].reshape(1, c, 1, 1), "bn_shift")])
    y = g.op("Clip", [y, g.const(np.float32(0.0), "lo"), g.const(np.float32(6.0), "hi")])
    y = g.op("GlobalAveragePool", [y])
    y = g.op("Flatten", [y], axis=1)
    return g.linear(y, t["classifier.weight"], t["classifier.bias"])


def adapter(g, h, t, pre):
    if f"{pre}.down.weight" not in t:
        return h
    z = g.gelu(g.linear(h, t[f"{pre}.down.weight"], t[f"{pre}.down.bias"]))
    return g.op("Add", [h, g.linear(z, t[f"{pre}.up.weight"], t[f"{pre}.up.bias"])])


def vit(g, x, t, hyper):
    """x [B, S, D] (CLS + patches) -> logits."""
    d, heads, eps = hyper["hidden"], hyper["heads"], hyper["layer_norm_eps"]
    dh = d // heads
    if "prompt.tokens" in t:
        p = t["prompt.tokens"][None]  # [1, P, D]
        b1 = g.op("Slice", [g.op("Shape", [x]), g.const_i64([0]), g.const_i64([1])])
        tile = g.op("Concat", [b1, g.const_i64([1, 1])], axis=0)
        prompts = g.op("Tile", [g.const(p, "prompt"), tile])
        cls = g.op("Slice", [x, g.const_i64([0]), g.const_i64([1]), g.const_i64([1])])
        patches = g.op("Slice", [x, g.const_i64([1]), g.const_i64([2**62]), g.const_i64([1])])
        x = g.op("Concat", [cls, prompts, patches], axis=1)
    split = g.const_i64([0, 0, heads, dh])
    merge = g.const_i64([0, 0, d])
    scale = g.const(np.float32(1 / np.sqrt(dh)), "scale")
    j = 0
    while f"blocks.{j}.attn.q.weight" in t:
        pre = f"blocks.{j}"
        a = g.layer_norm(x, t[f"{pre}.ln1.weight"], t[f"{pre}.ln1.bias"], eps)
        q, k, v = (g.op("Transpose", [g.op("Reshape", [g.linear(a, t[f"{pre}.attn.{n}.weight"],
                                                                  t[f"{pre}.attn.{n}.bias"]), split])],
                        perm=[0, 2, 1, 3]) for n in "qkv")
        s = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        ctx = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        o = g.linear(ctx, t[f"{pre}.attn.o.weight"], t[f"{pre}.attn.o.bias"])
        o = adapter(g, o, t, f"{pre}.adapter_attn")
        x = g.op("Add", [x, g.op("Mul", [o, g.const(t[f"{pre}.ls1"], "ls1")])])
        a = g.layer_norm(x, t[f"{pre}.ln2.weight"], t[f"{pre}.ln2.bias"], eps)
        f = g.linear(g.gelu(g.linear(a, t[f"{pre}.ffn.up.weight"], t[f"{pre}.ffn.up.bias"])),
                     t[f"{pre}.ffn.down.weight"], t[f"{pre}.ffn.down.bias"])
        f = adapter(g, f, t, f"{pre}.adapter_ffn")
        x = g.op("Add", [x, g.op("Mul", [f, g.const(t[f"{pre}.ls2"], "ls2")])])
        j += 1
    x = g.layer_norm(x, t["final_ln.weight"], t["final_ln.bias"], eps)
    if hyper.get("pool", "cls") == "cls":
        pooled = g.op("Gather", [x, g.const_i64(0)], axis=1)
    else:
        sys.exit("vit: only CLS pooling is exported")
    return g.linear(pooled, t["classifier.weight"], t["classifier.bias"])


def transformer(g, x, t, hyper, mask):
    """x [B, S, D] (the trunk's hidden states), mask [B, S] int64 -> logits."""
    d, heads, eps = hyper["hidden"], hyper["heads"], hyper["layer_norm_eps"]
    dh = d // heads
    m = g.op("Cast", [mask], to=TensorProto.FLOAT)  # [B, S]
    pool_mask = m
    if "prompt.tokens" in t:
        # The prompt tokens go in front of the text: always attended to, never pooled.
        p = t["prompt.tokens"][None]  # [1, P, D]
        b1 = g.op("Slice", [g.op("Shape", [x]), g.const_i64([0]), g.const_i64([1])])
        prompts = g.op("Tile", [g.const(p, "prompt"), g.op("Concat", [b1, g.const_i64([1, 1])], axis=0)])
        x = g.op("Concat", [prompts, x], axis=1)
        ones = g.op("Expand", [g.const(np.ones((1, p.shape[1]), np.float32), "ones"),
                               g.op("Concat", [b1, g.const_i64([p.shape[1]])], axis=0)])
        m = g.op("Concat", [ones, m], axis=1)
        pool_mask = g.op("Concat", [g.op("Mul", [ones, g.const(np.float32(0.0), "zero")]), pool_mask], axis=1)
    bias = g.op("Mul", [g.op("Sub", [g.const(np.float32(1.0), "one"), m]),
                        g.const(np.float32(hyper.get("mask_bias", -10000.0)), "mask_bias")])
    bias = g.op("Unsqueeze", [bias, g.const_i64([1, 2])])  # [B, 1, 1, S]
    split = g.const_i64([0, 0, heads, dh])
    merge = g.const_i64([0, 0, d])
    scale = g.const(np.float32(1 / np.sqrt(dh)), "scale")
    j = 0
    while f"blocks.{j}.attn.q.weight" in t:
        pre = f"blocks.{j}"
        q, k, v = (g.op("Transpose", [g.op("Reshape", [g.linear(x, t[f"{pre}.attn.{n}.weight"],
                                                                  t[f"{pre}.attn.{n}.bias"]), split])],
                        perm=[0, 2, 1, 3]) for n in "qkv")
        sc = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        ctx = g.op("MatMul", [g.op("Softmax", [g.op("Add", [sc, bias])], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        o = adapter(g, g.linear(ctx, t[f"{pre}.attn.o.weight"], t[f"{pre}.attn.o.bias"]), t,
                    f"{pre}.adapter_attn")
        x = g.layer_norm(g.op("Add", [x, o]), t[f"{pre}.ln1.weight"], t[f"{pre}.ln1.bias"], eps)
        f = g.linear(g.gelu(g.linear(x, t[f"{pre}.ffn.up.weight"], t[f"{pre}.ffn.up.bias"])),
                     t[f"{pre}.ffn.down.weight"], t[f"{pre}.ffn.down.bias"])
        f = adapter(g, f, t, f"{pre}.adapter_ffn")
        x = g.layer_norm(g.op("Add", [x, f]), t[f"{pre}.ln2.weight"], t[f"{pre}.ln2.bias"], eps)
        j += 1
    if hyper.get("pool", "masked_mean") != "masked_mean":
        sys.exit("transformer: only masked mean pooling is exported")
    w = g.op("Unsqueeze", [pool_mask, g.const_i64([2])])  # [B, S, 1]
    total = g.op("ReduceSum", [g.op("Mul", [x, w]), g.const_i64([1])], keepdims=0)
    count = g.op("ReduceSum", [w, g.const_i64([1])], keepdims=0)
    count = g.op("Max", [count, g.const(np.float32(1e-9), "tiny")])
    return g.linear(g.op("Div", [total, count]), t["classifier.weight"], t["classifier.bias"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", required=True, help="backbone folder (manifest.json, trunk.onnx)")
    ap.add_argument("--tail", required=True, help="merged tail safetensors")
    ap.add_argument("--model", required=True, help="model.json written by edge-client export")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    backbone = Path(a.backbone)
    manifest = json.loads((backbone / "manifest.json").read_text())
    info = json.loads(Path(a.model).read_text())
    tensors, _ = read_safetensors(a.tail)
    family = manifest["family"]
    builders = {"conv_head": conv_head, "vit": vit, "transformer": transformer}
    if family not in builders:
        print(f"export_onnx: the {family} tail is not exported to ONNX yet "
              f"(the merged tail is in {a.tail})", file=sys.stderr)
        sys.exit(2)
    trunk = onnx.load(str(backbone / manifest["trunk"]["file"]))
    features = manifest["trunk"]["output"]["name"]
    g = Graph()
    if family == "transformer":
        mask = manifest["trunk"]["inputs"][1]["name"]
        logits = transformer(g, features, tensors, manifest["tail"]["hyper"], mask)
    else:
        logits = builders[family](g, features, tensors, manifest["tail"]["hyper"])
    graph = trunk.graph
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.inits)
    classes = len(info["classes"])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]))
    graph.node.append(helper.make_node("Identity", [logits], ["logits"], name="tail/logits"))
    graph.name = f"{manifest['id']} + federated {info['peft']} tail"
    meta = {
        "fedpeft.backbone": manifest["id"],
        "fedpeft.trunk_sha256": manifest["files"].get(manifest["trunk"]["file"], ""),
        "fedpeft.input": json.dumps(manifest["input"]),
        "fedpeft.image_size": str(info.get("image_size") or ""),
        "fedpeft.classes": json.dumps(info["classes"]),
        "fedpeft.method": info["peft"],
        "fedpeft.run": f"{info['fleet']} run {info['run_id']} round {info['round']}",
    }
    del trunk.metadata_props[:]
    for k, v in meta.items():
        trunk.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    trunk.producer_name = "fedpeft export_onnx.py"
    onnx.checker.check_model(trunk)
    out = Path(a.out)
    tmp = out.with_suffix(".onnx.tmp")
    onnx.save(trunk, str(tmp))
    tmp.replace(out)
    print(f"export_onnx: {out} ({out.stat().st_size} bytes, {family}, {classes} classes)")


if __name__ == "__main__":
    main()
