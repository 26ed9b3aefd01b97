"""U-Net baseline.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015, LNCS 9351, pp. 234–241, doi:10.1007/978-3-319-24574-4_28.

The topology is the paper's: a contracting path of levels of two 3×3 convolutions +
ReLU with 2×2 max-pooling in between, the channel count doubling per level; an expanding
path of 2×2 up-convolutions (transposed convolutions) halving the channels,
concatenation with the same-level encoder features, two 3×3 convolutions + ReLU; a 1×1
convolution to the classes. Modern departures, all listed in the model card's
``choices``:

* "same" padding (the paper's convs are unpadded, 572² in → 388² out, which needs
  overlap-tile inference); with padding the output has the input's size and skip
  features need no cropping;
* BatchNorm after every 3×3 conv (the paper has none; it postdates U-Net);
* ``base_width`` 32 instead of 64 (about a quarter of the parameters; 7.8 M);
* ``depth`` levels (the paper: 5, i.e. 4 poolings), configurable.

This is a baseline for comparison with the published lesion networks; nothing is taken
from any official code (the 2015 release is Caffe and was not used).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .blocks import DoubleConv


class UpLevel(nn.Module):
    """Expanding-path level: 2×2 stride-2 up-convolution halving the channels,
    concatenation ``[skip, up]`` (skip first, as in the paper's figure), DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net with same padding and BatchNorm.

    Input (B, in_channels, H, W), H and W multiples of ``2**(depth-1)`` (16 by default).
    Output (B, num_classes, H, W) logits: sigmoid for one class, softmax over the
    channels (background included) for more.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, base_width: int = 32, depth: int = 5):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2, not {depth}")
        self.depth = depth
        self.size_divisor = 2 ** (depth - 1)
        widths = [base_width * 2 ** i for i in range(depth)]
        self.encoder = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.encoder.append(DoubleConv(c, w))
            c = w
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        # decoder[i] goes from level i+1 up to level i; built from the bottom up
        self.decoder = nn.ModuleList(UpLevel(widths[i + 1], widths[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f"UNet(depth={self.depth}) needs H and W divisible by {self.size_divisor}, "
                             f"got {h}×{w}; pad the input first")
        skips: List[torch.Tensor] = []
        for i, level in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = level(x)
            skips.append(x)
        x = skips.pop()  # bottleneck
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)
