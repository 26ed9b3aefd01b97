"""BSNet: boundary-guided semantic learning for COVID-19 lung infection segmentation.

Cong, Zhang, Yang, Zhang, Li, Huang, Kwong, "Boundary Guided Semantic Learning for
Real-time COVID-19 Lung Infection Segmentation System", IEEE Trans. Consumer
Electronics 2022, doi:10.1109/TCE.2022.3205376, arXiv:2209.02934. Official code:
github.com/rmcong/BSNet (``BSNet-code.zip``).

The layer graph, module names (state-dict keys) and interpolation conventions follow the
official ``BSNet(channel=32, n_class=1)``, so the released ``BSNet.pth`` loads with
``strict=True``. Conventions kept on purpose, because the released weights were trained
with them:

* ``BasicConv2d`` is conv + BN; the ReLU it defines is never applied (PraNet lineage);
* DSER's dilated 3×3 convs have no padding, so they shrink their maps (input sides must
  be multiples of 32 and at least 160);
* DSEL/DSER upsample with ``align_corners=True``; everything else with ``False``;
* one 1×1 head ``fam_conv`` is shared by the three boundary-guidance blocks.

Outputs (all logits at input size): ``lateral_map_5, lateral_map_4, lateral_map_3,
lateral_map_2, lateral_edge``; inference uses ``lateral_map_2``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBNAct, resize_like, scale_by
from .res2net import res2net50_v1b_26w_4s


def basic_conv(cin: int, cout: int, kernel_size=1, padding=0, dilation: int = 1) -> ConvBNAct:
    """``BasicConv2d`` of the official code: conv (no bias) + BN, no activation."""
    return ConvBNAct(cin, cout, kernel_size, padding=padding, dilation=dilation, act=False, named=True)


class ReceptiveFieldBlock(nn.Module):
    """``R_modified``: four branches (1×1; 1×1 → 1×k → k×1 → 3×3 dilation k, k=3,5,7),
    concatenated, 3×3 conv, plus a 1×1 residual projection, then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.relu = nn.ReLU(True)
        self.branch0 = nn.Sequential(basic_conv(cin, cout, 1))
        for i, k in enumerate((3, 5, 7), start=1):
            setattr(self, f"branch{i}", nn.Sequential(
                basic_conv(cin, cout, 1),
                basic_conv(cout, cout, (1, k), padding=(0, k // 2)),
                basic_conv(cout, cout, (k, 1), padding=(k // 2, 0)),
                basic_conv(cout, cout, 3, padding=k, dilation=k)))
        self.conv_cat = basic_conv(4 * cout, cout, 3, padding=1)
        self.conv_res = basic_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)
        return self.relu(self.conv_cat(cat) + self.conv_res(x))


class SpatialAttention(nn.Module):
    """Channel mean and max → 3×3 conv (2→1, no bias) → sigmoid; returns ``a·f + f``."""

    def __init__(self):
        super().__init__()
        self.fuse = ConvBNAct(2, 1, 3, norm=False, act=False, bias=False, named=True)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([f.mean(dim=1, keepdim=True), f.max(dim=1, keepdim=True)[0]], dim=1)
        return torch.sigmoid(self.fuse(pooled)) * f + f


class DSEL(nn.Module):
    """Top-level semantic preservation: ×4 upsampling (two ×2 steps), spatial attention, 1×1."""

    def __init__(self, channel: int, n_class: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv5 = nn.Conv2d(channel, n_class, 1)
        self.sa = SpatialAttention()

    def forward(self, x4: torch.Tensor) -> torch.Tensor:
        return self.conv5(self.sa(self.upsample(self.upsample(x4))))


class DSER(nn.Module):
    """Progressive semantic integration: unpadded dilated 3×3 convs (8, 4, 2) on the
    three RFB outputs, ×2 upsampling and concatenation top-down, 1×1 to ``n_class``."""

    def __init__(self, channel: int, n_class: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv2 = nn.Conv2d(channel, channel, 3, padding=0, dilation=8)
        self.conv3 = nn.Conv2d(channel, channel, 3, padding=0, dilation=4)
        self.conv4 = nn.Conv2d(channel, channel, 3, padding=0, dilation=2)
        self.conv5 = nn.Conv2d(3 * channel, n_class, 1)

    def forward(self, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.conv3(x3), self.upsample(self.conv4(x4))), 1)
        x = torch.cat((self.conv2(x2), self.upsample(x)), 1)
        return self.conv5(x)


class MBGC(nn.Module):
    """Mirror-symmetric boundary guidance block. ``left`` = edge guidance (H/4),
    ``down`` = backbone feature, ``right`` = previous 1-channel prediction; output 256
    channels at the size of ``left``."""

    bn_fusion_pairs = [("conv0", "bn0"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]

    def __init__(self, in_left: int, in_down: int, in_right: int, width: int = 256):
        super().__init__()
        self.conv0 = nn.Conv2d(in_left, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(in_down, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(in_right, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv_d1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv_d2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv_l = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(3 * width, width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, left: torch.Tensor, down: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn0(self.conv0(left)))
        down = F.relu(self.bn1(self.conv1(down)))
        right = F.relu(self.bn2(self.conv2(right)))
        z1 = F.relu(self.conv_l(left) * resize_like(down, left))
        z2 = F.relu(resize_like(self.conv_d1(down), left) * left)
        z3 = F.relu(resize_like(self.conv_d2(right), left))
        return F.relu(self.bn3(self.conv3(torch.cat((z1, z2, z3), dim=1))))


class BSNet(nn.Module):
    """BSNet. Input (B, 3, H, W) ImageNet-normalised (CT slices replicated to RGB),
    H, W multiples of 32, ≥ 160 (352 in the paper). Returns five logit maps."""

    def __init__(self, channel: int = 32, n_class: int = 1, in_channels: int = 3):
        super().__init__()
        self.resnet = res2net50_v1b_26w_4s(in_channels=in_channels)
        self.rfb2_1 = ReceptiveFieldBlock(512, channel)
        self.rfb3_1 = ReceptiveFieldBlock(1024, channel)
        self.rfb4_1 = ReceptiveFieldBlock(2048, channel)
        self.fam45 = MBGC(64, 2048, n_class)
        self.fam34 = MBGC(64, 1024, n_class)
        self.fam23 = MBGC(64, 512, n_class)
        self.fam_conv = nn.Conv2d(256, n_class, kernel_size=1)
        self.edge_conv1 = basic_conv(256, 64, 1)
        self.edge_conv2 = basic_conv(64, 64, 3, padding=1)
        self.edge_conv3 = basic_conv(64, 64, 3, padding=1)
        self.edge_conv4 = basic_conv(64, n_class, 3, padding=1)
        self.dsel = DSEL(channel, n_class)
        self.dser = DSER(channel, n_class)

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        if h % 32 or w % 32 or min(h, w) < 160:
            raise ValueError(f"BSNet needs sides that are multiples of 32 and at least 160, got {h}×{w}")
        _, x1, x2, x3, x4 = self.resnet.forward_features(x)
        x2_rfb, x3_rfb, x4_rfb = self.rfb2_1(x2), self.rfb3_1(x3), self.rfb4_1(x4)

        edge_guidance = self.edge_conv3(self.edge_conv2(self.edge_conv1(x1)))
        lateral_edge = scale_by(self.edge_conv4(edge_guidance), 4)

        dsel = self.dsel(x4_rfb)
        fam5 = resize_like(self.dser(x2_rfb, x3_rfb, x4_rfb), dsel) + dsel
        lateral_map_5 = scale_by(fam5, 8)

        fam4 = self.fam_conv(self.fam45(edge_guidance, x4, fam5))
        lateral_map_4 = scale_by(fam4 + resize_like(fam5, fam4), 4)
        fam3 = self.fam_conv(self.fam34(edge_guidance, x3, fam4))
        lateral_map_3 = scale_by(fam3 + fam4, 4)
        fam2 = self.fam_conv(self.fam23(edge_guidance, x2, fam3))
        lateral_map_2 = scale_by(fam2 + fam3, 4)
        return lateral_map_5, lateral_map_4, lateral_map_3, lateral_map_2, lateral_edge
