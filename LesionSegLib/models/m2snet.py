"""M2SNet and MSNet: multi-scale subtraction networks.

Zhao, Jia, Zhang, Lu, Zhang, "M2SNet: Multi-scale in Multi-scale Subtraction Network
for Medical Image Segmentation", arXiv:2303.10894 (2023); MSNet: MICCAI 2021,
doi:10.1007/978-3-030-87193-2_12. Official code: github.com/Xiaoqi-Zhao-DLUT/MSNet-M2SNet.

Nothing here is reconstructed: the layer graph, the module names (hence state-dict keys)
and the numerical order of operations follow the official ``M2SNet``/``MSNet`` classes,
so the released checkpoints load with ``strict=True`` and give the same outputs.

* Res2Net-50 v1b features x1 (stem, 64 ch, H/4), x2..x5 (stages 1–4).
* ``x{2..5}_dem_1``: 3×3 conv-BN-ReLU to 64 channels; x1 is used as it is.
* Subtraction unit SU(A, B) on A resized to B: ``|A−B|`` (MSNet) or, the MSSU of M2SNet,
  ``|A−B| + |F3(A)−F3(B)| + |F5(A)−F5(B)|`` where F_k is a fixed k×k all-ones kernel
  summing over all 64 channels, then a learnable BN and ReLU. One F3 and one F5 (with
  their BNs) are shared by every SU of the network. Each SU ends in its own conv-BN-ReLU.
* Orders 1–4 of the inter-layer subtraction pyramid, level aggregation by addition, an
  additive top-down decoder, and one logit map bilinearly resized to the input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBNAct, resize_like
from .res2net import res2net50_v1b_26w_4s


class BoxSumFilter(nn.Module):
    """Fixed k×k all-ones convolution over all channels (bias 0), then BN and ReLU.

    The ones kernel is not learned and, as in the official ``CNN1``, is not part of the
    state dict (a non-persistent buffer); only ``norm`` is. When fused, the BN scale is
    folded into a per-output-channel constant kernel.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.register_buffer("weight", torch.ones(channels, channels, kernel_size, kernel_size), persistent=False)
        self.register_buffer("bias", torch.zeros(channels), persistent=False)
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self._fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias, stride=1, padding=self.kernel_size // 2)
        if not self._fused:
            out = self.norm(out)
        return self.relu(out)

    @torch.no_grad()
    def fuse_for_inference_(self) -> None:
        from .fusion import fold_bn_into_conv_weights
        self.weight, self.bias = fold_bn_into_conv_weights(self.weight, self.bias, self.norm)
        self.norm = nn.Identity()
        self._fused = True


def _cbr(cin: int = 64, cout: int = 64) -> ConvBNAct:
    return ConvBNAct(cin, cout, 3, bias=True)


class M2SNet(nn.Module):
    """M2SNet (``multi_scale=True``) or MSNet (``multi_scale=False``).

    Input (B, 3, H, W), ImageNet-normalised RGB, H and W multiples of 32 (352 in the
    paper). Output: (B, 1, H, W) logits.
    """

    def __init__(self, multi_scale: bool = True, in_channels: int = 3, channels: int = 64):
        super().__init__()
        c = channels
        self.multi_scale = multi_scale
        self.resnet = res2net50_v1b_26w_4s(in_channels=in_channels)
        if multi_scale:
            self.conv_3 = BoxSumFilter(c, 3)
            self.conv_5 = BoxSumFilter(c, 5)
        self.x5_dem_1 = _cbr(2048, c)
        self.x4_dem_1 = _cbr(1024, c)
        self.x3_dem_1 = _cbr(512, c)
        self.x2_dem_1 = _cbr(256, c)
        # one conv-BN-ReLU per subtraction unit, named after its inputs (official names)
        for name in ("x5_x4", "x4_x3", "x3_x2", "x2_x1", "x5_x4_x3", "x4_x3_x2", "x3_x2_x1",
                     "x5_x4_x3_x2", "x4_x3_x2_x1", "x5_dem_4", "x5_x4_x3_x2_x1",
                     "level3", "level2", "level1"):
            setattr(self, name, _cbr(c, c))
        self.x5_dem_5 = _cbr(2048, c)
        self.output4 = _cbr(c, c)
        self.output3 = _cbr(c, c)
        self.output2 = _cbr(c, c)
        self.output1 = nn.Sequential(nn.Conv2d(c, 1, kernel_size=3, padding=1))

    def subtract(self, unit: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """SU / MSSU: ``a`` (coarser) is resized to ``b`` first."""
        a = resize_like(a, b)
        d = torch.abs(a - b)
        if self.multi_scale:
            d = d + torch.abs(self.conv_3(a) - self.conv_3(b)) + torch.abs(self.conv_5(a) - self.conv_5(b))
        return unit(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x1, x2, x3, x4, x5 = self.resnet.forward_features(x)
        d5, d4, d3, d2 = self.x5_dem_1(x5), self.x4_dem_1(x4), self.x3_dem_1(x3), self.x2_dem_1(x2)
        su = self.subtract
        # order 1
        x5_4 = su(self.x5_x4, d5, d4)
        x4_3 = su(self.x4_x3, d4, d3)
        x3_2 = su(self.x3_x2, d3, d2)
        x2_1 = su(self.x2_x1, d2, x1)
        # order 2
        x5_4_3 = su(self.x5_x4_x3, x5_4, x4_3)
        x4_3_2 = su(self.x4_x3_x2, x4_3, x3_2)
        x3_2_1 = su(self.x3_x2_x1, x3_2, x2_1)
        # order 3
        x5_4_3_2 = su(self.x5_x4_x3_x2, x5_4_3, x4_3_2)
        x4_3_2_1 = su(self.x4_x3_x2_x1, x4_3_2, x3_2_1)
        # order 4
        x5_4_3_2_1 = su(self.x5_x4_x3_x2_x1, self.x5_dem_4(x5_4_3_2), x4_3_2_1)
        # level aggregation
        level4 = x5_4
        level3 = self.level3(x4_3 + x5_4_3)
        level2 = self.level2(x3_2 + x4_3_2 + x5_4_3_2)
        level1 = self.level1(x2_1 + x3_2_1 + x4_3_2_1 + x5_4_3_2_1)
        # top-down decoder
        out = self.output4(resize_like(self.x5_dem_5(x5), level4) + level4)
        out = self.output3(resize_like(out, level3) + level3)
        out = self.output2(resize_like(out, level2) + level2)
        out = self.output1(resize_like(out, level1) + level1)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
