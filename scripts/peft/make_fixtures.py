#!/usr/bin/python3
"""Writes the PyTorch reference fixtures for fedpeft-peft (peft/tests/fixtures/*.safetensors).

Re-run from the repository root with Debian's torch (apt package python3-torch):
    /usr/bin/python3 scripts/peft/make_fixtures.py
Deterministic (fixed torch seeds): re-running rewrites identical files.

What is written (all computed in float64 from float32-representable inputs, so the Rust f64
path must match tightly and the f32 path to ~1e-5 of each tensor's scale):
  layers.safetensors       each layer's output and gradients (input and parameters) for an
                           upstream gradient `r` (loss = sum(y * r)): linear+LoRA, folded BN +
                           ReLU6, GELU, LayerNorm, masked multi-head attention, masked mean
                           pooling, global average pooling, softmax cross-entropy.
  conv_head.safetensors    an EfficientNet-Lite0-shaped conv head (16 -> 64 channels, 3x3,
                           batch 4, 5 classes) and, for `lora` and `bias`, the initial trainable
                           tensors, logits, loss, gradients and the tensors after one
                           SGD step (lr 0.1, momentum 0.9, weight decay 0.01).
  transformer.safetensors  2 post-LN BERT blocks (hidden 32, 4 heads, intermediate 64,
                           seq 6, batch 3 with padding, 4 classes); the same for `lora`
                           (q, v, up), `bias`, `adapter` (bottleneck 8) and `prompt` (3 tokens).
  vit.safetensors          2 pre-LN ViT blocks with layer scale, final LayerNorm, CLS-token
                           classifier (DINOv2's layout: hidden 32, 4 heads, intermediate 64,
                           5 tokens, batch 3, no mask, 4 classes, eps 1e-6); the same for every
                           method: `head`, `bias` (every bias incl. LayerNorm shifts and
                           final_ln), `lora` (q, v) and `lora_all` (every linear layer), both
                           r=2 alpha=4, `adapter` (bottleneck 8, on each sublayer's output
                           before the layer scale), `prompt` (3 tokens after the CLS token) and
                           `full_tail` (whose init is the `w.*` weights and the head).
Names: `w.<contract name>` frozen weights, `in.*` inputs, `<case>.init.<wire name>`,
`<case>.grad.<wire name>`, `<case>.after.<wire name>`, `<case>.logits`, `<case>.loss`
(`full_tail` stores no `init` of the frozen weights: it is `w.<name>`).
The format is safetensors, written by hand below (Debian ships no safetensors module).
"""
import json
import math
import os
import struct

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "peft", "tests", "fixtures")


def save(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        dtype = {torch.float32: "F32", torch.float64: "F64"}[t.dtype]
        data = t.numpy().astype("<f4" if dtype == "F32" else "<f8").tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def rnd(g, *shape, scale=1.0, lo=None):
    """float32-representable values, returned as float64."""
    if lo is None:
        t = (torch.rand(*shape, generator=g, dtype=torch.float32) * 2 - 1) * scale
    else:
        t = lo + torch.rand(*shape, generator=g, dtype=torch.float32) * (scale - lo)
    return t.to(torch.float32).double()


def leaf(t):
    return t.clone().requires_grad_(True)


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


MASK_MIN = torch.finfo(torch.float64).min  # HF BERT's additive mask: (1 - mask) * dtype min


def attention(q, k, v, mask, heads):
    b, s, d = q.shape
    dh = d // heads
    split = lambda t: t.view(b, s, heads, dh).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dh)
    scores = scores + ((1.0 - mask) * MASK_MIN)[:, None, None, :]
    p = scores.softmax(-1)
    return (p @ split(v)).transpose(1, 2).reshape(b, s, d)


