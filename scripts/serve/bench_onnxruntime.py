"""The peer of `edge-client serve` on the results page "Serving": onnxruntime (PyPI, Python)
running the exported model (`edge-client export --onnx`: trunk + merged tail in one graph) in
process, with no HTTP, no decoding and no queue: the inference alone.

  python bench_onnxruntime.py MODEL_ONNX [--threads 2] [--runs 200] [--batch 1]

Prints one JSON object: p50/p90/p99 latency per call (ms) and inputs per second. The input is
a fixed random tensor of the model's input shape (the work does not depend on the values).
Runs in .venv-models (make models).
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    # Symbolic sides (a trunk exported for any size): the run's image size, from the
    # model.json `export` wrote beside the model.
    side = json.load(open(os.path.join(os.path.dirname(a.model), "model.json")))["image_size"]
    shape = [a.batch] + [d if isinstance(d, int) else side for d in inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(5):
        s.run(None, {inp.name: x})
    lat = []
    start = time.perf_counter()
    for _ in range(a.runs):
        t = time.perf_counter()
        s.run(None, {inp.name: x})
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    lat.sort()
    pct = lambda q: 1e3 * lat[min(len(lat) - 1, max(0, int(np.ceil(q * len(lat))) - 1))]
    print(json.dumps({
        "batch": a.batch, "threads": a.threads, "runs": a.runs,
        "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
        "inputs_per_s": a.runs * a.batch / wall,
    }))


if __name__ == "__main__":
    main()
