"""MSE-Net: a multiple-encoders network for stroke lesion segmentation on T1 MRI.

Source: github.com/jcfszxc/MSE-Net. That repository holds only a README (no code, no
paper, figures not retrievable); no paper was found. What it says, verbatim:

* "multiple encoders network … mainly composed of ASFF module and Residual encoder";
* "ASFF uses the parallel architecture of atrous convolutions with different sampling rates";
* "Residual encoder obtains the high-level semantic features with the high-resolution";
* "uses the encoding-decoding framework";
* "We divide the pathological images into three levels according to the number of
  pixels in the mask region";
* ATLAS: DSC 0.6405, better than D-UNet (8.64 M parameters), X-Net (15.1 M) and Double-UNet.

**Everything below the level of those sentences is reconstructed** (model card
``cards/msenet.json``, list "reconstructed"). The reconstruction, at the default
configuration (widths 32/64/128/256, input 1×192×192):

* A **plain encoder**: U-Net double 3×3 conv-BN-ReLU blocks at strides 1, 2, 4, 8,
  2×2 max-pooling in between. It keeps fine, boundary-level detail.
* A **residual encoder**: a conv stem and basic residual blocks at strides 1, 2, 4, 8,
  then, where a ResNet would downsample to stride 16, a "semantic" stage of residual
  blocks that stays at stride 8 and uses dilation 2 instead (DeepLab's replacement of
  striding by dilation). This is the reading of "high-level semantic features with the
  high-resolution": deep features at 1/8 rather than 1/16 of the input.
* **Per-level fusion** of the two encoders at strides 1, 2, 4: concatenation and a 1×1
  conv-BN-ReLU; the fused maps are the decoder's skip connections.
* **ASFF** (atrous spatial feature fusion) at the stride-8 bottleneck: it reads the
  concatenation of both encoders' deepest features, runs parallel branches (1×1 for
  rate 1, 3×3 atrous for the other rates, default 1/6/12/18, plus a global-pooling
  branch) and fuses them with a 1×1 conv-BN-ReLU, as DeepLabv3's ASPP does.
* A **U-Net decoder**: bilinear ×2 upsampling, concatenation with the fused skip, double
  3×3 conv-BN-ReLU, up to stride 1; a 1×1 head gives one logit map at the input size.

Every BatchNorm follows its convolution inside an ``nn.Sequential`` (``ConvBNAct``), so
``fusion.fuse_for_inference`` folds all of them without extra declarations.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from .blocks import ConvBNAct, DoubleConv, UpConcatDecoder, resize_like


class ResidualBlock(nn.Module):
    """ResNet basic block: 3×3 conv-BN-ReLU, 3×3 conv-BN, plus the input (or its 1×1
    conv-BN projection when the shape changes), then ReLU. ``dilation`` applies to both
    3×3 convs; padding equals the dilation, so the size only changes by ``stride``."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride=stride, dilation=dilation)
        self.conv2 = ConvBNAct(cout, cout, 3, dilation=dilation, act=False)
        if stride != 1 or cin != cout:
            self.shortcut = ConvBNAct(cin, cout, 1, stride=stride, act=False)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class PlainEncoder(nn.Module):
    """U-Net encoder: ``DoubleConv`` per level, max-pooling between levels.
    Returns one feature map per level, strides 1, 2, 4, … (``len(widths)`` levels)."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        chans = [in_channels] + list(widths)
        self.levels = nn.ModuleList(DoubleConv(a, b) for a, b in zip(chans, chans[1:]))
        self.pool = nn.MaxPool2d(2)
        self.strides = [2 ** i for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class ResidualEncoder(nn.Module):
    """Residual encoder that keeps its high-level features at high resolution.

    ``stages[0]`` is a 3×3 conv-BN-ReLU stem and ``blocks[0]`` residual blocks at stride
    1; ``stages[i]`` (i ≥ 1) starts with a stride-2 residual block, so stage i is at
    stride 2**i. The last stage, ``semantic``, has ``semantic_blocks`` residual blocks
    with dilation ``semantic_dilation`` and **no** downsampling: where a ResNet would go
    to stride 2**len(widths), it stays at stride 2**(len(widths)-1) and widens its
    receptive field by dilation instead. Returns the outputs of every stage, the
    semantic stage last.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: Sequence[int],
                 semantic_blocks: int, semantic_dilation: int):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"residual_blocks needs one entry per width, got {blocks} for {widths}")
        stages = []
        for i, (w, n) in enumerate(zip(widths, blocks)):
            if i == 0:
                layers = [ConvBNAct(in_channels, w, 3)] + [ResidualBlock(w, w) for _ in range(n)]
            else:
                if n < 1:
                    raise ValueError("every residual stage after the stem needs at least one block")
                layers = [ResidualBlock(widths[i - 1], w, stride=2)] + [ResidualBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.semantic = nn.Sequential(*[ResidualBlock(widths[-1], widths[-1], dilation=semantic_dilation)
                                        for _ in range(semantic_blocks)])
        self.strides = [2 ** i for i in range(len(widths))] + [2 ** (len(widths) - 1)]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats.append(self.semantic(x))
        return feats


class ASFF(nn.Module):
    """Atrous spatial feature fusion: parallel atrous convolutions at several sampling
    rates on the same input, optionally a global-average-pooling branch, concatenated and
    fused by a 1×1 conv-BN-ReLU. All branches keep the input size (padding = rate).

    Rate 1 is a 1×1 conv (DeepLabv3's ASPP convention; a 3×3 at rate 1 would only repeat
    the encoders' own 3×3 context). The pooling branch is conv + bias + ReLU without BN:
    BN on a 1×1 map would fail in training with batch size 1, and there is nothing to fold.
    """

    def __init__(self, in_channels: int, out_channels: int, branch_channels: int,
                 rates: Sequence[int], image_pooling: bool = True):
        super().__init__()
        rates = [int(r) for r in rates]
        if not rates or min(rates) < 1:
            raise ValueError(f"atrous rates must be positive integers, got {rates}")
        self.rates = rates
        self.branches = nn.ModuleList(
            ConvBNAct(in_channels, branch_channels, 1 if r == 1 else 3, dilation=r) for r in rates)
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch_channels, 1), nn.ReLU(inplace=True),
        ) if image_pooling else None
        n = len(rates) + (1 if image_pooling else 0)
        self.project = ConvBNAct(n * branch_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.image_pool is not None:
            outs.append(self.image_pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


class MSENet(nn.Module):
    """MSE-Net (reconstruction). Input (B, in_channels, H, W): one axial T1 slice, or
    2k+1 neighbouring slices as channels (2.5D), intensities scaled to [0, 1]; H and W
    multiples of 2**(len(widths)-1) (8 by default; 192×192 in the default preset).
    Output: (B, out_channels, H, W) logits.
    """

    #: prior lesion-pixel probability used to initialise the head bias (see ``_init_weights``)
    LESION_PRIOR = 0.01

    def __init__(self, in_channels: int = 1, out_channels: int = 1,
                 widths: Sequence[int] = (32, 64, 128, 256), residual_blocks: Sequence[int] = (1, 1, 2, 2),
                 semantic_blocks: int = 2, semantic_dilation: int = 2,
                 asff_channels: int = 128, atrous_rates: Sequence[int] = (1, 6, 12, 18),
                 image_pooling: bool = True):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError("MSE-Net needs at least two encoder levels")
        self.widths = widths
        self.size_divisor = 2 ** (len(widths) - 1)
        self.plain_encoder = PlainEncoder(in_channels, widths)
        self.residual_encoder = ResidualEncoder(in_channels, widths, residual_blocks,
                                                semantic_blocks, semantic_dilation)
        # per-level fusion of the two encoders, above the bottleneck level
        self.skip_fusion = nn.ModuleList(ConvBNAct(2 * w, w, 1) for w in widths[:-1])
        # bottleneck: plain deepest level + residual semantic stage, both at the deepest stride
        self.asff = ASFF(2 * widths[-1], widths[-1], asff_channels, atrous_rates, image_pooling)
        # decoder level i takes the level-(i+1) output upsampled and the fused skip i
        self.decoder = nn.ModuleList(UpConcatDecoder(widths[i + 1], widths[i], widths[i])
                                     for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Lesion pixels are ~1 % of ATLAS slices: starting the head at that prior keeps the
        # first BCE steps from being dominated by background (RetinaNet's prior init).
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(self.head.bias, math.log(self.LESION_PRIOR / (1 - self.LESION_PRIOR)))

    def forward_features(self, x: torch.Tensor) -> Dict[str, object]:
        """All intermediate maps: ``plain`` (per level), ``residual`` (per stage, the
        semantic stage last), ``skips`` (fused, strides 1 … 2**(L-2)), ``bottleneck`` (ASFF
        output) and ``decoder`` (deepest first)."""
        plain = self.plain_encoder(x)
        residual = self.residual_encoder(x)
        # resize_like only acts on sizes that are not multiples of size_divisor, where
        # max-pooling (floor) and strided convs (ceil) disagree by one pixel
        skips = [fuse(torch.cat([p, resize_like(r, p)], 1))
                 for fuse, p, r in zip(self.skip_fusion, plain, residual)]
        bottleneck = self.asff(torch.cat([plain[-1], resize_like(residual[-1], plain[-1])], 1))
        y = bottleneck
        decoded = []
        for i in reversed(range(len(self.decoder))):
            y = self.decoder[i](y, skips[i])
            decoded.append(y)
        return {"plain": plain, "residual": residual, "skips": skips,
                "bottleneck": bottleneck, "decoder": decoded}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_features(x)["decoder"][-1]
        return resize_like(self.head(y), x)
