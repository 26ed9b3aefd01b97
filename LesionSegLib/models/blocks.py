"""Small building blocks shared by the LesionSeg networks.

Every block here is used by more than one network, or is the one place where a
convention of the original code (Caffe's fixed bilinear deconvolution, PyTorch's
``F.upsample`` defaults) is pinned down. Nets never re-implement these.

Blocks that need a special rule to reach their inference form implement
``fuse_for_inference_()``; ``LesionSegLib.models.fusion.fuse_for_inference`` calls it.
Blocks whose forward applies a convolution and then a BatchNorm held under other
attribute names declare them in ``bn_fusion_pairs`` so the fusion pass can fold them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

IntPair = Union[int, Tuple[int, int]]


def _same_padding(kernel_size: IntPair, dilation: int) -> IntPair:
    if isinstance(kernel_size, int):
        return dilation * (kernel_size - 1) // 2
    return tuple(dilation * (k - 1) // 2 for k in kernel_size)


class ConvBNAct(nn.Sequential):
    """Conv2d → BatchNorm2d → activation, as one ``nn.Sequential``.

    The child names decide the state-dict keys, which must equal the official ones:
    ``named=False`` gives ``0.weight, 1.weight`` (``nn.Sequential(Conv, BN, ReLU)`` in
    M2SNet), ``named=True`` gives ``conv.weight, bn.weight`` (``BasicConv2d`` in BSNet,
    PraNet lineage). ``act=False`` drops the activation (BSNet's BasicConv2d defines a
    ReLU it never applies); ``norm=False`` drops the BN.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair = 3, *,
                 stride: int = 1, padding: Optional[IntPair] = None, dilation: int = 1,
                 groups: int = 1, bias: Optional[bool] = None, norm: bool = True,
                 act: Union[bool, nn.Module] = True, named: bool = False):
        if padding is None:
            padding = _same_padding(kernel_size, dilation)
        if bias is None:
            bias = not norm
        layers = [("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                     padding=padding, dilation=dilation, groups=groups, bias=bias))]
        if norm:
            layers.append(("bn", nn.BatchNorm2d(out_channels)))
        if act is True:
            layers.append(("act", nn.ReLU(inplace=True)))
        elif isinstance(act, nn.Module):
            layers.append(("act", act))
        if named:
            super().__init__(OrderedDict(layers))
        else:
            super().__init__(*[m for _, m in layers])


def resize_to(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize to ``size``; ``align_corners=False`` is what ``F.upsample(...,
    mode='bilinear')`` in the official M2SNet/BSNet code resolves to."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def resize_like(x: torch.Tensor, ref: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    return resize_to(x, ref.shape[-2:], align_corners)


def scale_by(x: torch.Tensor, factor: float, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize by a scale factor, PyTorch semantics (output = floor(in·factor))."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=align_corners)


def bilinear_kernel(size: int) -> torch.Tensor:
    """The 2-D bilinear interpolation kernel of Caffe's ``bilinear`` filler (and HED's
    ``upsample_filt``), ``size × size``."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).float()


class FixedBilinearUpsample(nn.Module):
    """Caffe ``Deconvolution`` with a fixed bilinear kernel (kernel 2s, stride s, no
    padding), channel-wise, followed by Caffe ``Crop`` to a reference size at ``offset``.

    This is HED's side-output upsampling as used by L-Seg: the deconvolutions have
    ``lr_mult: 0`` so they are not learned, and HED's net surgery fills them with a
    bilinear kernel on the channel diagonal. The kernel is rebuilt from ``factor``, so it
    is a non-persistent buffer and does not appear in state dicts.
    """

    def __init__(self, channels: int, factor: int, offset: int = 0):
        super().__init__()
        self.channels, self.factor, self.offset = channels, factor, offset
        kernel = bilinear_kernel(2 * factor)
        self.register_buffer("weight", kernel.expand(channels, 1, -1, -1).clone(), persistent=False)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        up = F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.factor, groups=self.channels)
        h, w = size
        o = self.offset
        if up.shape[-2] < o + h or up.shape[-1] < o + w:
            raise ValueError(f"cannot crop {tuple(up.shape[-2:])} to {(h, w)} at offset {o}")
        return up[..., o:o + h, o:o + w]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}, offset={self.offset}"


class SideOutput(nn.Module):
    """Deep-supervision head: 1×1 conv to ``out_channels`` logits, resized to the input.

    ``upsample='bilinear'`` interpolates (PyTorch nets); ``upsample='caffe'`` uses a
    :class:`FixedBilinearUpsample` and crops (HED/L-Seg). ``factor`` is the stride of
    the feature map relative to the input.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int, upsample: str = "bilinear"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.factor = factor
        if upsample not in ("bilinear", "caffe"):
            raise ValueError(f"upsample must be 'bilinear' or 'caffe', not {upsample!r}")
        self.up = FixedBilinearUpsample(out_channels, factor) if (upsample == "caffe" and factor > 1) else None

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        y = self.conv(x)
        if self.up is not None:
            return self.up(y, size)
        return resize_to(y, size)


class DoubleConv(nn.Sequential):
    """Two 3×3 conv-BN-ReLU ("same" padding): a U-Net level, and the "Conv ×2" of the
    U-shaped decoders."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNAct(in_channels, out_channels, 3), ConvBNAct(out_channels, out_channels, 3))


class UpConcatDecoder(nn.Module):
    """Decoder level of the U-shaped nets: the deeper map is bilinearly resized to the
    skip's size, concatenated before it (``[deep, skip]``), and passed through a
    :class:`DoubleConv`."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.convs = DoubleConv(deep_channels + skip_channels, out_channels)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([resize_like(deep, skip), skip], dim=1))