def layers():
    g = torch.Generator().manual_seed(1)
    out = {}
    # linear + LoRA: y = x W^T + b + s * (x A^T) B^T
    x, w, b, a, bb = rnd(g, 5, 6), rnd(g, 4, 6, scale=0.5), rnd(g, 4), rnd(g, 2, 6, scale=0.5), rnd(g, 4, 2, scale=0.5)
    r = rnd(g, 5, 4)
    lx, lw, lb, la, lbb = map(leaf, (x, w, b, a, bb))
    y = lx @ lw.T + lb + 1.5 * (lx @ la.T) @ lbb.T
    (y * r).sum().backward()
    out.update({"linear.x": x, "linear.w": w, "linear.b": b, "linear.a": a, "linear.bb": bb, "linear.r": r,
                "linear.y": y, "linear.dx": lx.grad, "linear.dw": lw.grad, "linear.db": lb.grad,
                "linear.da": la.grad, "linear.dbb": lbb.grad})
    # folded BN + ReLU6 (inputs spread past both kinks)
    x, sc, sh, r = rnd(g, 6, 4, scale=8.0), rnd(g, 4, scale=2.0), rnd(g, 4, scale=2.0), rnd(g, 6, 4)
    lx, lsc, lsh = map(leaf, (x, sc, sh))
    y = F.relu6(lx * lsc + lsh)
    (y * r).sum().backward()
    out.update({"bn.x": x, "bn.scale": sc, "bn.shift": sh, "bn.r": r, "bn.y": y, "bn.dx": lx.grad,
                "bn.dscale": lsc.grad, "bn.dshift": lsh.grad})
    # GELU (erf form)
    x, r = rnd(g, 4, 5, scale=4.0), rnd(g, 4, 5)
    lx = leaf(x)
    y = F.gelu(lx)
    (y * r).sum().backward()
    out.update({"gelu.x": x, "gelu.r": r, "gelu.y": y, "gelu.dx": lx.grad})
    # LayerNorm, eps 1e-12
    x, gw, gb, r = rnd(g, 5, 8, scale=3.0), rnd(g, 8, scale=1.5), rnd(g, 8), rnd(g, 5, 8)
    lx, lgw, lgb = map(leaf, (x, gw, gb))
    y = F.layer_norm(lx, (8,), lgw, lgb, eps=1e-12)
    (y * r).sum().backward()
    out.update({"ln.x": x, "ln.w": gw, "ln.b": gb, "ln.r": r, "ln.y": y, "ln.dx": lx.grad,
                "ln.dw": lgw.grad, "ln.db": lgb.grad})
    # masked multi-head attention core: q, k, v [2, 5, 8], 2 heads, sample 1 has 2 padding keys
    q, k, v, r = rnd(g, 2, 5, 8, scale=1.5), rnd(g, 2, 5, 8, scale=1.5), rnd(g, 2, 5, 8), rnd(g, 2, 5, 8)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    lq, lk, lv = map(leaf, (q, k, v))
    y = attention(lq, lk, lv, mask, 2)
    (y * r).sum().backward()
    out.update({"attn.q": q, "attn.k": k, "attn.v": v, "attn.mask": mask, "attn.r": r, "attn.y": y,
                "attn.dq": lq.grad, "attn.dk": lk.grad, "attn.dv": lv.grad})
    # masked mean pooling (sentence-transformers) and global average pooling
    x, r = rnd(g, 2, 5, 8), rnd(g, 2, 8)
    lx = leaf(x)
    m = mask[:, :, None]
    y = (lx * m).sum(1) / m.sum(1).clamp(min=1e-9)
    (y * r).sum().backward()
    out.update({"pool.x": x, "pool.mask": mask, "pool.r": r, "pool.y": y, "pool.dx": lx.grad})
    x, r = rnd(g, 2, 3, 2, 2), rnd(g, 2, 3)
    lx = leaf(x)
    y = lx.mean((2, 3))
    (y * r).sum().backward()
    out.update({"gap.x": x, "gap.r": r, "gap.y": y, "gap.dx": lx.grad})
    # softmax cross-entropy (mean over the batch)
    logits, labels = rnd(g, 4, 5, scale=5.0), torch.tensor([0, 3, 4, 1])
    ll = leaf(logits)
    loss = F.cross_entropy(ll, labels)
    loss.backward()
    out.update({"ce.logits": logits, "ce.labels": labels.double(), "ce.loss": loss.reshape(1), "ce.dlogits": ll.grad})
    save(os.path.join(OUT, "layers.safetensors"), out)


def sgd_step(params, grads, lr=0.1, momentum=0.9, wd=0.01):
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    opt.step()


def run_case(name, forward, trainable, labels, out, weights=()):
    """trainable: dict wire name -> leaf tensor. Writes init (except for the names in
    `weights`, whose init is `w.<name>`), logits, loss, grads, after."""
    for n, t in trainable.items():
        if n not in weights:
            out[f"{name}.init.{n}"] = t.detach().clone()
    logits = forward()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    out[f"{name}.logits"] = logits.detach()
    out[f"{name}.loss"] = loss.detach().reshape(1)
    for n, t in trainable.items():
        out[f"{name}.grad.{n}"] = t.grad.detach().clone()
    sgd_step(list(trainable.values()), None)
    for n, t in trainable.items():
        out[f"{name}.after.{n}"] = t.detach().clone()


