"""onnxruntime's own Python API on the same trunks, inputs, batch and threads as
backbone/examples/trunk_throughput.rs; prints the same JSON lines (runtime "onnxruntime-python")."""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "models" / "build"


def measure(seconds, batch, f):
    f()
    t = time.perf_counter()
    runs = 0
    while runs < 3 or time.perf_counter() - t < seconds:
        f()
        runs += 1
    return runs * batch / (time.perf_counter() - t)


def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(BUILD / model / "trunk.onnx"), so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    s = session("efficientnet-lite0", a.threads)
    for size in (96, 224):
        b, c, h, w = np.indices((a.batch, 3, size, size))
        x = (((b * 7 + c * 13 + h * 31 + w * 17) % 255) / 127.5 - 1.0).astype(np.float32)
        rate = measure(a.seconds, a.batch, lambda: s.run(None, {"pixels": x}))
        print(json.dumps({"runtime": "onnxruntime-python", "model": "efficientnet-lite0", "input": f"{size}px",
                          "batch": a.batch, "threads": a.threads, "per_second": round(rate, 1)}))
    if (BUILD / "dinov2-vits14" / "trunk.onnx").exists():
        s = session("dinov2-vits14", a.threads)
        size = 112
        b, c, h, w = np.indices((a.batch, 3, size, size))
        x = (((b * 7 + c * 13 + h * 31 + w * 17) % 255) / 127.5 - 1.0).astype(np.float32)
        rate = measure(a.seconds, a.batch, lambda: s.run(None, {"pixels": x}))
        print(json.dumps({"runtime": "onnxruntime-python", "model": "dinov2-vits14", "input": f"{size}px",
                          "batch": a.batch, "threads": a.threads, "per_second": round(rate, 1)}))
    s = session("all-minilm-l6-v2", a.threads)
    for seq in (64, 128):
        b, p = np.indices((a.batch, seq))
        ids = (1000 + (b * 131 + p * 17) % 28000).astype(np.int64)
        ids[:, 0] = 101
        ids[:, -1] = 102
        mask = np.ones_like(ids)
        rate = measure(a.seconds, a.batch, lambda: s.run(None, {"input_ids": ids, "attention_mask": mask}))
        print(json.dumps({"runtime": "onnxruntime-python", "model": "all-minilm-l6-v2", "input": f"{seq}tok",
                          "batch": a.batch, "threads": a.threads, "per_second": round(rate, 1)}))


if __name__ == "__main__":
    main()
