"""Res2Net-50 v1b, 26w×4s: the backbone of M2SNet and BSNet.

Gao et al., "Res2Net: A New Multi-scale Backbone Architecture", IEEE TPAMI 2021,
doi:10.1109/TPAMI.2019.2938758. The "v1b" variant has a deep stem (three 3×3 convs)
and average-pool downsampling in the shortcut.

Module and parameter names equal those of the reference implementation used by
M2SNet and BSNet, so the ImageNet file ``res2net50_v1b_26w_4s-3cf99910.pth`` and the
networks' released checkpoints (which embed it under ``resnet.``) load with
``strict=True``. The ImageNet classifier ``fc`` is kept for that reason only: the
segmentation nets never call it, so its parameters are frozen (``requires_grad=False``)
and excluded from the cards' parameter counts.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn


class Bottle2neck(nn.Module):
    """Res2Net bottleneck: 1×1 reduce, hierarchical 3×3 convs over ``scale`` channel
    splits (each split adds the previous split's output, except in the first block of a
    stage, ``stage=True``, where the last split is average-pooled instead), 1×1 expand."""

    expansion = 4
    bn_fusion_pairs = [("conv1", "bn1"), ("conv3", "bn3")]  # convs[i]/bns[i] added in __init__

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 base_width: int = 26, scale: int = 4, stage: bool = False):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0)))
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.nums = 1 if scale == 1 else scale - 1
        if stage:
            self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False) for _ in range(self.nums))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(self.nums))
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stage = stage
        self.scale = scale
        self.width = width
        self.bn_fusion_pairs = type(self).bn_fusion_pairs + [
            (f"convs.{i}", f"bns.{i}") for i in range(self.nums)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        splits = torch.split(out, self.width, 1)
        pieces: List[torch.Tensor] = []
        sp = None
        for i in range(self.nums):
            sp = splits[i] if (i == 0 or self.stage) else sp + splits[i]
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            pieces.append(sp)
        if self.scale != 1:
            pieces.append(self.pool(splits[self.nums]) if self.stage else splits[self.nums])
        out = self.bn3(self.conv3(torch.cat(pieces, 1)))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class Res2Net(nn.Module):
    """Res2Net v1b trunk. ``forward_features`` returns the stem output (after max-pool)
    and the four stage outputs, strides 4, 4, 8, 16, 32."""

    bn_fusion_pairs = [("conv1.6", "bn1")]

    def __init__(self, layers=(3, 4, 6, 3), base_width: int = 26, scale: int = 4,
                 num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.base_width = base_width
        self.scale = scale
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottle2neck.expansion, num_classes)
        self.fc.requires_grad_(False)  # kept for strict loading of official files; never used
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottle2neck.expansion:
            downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, planes * Bottle2neck.expansion, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(planes * Bottle2neck.expansion))
        layers = [Bottle2neck(self.inplanes, planes, stride, downsample, self.base_width, self.scale, stage=True)]
        self.inplanes = planes * Bottle2neck.expansion
        layers += [Bottle2neck(self.inplanes, planes, base_width=self.base_width, scale=self.scale)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor):
        x0 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x1 = self.layer1(x0)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x0, x1, x2, x3, x4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet classification, only to check a pretrained file end to end."""
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)[-1]), 1))


def res2net50_v1b_26w_4s(**kwargs) -> Res2Net:
    return Res2Net(layers=(3, 4, 6, 3), base_width=26, scale=4, **kwargs)
