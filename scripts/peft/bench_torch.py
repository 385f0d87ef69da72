#!/usr/bin/env python3
"""PyTorch peer of `cargo bench -p fedpeft-peft --bench train`: the identical training step.

Run with PyTorch from PyPI (MKL), on the same thread count as the Rust tail:
    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch
    .venv-bench/bin/python scripts/peft/bench_torch.py            # all four configurations
    .venv-bench/bin/python scripts/peft/bench_torch.py conv-lora [steps]
Prints one JSON object per line. Each configuration runs in its own child process so that
peak RSS (ru_maxrss) is its own; `rss_before_train_mib` is the RSS before the first (warm-up) step.
Configurations, batch 64, SGD momentum 0.9, random weights with the real shapes:
  conv-lora / conv-bias     EfficientNet-Lite0 conv head at 96 px: [64, 320, 3, 3] -> 1x1 conv
                            320->1280 (frozen) -> folded BN -> ReLU6 -> mean -> Linear(1280, 10);
                            LoRA r=8, alpha 16 on the 1x1 conv, or BitFit (BN shift + head).
  minilm-lora / minilm-bias two post-LN BERT blocks (hidden 384, 12 heads, FFN 1536, GELU erf),
                            sequence 64 with padding, masked mean pooling, Linear(384, 2);
                            LoRA r=8 on q and v, or every bias (linear + LayerNorm) + head.
  vit-lora / vit-bias       two pre-LN DINOv2 ViT-S/14 blocks (hidden 384, 6 heads, MLP 1536,
                            GELU erf, layer scale), 65 tokens (112 px), final LayerNorm, CLS
                            token -> Linear(384, 10), as Hugging Face's Dinov2 runs them (every
                            token through every block); LoRA r=8 on q and v, or BitFit + head.
"""
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def frozen(*shape, scale=0.05):
    return (torch.rand(*shape) * 2 - 1) * scale


def param(t):
    return torch.nn.Parameter(t)


def conv_setup(lora):
    x = torch.rand(64, 320, 3, 3) * 6
    w = frozen(1280, 320, 1, 1)
    scale, shift = torch.ones(1280), frozen(1280, scale=0.1)
    hw, hb = param(frozen(10, 1280, scale=1 / math.sqrt(1280))), param(frozen(10, scale=1 / math.sqrt(1280)))
    labels = torch.arange(64) % 10
    if lora:
        a = param(frozen(8, 320, 1, 1, scale=1 / math.sqrt(320)))
        b = param(torch.zeros(1280, 8, 1, 1))
        params = [a, b, hw, hb]
    else:
        shift = param(shift)
        params = [shift, hw, hb]

    def step():
        y = F.conv2d(x, w)
        if lora:
            y = y + 2.0 * F.conv2d(F.conv2d(x, a), b)
        y = F.relu6(y * scale[None, :, None, None] + shift[None, :, None, None])
        return F.cross_entropy(y.mean((2, 3)) @ hw.T + hb, labels)

    return params, step


def two_blocks(d, inter, lora, layer_scale=False):
    """Two encoder blocks' weights (frozen, random) and the trained tensors: LoRA r=8 on q and
    v, or every bias (linear and LayerNorm)."""
    params, blocks = [], []
    for _ in range(2):
        blk = {}
        for n in "qkvo":
            blk[n + ".w"], blk[n + ".b"] = frozen(d, d), frozen(d)
        blk["up.w"], blk["up.b"] = frozen(inter, d), frozen(inter)
        blk["down.w"], blk["down.b"] = frozen(d, inter, scale=0.025), frozen(d)
        for n in ("ln1", "ln2"):
            blk[n + ".w"], blk[n + ".b"] = torch.ones(d), torch.zeros(d)
        if layer_scale:
            blk["ls1"], blk["ls2"] = torch.full((d,), 0.1), torch.full((d,), 0.1)
        if lora:
            for n in "qv":
                blk[n + ".la"] = param(frozen(8, d, scale=1 / math.sqrt(d)))
                blk[n + ".lb"] = param(torch.zeros(d, 8))
                params += [blk[n + ".la"], blk[n + ".lb"]]
        else:
            for key in list(blk):
                if key.endswith(".b"):
                    blk[key] = param(blk[key])
                    params.append(blk[key])
        blocks.append(blk)
    return params, blocks