def conv_head():
    g = torch.Generator().manual_seed(2)
    cin, cout, hw, b, k = 16, 64, 3, 4, 5
    W = {"conv_head.weight": rnd(g, cout, cin, scale=0.3), "bn_head.scale": rnd(g, cout, scale=1.5, lo=0.5),
         "bn_head.shift": rnd(g, cout, scale=0.5)}
    x = rnd(g, b, cin, hw, hw, scale=3.0, lo=0.0)
    labels = torch.tensor([0, 4, 2, 1])
    out = {f"w.{n}": t.float() for n, t in W.items()}
    out["in.x"] = x.float()
    out["in.labels"] = labels.double()

    def head_params():
        return leaf(rnd(g, k, cout, scale=0.125)), leaf(rnd(g, k, scale=0.125))

    def body(conv_w, shift, lora=None):
        y = torch.einsum("bchw,oc->bohw", x, conv_w)
        if lora is not None:
            a, bb, s = lora
            y = y + s * torch.einsum("bchw,rc,or->bohw", x, a, bb)
        y = y * W["bn_head.scale"][None, :, None, None] + shift[None, :, None, None]
        return F.relu6(y).mean((2, 3))

    # lora r=4 alpha=8 on conv_head (B random so every gradient is non-trivial)
    a, bb = leaf(rnd(g, 4, cin, scale=0.25)), leaf(rnd(g, cout, 4, scale=0.25))
    hw_, hb = head_params()
    run_case("lora", lambda: body(W["conv_head.weight"], W["bn_head.shift"], (a, bb, 2.0)) @ hw_.T + hb,
             {"conv_head.lora_a": a, "conv_head.lora_b": bb, "head.weight": hw_, "head.bias": hb}, labels, out)
    # bias (BitFit): BN shift + head
    sh = leaf(W["bn_head.shift"])
    hw_, hb = head_params()
    run_case("bias", lambda: body(W["conv_head.weight"], sh) @ hw_.T + hb,
             {"bn_head.shift": sh, "head.weight": hw_, "head.bias": hb}, labels, out)
    save(os.path.join(OUT, "conv_head.safetensors"), out)


def block_weights(g, nb, d, inter, layer_scale=False):
    """The weights contract's tensors of `nb` transformer blocks (with ViT's layer scales)."""
    W = {}
    for j in range(nb):
        for n in "qkvo":
            W[f"blocks.{j}.attn.{n}.weight"] = rnd(g, d, d, scale=1 / math.sqrt(d))
            W[f"blocks.{j}.attn.{n}.bias"] = rnd(g, d, scale=0.1)
        for n in ("ln1", "ln2"):
            W[f"blocks.{j}.{n}.weight"] = rnd(g, d, scale=1.2, lo=0.8)
            W[f"blocks.{j}.{n}.bias"] = rnd(g, d, scale=0.1)
        if layer_scale:
            for n in ("ls1", "ls2"):
                W[f"blocks.{j}.{n}"] = rnd(g, d, scale=1.0, lo=0.2)
        W[f"blocks.{j}.ffn.up.weight"] = rnd(g, inter, d, scale=1 / math.sqrt(d))
        W[f"blocks.{j}.ffn.up.bias"] = rnd(g, inter, scale=0.1)
        W[f"blocks.{j}.ffn.down.weight"] = rnd(g, d, inter, scale=1 / math.sqrt(inter))
        W[f"blocks.{j}.ffn.down.bias"] = rnd(g, d, scale=0.1)
    return W


def linear(P, lora, prefix, h):
    """Linear layer `prefix` of P (name -> frozen or leaf tensor), plus its LoRA branch if
    lora (prefix -> (A, B, scaling)) has one."""
    y = h @ P[prefix + ".weight"].T + P[prefix + ".bias"]
    if lora and prefix in lora:
        a, bb, sc = lora[prefix]
        y = y + sc * (h @ a.T) @ bb.T
    return y


def adapter(adapters, prefix, h):
    """Houlsby adapter `prefix` on h: h + up(GELU(down(h))); h itself without adapters."""
    if not adapters:
        return h
    z = gelu(h @ adapters[prefix + ".down.weight"].T + adapters[prefix + ".down.bias"])
    return h + z @ adapters[prefix + ".up.weight"].T + adapters[prefix + ".up.bias"]


