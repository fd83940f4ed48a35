"""A small MobileNetV2-style CNN whose inner channels were pruned in torch, exported to ONNX.

What people get from ``torch.nn.utils.prune``: the pruned channels are zero, but the exported
model has exactly the shapes (and the size and latency) of the unpruned one. Each inverted
residual block (1×1 expand → BN → ReLU6 → 3×3 depthwise → BN → ReLU6 → 1×1 project → BN, plus
a residual Add) has ``amount`` of its inner channels removed by ``ln_structured`` on the expand
convolution; the depthwise filters and both BatchNorms of those channels are zeroed too (weight
and bias 0), so every tensor of a pruned channel is exactly zero.

    python examples/pruning/make_pruned_cnn.py model.onnx [--amount 0.5] [--size 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expansion: int = 6) -> None:
        super().__init__()
        inner = channels * expansion
        self.expand = nn.Conv2d(channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.depthwise = nn.Conv2d(inner, inner, 3, padding=1, groups=inner, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.project = nn.Conv2d(inner, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = nn.functional.relu6(self.bn2(self.depthwise(h)))
        return x + self.bn3(self.project(h))

    def prune_inner(self, amount: float) -> None:
        """Zero ``amount`` of the inner channels (smallest L2 norm of the expand filters)."""
        prune.ln_structured(self.expand, "weight", amount=amount, n=2, dim=0)
        prune.remove(self.expand, "weight")
        dead = self.expand.weight.detach().flatten(1).abs().sum(dim=1) == 0
        with torch.no_grad():
            self.depthwise.weight[dead] = 0
            for bn in (self.bn1, self.bn2):
                bn.weight[dead] = 0
                bn.bias[dead] = 0


class SmallMobileNet(nn.Module):
    def __init__(self, channels: int = 24, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*(InvertedResidual(channels) for _ in range(blocks)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_pruned_cnn(*, amount: float = 0.5, seed: int = 0) -> SmallMobileNet:
    """The network in eval mode with random weights, non-trivial BatchNorm statistics and
    ``amount`` of every block's inner channels pruned to zero."""
    torch.manual_seed(seed)
    model = SmallMobileNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    for block in model.blocks:
        block.prune_inner(amount)
    return model.eval()


def export_pruned_cnn(path: str | Path, *, amount: float = 0.5, size: int = 64, seed: int = 0) -> Path:
    """Export :func:`build_pruned_cnn` with the TorchScript exporter (opset 17), input ``x``
    float32 [1, 3, size, size], output ``logits``."""
    path = Path(path)
    model = build_pruned_cnn(amount=amount, seed=seed)
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    export_pruned_cnn(args.output, amount=args.amount, size=args.size)


if __name__ == "__main__":
    main()