def lin(blk, n, h):
    """Linear layer `n` of a block, with its LoRA branch (alpha / r = 2) if it has one."""
    y = F.linear(h, blk[n + ".w"], blk[n + ".b"])
    if n + ".la" in blk:
        y = y + 2.0 * F.linear(F.linear(h, blk[n + ".la"]), blk[n + ".lb"])
    return y


def minilm_setup(lora):
    d, inter, heads, s, b = 384, 1536, 12, 64, 64
    x = torch.rand(b, s, d) * 2 - 1
    mask = torch.tensor([[1.0 if j < 32 + (i * 7) % 33 else 0.0 for j in range(s)] for i in range(b)])
    bias_mask = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
    labels = torch.arange(b) % 2
    params, blocks = two_blocks(d, inter, lora)
    hw, hb = param(frozen(2, d, scale=1 / math.sqrt(d))), param(frozen(2, scale=1 / math.sqrt(d)))
    params += [hw, hb]

    def split(t):
        return t.view(b, s, heads, d // heads).transpose(1, 2)

    def step():
        h = x
        for blk in blocks:
            ctx = F.scaled_dot_product_attention(split(lin(blk, "q", h)), split(lin(blk, "k", h)),
                                                 split(lin(blk, "v", h)), attn_mask=bias_mask)
            ctx = ctx.transpose(1, 2).reshape(b, s, d)
            a = F.layer_norm(h + lin(blk, "o", ctx), (d,), blk["ln1.w"], blk["ln1.b"], eps=1e-12)
            f = lin(blk, "down", F.gelu(lin(blk, "up", a)))
            h = F.layer_norm(a + f, (d,), blk["ln2.w"], blk["ln2.b"], eps=1e-12)
        m = mask[:, :, None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.cross_entropy(pooled @ hw.T + hb, labels)

    return params, step


def vit_setup(lora):
    d, inter, heads, s, b = 384, 1536, 6, 65, 64
    x = torch.rand(b, s, d) * 2 - 1
    labels = torch.arange(b) % 10
    params, blocks = two_blocks(d, inter, lora, layer_scale=True)
    fw, fb = torch.ones(d), torch.zeros(d)
    if not lora:
        fb = param(fb)
        params.append(fb)
    hw, hb = param(frozen(10, d, scale=1 / math.sqrt(d))), param(frozen(10, scale=1 / math.sqrt(d)))
    params += [hw, hb]

    def split(t):
        return t.view(b, s, heads, d // heads).transpose(1, 2)

    def step():
        h = x
        for blk in blocks:
            a = F.layer_norm(h, (d,), blk["ln1.w"], blk["ln1.b"], eps=1e-6)
            ctx = F.scaled_dot_product_attention(split(lin(blk, "q", a)), split(lin(blk, "k", a)),
                                                 split(lin(blk, "v", a)))
            h = h + blk["ls1"] * lin(blk, "o", ctx.transpose(1, 2).reshape(b, s, d))
            a = F.layer_norm(h, (d,), blk["ln2.w"], blk["ln2.b"], eps=1e-6)
            h = h + blk["ls2"] * lin(blk, "down", F.gelu(lin(blk, "up", a)))
        cls = F.layer_norm(h, (d,), fw, fb, eps=1e-6)[:, 0]
        return F.cross_entropy(cls @ hw.T + hb, labels)

    return params, step


def run_one(name, steps):
    torch.manual_seed(1)
    torch.set_num_threads(THREADS)
    setup = {"conv": conv_setup, "minilm": minilm_setup, "vit": vit_setup}[name.split("-")[0]]
    params, loss_fn = setup(name.endswith("lora"))
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()

    before = rss_mib()  # before the first step, so the caching allocator's growth counts
    train_step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        train_step()
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "impl": "torch", "version": torch.__version__, "config": name, "batch": 64, "steps": steps,
        "samples_per_s": round(steps * 64 / secs, 1), "trainable": sum(p.numel() for p in params),
        "peak_rss_mib": round(peak, 1), "rss_before_train_mib": round(before, 1),
        "peak_rss_delta_mib": round(peak - before, 1), "threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available()}), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        run_one(args[0], int(args[1]) if len(args) > 1 else (200 if args[0].startswith("conv") else 10))
    else:
        for c in ["conv-lora", "conv-bias", "minilm-lora", "minilm-bias", "vit-lora", "vit-bias"]:
            subprocess.run([sys.executable, __file__, c], check=True)