def lora_params(g, W, nb, targets):
    """LoRA r=2 (scaling 2) on `targets` of every block, B random so every gradient is
    non-trivial: (prefix -> (A, B, scaling), wire name -> leaf)."""
    lora, tr = {}, {}
    for j in range(nb):
        for n in targets:
            pre = f"blocks.{j}.{n}"
            o, i = W[pre + ".weight"].shape
            a, bb = leaf(rnd(g, 2, i, scale=1 / math.sqrt(i))), leaf(rnd(g, o, 2, scale=0.2))
            lora[pre] = (a, bb, 2.0)
            tr[pre + ".lora_a"], tr[pre + ".lora_b"] = a, bb
    return lora, tr


def adapter_params(g, nb, d):
    """Bottleneck-8 adapters after attention and after the MLP of every block, up-projection
    random so its gradients are non-trivial: wire name -> leaf."""
    ad = {}
    for j in range(nb):
        for where in ("adapter_attn", "adapter_ffn"):
            pre = f"blocks.{j}.{where}"
            for n, shape, sc in ((".down.weight", (8, d), 1 / math.sqrt(d)), (".down.bias", (8,), 1 / math.sqrt(d)),
                                 (".up.weight", (d, 8), 0.2), (".up.bias", (d,), 0.1)):
                ad[pre + n] = leaf(rnd(g, *shape, scale=sc))
    return ad


def biases(W):
    """W with every bias a leaf, and those leaves by wire name."""
    P = {n: leaf(t) if n.endswith(".bias") else t for n, t in W.items()}
    return P, {n: t for n, t in P.items() if n.endswith(".bias")}


def fresh_head(g, k, d):
    return leaf(rnd(g, k, d, scale=1 / math.sqrt(d))), leaf(rnd(g, k, scale=1 / math.sqrt(d)))


def transformer():
    g = torch.Generator().manual_seed(3)
    nb, d, heads, inter, s, b, k = 2, 32, 4, 64, 6, 3, 4
    W = block_weights(g, nb, d, inter)
    x = rnd(g, b, s, d)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] * 2 + [0.0] * 4])
    labels = torch.tensor([3, 0, 2])
    out = {f"w.{n}": t.float() for n, t in W.items()}
    out.update({"in.x": x.float(), "in.mask": mask.float(), "in.labels": labels.double()})

    def forward(P, lora=None, adapters=None, prompt=None):
        """P: name -> tensor (frozen or leaf). lora: prefix -> (A, B, scaling)."""
        def lin(prefix, h):
            return linear(P, lora, prefix, h)

        def adapt(prefix, h):
            return adapter(adapters, prefix, h)

        h, m = x, mask
        if prompt is not None:
            # prompt tokens are attended to but not pooled
            h = torch.cat([prompt[None].expand(b, -1, -1), h], 1)
            m = torch.cat([torch.ones(b, prompt.shape[0]), mask], 1)
            pool_m = torch.cat([torch.zeros(b, prompt.shape[0]), mask], 1)
        else:
            pool_m = mask
        for j in range(nb):
            pre = f"blocks.{j}"
            ctx = attention(lin(pre + ".attn.q", h), lin(pre + ".attn.k", h), lin(pre + ".attn.v", h), m, heads)
            o = adapt(pre + ".adapter_attn", lin(pre + ".attn.o", ctx))
            a = F.layer_norm(h + o, (d,), P[pre + ".ln1.weight"], P[pre + ".ln1.bias"], eps=1e-12)
            f = adapt(pre + ".adapter_ffn", lin(pre + ".ffn.down", gelu(lin(pre + ".ffn.up", a))))
            h = F.layer_norm(a + f, (d,), P[pre + ".ln2.weight"], P[pre + ".ln2.bias"], eps=1e-12)
        pm = pool_m[:, :, None]
        return (h * pm).sum(1) / pm.sum(1).clamp(min=1e-9)

    def head():
        return fresh_head(g, k, d)

    # lora r=2 alpha=4 on q, v, up
    lora, tr = lora_params(g, W, nb, ("attn.q", "attn.v", "ffn.up"))
    hw_, hb = head()
    tr.update({"head.weight": hw_, "head.bias": hb})
    run_case("lora", lambda: forward(W, lora=lora) @ hw_.T + hb, tr, labels, out)
    # bias: every linear and LayerNorm bias
    P, tr = biases(W)
    hw_, hb = head()
    tr.update({"head.weight": hw_, "head.bias": hb})
    run_case("bias", lambda: forward(P) @ hw_.T + hb, tr, labels, out)
    # adapter, bottleneck 8
    ad = adapter_params(g, nb, d)
    tr = dict(ad)
    hw_, hb = head()
    tr.update({"head.weight": hw_, "head.bias": hb})
    run_case("adapter", lambda: forward(W, adapters=ad) @ hw_.T + hb, tr, labels, out)
    # prompt, 3 tokens
    pt = leaf(rnd(g, 3, d, scale=0.5))
    hw_, hb = head()
    run_case("prompt", lambda: forward(W, prompt=pt) @ hw_.T + hb,
             {"prompt.tokens": pt, "head.weight": hw_, "head.bias": hb}, labels, out)
    save(os.path.join(OUT, "transformer.safetensors"), out)


