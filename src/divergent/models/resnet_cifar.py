"""CIFAR-style ResNets used by the standard distillation benchmarks (CRD, DKD, mdistiller).

A 3x3 stem, three stages of basic blocks (the 2nd and 3rd halve the resolution),
global average pooling and a linear classifier. Depth d means (d - 2) / 6 blocks
per stage. ``resnet8x4``/``resnet32x4`` use widths (32, 64, 128, 256); the plain
ones (16, 16, 32, 64). Parameter counts for 100 classes: resnet8x4 1.23M,
resnet32x4 7.43M, resnet20 0.28M, resnet56 0.86M (as reported by CRD).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["CifarResNet", "RESNETS", "resnet8x4", "resnet32x4", "resnet20", "resnet56"]


class BasicBlock(nn.Module):
    """``x -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN`` plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of ``depth`` (6n + 2) with stem width ``widths[0]`` and stage widths ``widths[1:]``.

    >>> resnet8x4(num_classes=100)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must hold 4 numbers (stem and three stages), got {list(widths)}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.stage_names = ["layer1", "layer2", "layer3"]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.classifier(self.pool(out))


def _factory(depth: int, widths: Sequence[int]):
    def build(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"CIFAR ResNet of depth {depth} with widths {tuple(widths)}."
    return build


_WIDE = (32, 64, 128, 256)
_PLAIN = (16, 16, 32, 64)
resnet8x4 = _factory(8, _WIDE)
resnet32x4 = _factory(32, _WIDE)
resnet20 = _factory(20, _PLAIN)
resnet56 = _factory(56, _PLAIN)

RESNETS = {
    "resnet8": _factory(8, _PLAIN),
    "resnet14": _factory(14, _PLAIN),
    "resnet20": resnet20,
    "resnet32": _factory(32, _PLAIN),
    "resnet56": resnet56,
    "resnet110": _factory(110, _PLAIN),
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
}