def vit():
    g = torch.Generator().manual_seed(4)
    nb, d, heads, inter, s, b, k, eps = 2, 32, 4, 64, 5, 3, 4, 1e-6
    W = block_weights(g, nb, d, inter, layer_scale=True)
    W["final_ln.weight"] = rnd(g, d, scale=1.2, lo=0.8)
    W["final_ln.bias"] = rnd(g, d, scale=0.1)
    x = rnd(g, b, s, d)
    labels = torch.tensor([1, 3, 0])
    out = {f"w.{n}": t.float() for n, t in W.items()}
    out.update({"in.x": x.float(), "in.labels": labels.double()})

    def forward(P, lora=None, adapters=None, prompt=None):
        """DINOv2's blocks: x + ls1 * attn(LN1(x)), x + ls2 * mlp(LN2(x)); the adapter acts
        on a sublayer's output before the layer scale. P: name -> tensor (frozen or leaf)."""
        def lin(prefix, h):
            return linear(P, lora, prefix, h)

        def ln(name, h):
            return F.layer_norm(h, (d,), P[name + ".weight"], P[name + ".bias"], eps=eps)

        h = x
        if prompt is not None:
            # VPT: prompt tokens right after the CLS token, attended to by every token
            h = torch.cat([x[:, :1], prompt[None].expand(b, -1, -1), x[:, 1:]], 1)
        no_mask = torch.ones(b, h.shape[1])
        for j in range(nb):
            pre = f"blocks.{j}"
            a = ln(pre + ".ln1", h)
            ctx = attention(lin(pre + ".attn.q", a), lin(pre + ".attn.k", a), lin(pre + ".attn.v", a), no_mask, heads)
            h = h + P[pre + ".ls1"] * adapter(adapters, pre + ".adapter_attn", lin(pre + ".attn.o", ctx))
            f = lin(pre + ".ffn.down", F.gelu(lin(pre + ".ffn.up", ln(pre + ".ln2", h))))
            h = h + P[pre + ".ls2"] * adapter(adapters, pre + ".adapter_ffn", f)
        return ln("final_ln", h)[:, 0]

    def case(name, trainable, pooled, weights=()):
        """Runs a case whose head is fresh; pooled: () -> the CLS features."""
        hw_, hb = fresh_head(g, k, d)
        trainable = dict(trainable, **{"head.weight": hw_, "head.bias": hb})
        run_case(name, lambda: pooled() @ hw_.T + hb, trainable, labels, out, weights)

    case("head", {}, lambda: forward(W))
    # bias: every linear and LayerNorm bias, final_ln's included
    P, tr = biases(W)
    case("bias", tr, lambda: forward(P))
    # lora r=2 alpha=4: on q, v (the default) and on every linear layer
    lora, tr = lora_params(g, W, nb, ("attn.q", "attn.v"))
    case("lora", tr, lambda: forward(W, lora=lora))
    lora_all, tr = lora_params(g, W, nb, ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"))
    case("lora_all", tr, lambda: forward(W, lora=lora_all))
    # adapter, bottleneck 8
    ad = adapter_params(g, nb, d)
    case("adapter", ad, lambda: forward(W, adapters=ad))
    # prompt, 3 tokens
    pt = leaf(rnd(g, 3, d, scale=0.5))
    case("prompt", {"prompt.tokens": pt}, lambda: forward(W, prompt=pt))
    # full-tail: every tensor of the tail (layer scales included) and the head
    P = {n: leaf(t) for n, t in W.items()}
    case("full_tail", P, lambda: forward(P), weights=W)
    save(os.path.join(OUT, "vit.safetensors"), out)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    layers()
    conv_head()
    transformer()
    vit()
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")
