"""MS-LKSeg: multi-semantic synergistic learning with large-kernel convolution.

Li, Niu, Wang, Wang, Liu, Li, Guo, Li, "MS-LKSeg: enhancing multi-semantic synergistic
learning with large kernel convolution for medical image segmentation", Biomedical
Signal Processing and Control (2025), art. 108635, doi:10.1016/j.bspc.2025.108635.
Repository github.com/niuniude/MS-LKSeg: README and three figures, **no code**.

**Everything in this file is reconstructed** from the paper's figures (Fig. 1 overview,
Fig. 2 DCM, Fig. 3 Re-DWConv), its abstract, and the papers of the parts it names or
visibly reuses. No layer graph, width or initialisation comes from official code, and no
official weights exist. The model card lists every part with its source.

Layout (Fig. 1a):

* encoder: 5 levels of two **MIS** blocks ("Multi-semantic Information Synergy"), a 2×2
  max-pool between levels (4 down-samplings; the 5th level is the bottleneck);
* MIS block (Fig. 1a inset) = ``DyConv → MIE → MIDM``:

  - DyConv: dynamic convolution of Chen et al., "Dynamic Convolution: Attention over
    Convolution Kernels", CVPR 2020 — K 3×3 kernels mixed per sample by a softmax
    attention (GAP → FC → ReLU → FC → softmax(z/τ)), then BN and ReLU;
  - MIE (Fig. 1b, Fig. 2 DCM): spatial gating from the H- and W-profiles of the map,
    split in 4 channel groups, depthwise 1-D convs k = 3, 5, 7, 9 *shared* by the two
    directions, GroupNorm(4), sigmoid. This is the SMSA part of SCSA (Si et al.,
    arXiv:2407.05128, code HZAI-ZJNU/SCSA), which the figure reproduces;
  - MIDM (Fig. 1c): average-pool down-sampling, GroupNorm(1), depthwise 1×1 Q/K/V,
    channel-wise multi-head self-attention, spatial mean, sigmoid gate — SCSA's PCSA;

* skips: one **LD** block per skip (Fig. 1d): ``BN → Conv1×1 → Re-DWConv → ReLU →
  Conv1×1`` plus identity, where Re-DWConv (Fig. 3) is a 21×21 depthwise conv with a
  parallel 3×3 depthwise conv, each followed by BN, summed (RepLKNet style);
* decoder: 4 levels of bilinear ×2 up-sampling, concatenation with the LD-processed
  skip, two 3×3 conv-BN-ReLU; a 1×1 conv head gives ``num_classes`` logits.

Inference form (``fuse_for_inference``): each DyConv folds its BN into all K kernels (and
per-kernel biases), which is exact because the kernel attentions sum to one; each
Re-DWConv merges both branches and their BNs into one 21×21 depthwise conv with bias; each
LD block folds its leading BN into the following 1×1 conv; the decoder's conv-BN pairs
are folded by the generic pass.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import UpConcatDecoder
from .fusion import bn_scale_shift


# --------------------------------------------------------------------------- DyConv
class DynamicConvBNReLU(nn.Module):
    """DyConv of the MIS block: dynamic convolution (Chen et al., CVPR 2020), BN, ReLU.

    ``num_kernels`` kernels ``W_k`` (and, once fused, biases ``b_k``) are mixed per sample
    with attention ``π(x) = softmax(FC(ReLU(FC(GAP(x)))) / τ)``; the first FC reduces the
    channels by ``reduction`` (4 in the paper), at least to ``min_hidden``. The whole batch
    is convolved in one call: samples are stacked along channels and the per-sample
    kernels become the groups of a grouped convolution.

    ``temperature`` τ: Chen et al. train with τ = 30 annealed to 1 over the first epochs
    (set it with :meth:`MSLKSeg.set_dyconv_temperature`); inference uses τ = 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 num_kernels: int = 4, reduction: int = 4, temperature: float = 1.0,
                 min_hidden: int = 4):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("DyConv kernel size must be odd ('same' padding)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.num_kernels = kernel_size, num_kernels
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels, kernel_size, kernel_size))
        # no bias before BN; fusion creates one bias per kernel
        self.register_parameter("bias", None)
        hidden = max(in_channels // reduction, min_hidden)
        self.attention = nn.Sequential(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten(1)),
            ("fc1", nn.Linear(in_channels, hidden)),
            ("act", nn.ReLU(inplace=True)),
            ("fc2", nn.Linear(hidden, num_kernels)),
        ]))
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        for k in range(num_kernels):  # each kernel initialised like an nn.Conv2d
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))

    def kernel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_kernels) mixing weights, each row sums to 1."""
        return torch.softmax(self.attention(x) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        attn = self.kernel_attention(x)
        weight = (attn @ self.weight.flatten(1)).reshape(b * self.out_channels, c, k, k)
        bias = None if self.bias is None else (attn @ self.bias).reshape(-1)
        y = F.conv2d(x.reshape(1, b * c, h, w), weight, bias, padding=k // 2, groups=b)
        return self.act(self.bn(y.reshape(b, self.out_channels, h, w)))

    @torch.no_grad()
    def fuse_for_inference_(self) -> None:
        """Fold the BN into every kernel: ``BN(Σπ_k W_k∗x) = Σπ_k (s·W_k)∗x + t`` and
        ``t = Σπ_k t`` because ``Σπ_k = 1``, so each kernel gets bias ``t`` (+ ``s·b_k``)."""
        if isinstance(self.bn, nn.Identity):
            return
        scale, shift = bn_scale_shift(self.bn)
        self.weight.mul_(scale.reshape(1, -1, 1, 1, 1))
        bias = shift.expand(self.num_kernels, -1).clone()
        if self.bias is not None:
            bias += self.bias * scale
        self.bias = nn.Parameter(bias)
        self.bn = nn.Identity()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_kernels={self.num_kernels}, temperature={self.temperature}")


# ------------------------------------------------------------------ MIE (SCSA SMSA)
class MultiSemanticSpatialAttention(nn.Module):
    """MIE (Fig. 1b) with its DCM (Fig. 2); SCSA's shared multi-semantic spatial attention.

    ``x`` is averaged along W (profile over H) and along H (profile over W). Each profile
    is split into ``len(kernel_sizes)`` channel groups; group i is filtered by a depthwise
    1-D conv of size ``kernel_sizes[i]``. The same convs serve both directions ("shared"
    in the abstract). Each direction then has its own GroupNorm(4) and a sigmoid, and the
    input is multiplied by both gates.
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (3, 5, 7, 9), norm_groups: int = 4):
        super().__init__()
        n = len(kernel_sizes)
        if channels % n or channels % norm_groups:
            raise ValueError(f"MIE needs channels ({channels}) divisible by {n} and by {norm_groups}")
        self.group_channels = g = channels // n
        self.group_convs = nn.ModuleList(
            nn.Conv1d(g, g, k, padding=k // 2, groups=g) for k in kernel_sizes)
        self.norm_h = nn.GroupNorm(norm_groups, channels)
        self.norm_w = nn.GroupNorm(norm_groups, channels)

    def _filter_profile(self, profile: torch.Tensor) -> torch.Tensor:
        groups = torch.split(profile, self.group_channels, dim=1)
        return torch.cat([conv(p) for conv, p in zip(self.group_convs, groups)], dim=1)

    def gates(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gates of shape (B, C, H, 1) and (B, C, 1, W), values in (0, 1)."""
        gate_h = torch.sigmoid(self.norm_h(self._filter_profile(x.mean(dim=3))))
        gate_w = torch.sigmoid(self.norm_w(self._filter_profile(x.mean(dim=2))))
        return gate_h.unsqueeze(3), gate_w.unsqueeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_h, gate_w = self.gates(x)
        return x * gate_h * gate_w


# ----------------------------------------------------------------- MIDM (SCSA PCSA)
class ProgressiveChannelSelfAttention(nn.Module):
    """MIDM (Fig. 1c); SCSA's progressive channel-wise self-attention.

    Average-pool with a ``window``×``window`` kernel and stride (clamped to the map size,
    so the 6×6 bottleneck of a 96×96 input is pooled to 1×1), GroupNorm(1), depthwise
    1×1 convs for Q, K and V, attention between the channels of each head
    (``softmax(Q Kᵀ / √head_dim) V``), mean over positions, sigmoid: one gate per channel.
    """

    def __init__(self, channels: int, heads: int = 8, window: int = 7, qkv_bias: bool = False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"MIDM needs channels ({channels}) divisible by heads ({heads})")
        self.heads, self.window = heads, window
        self.scale = (channels // heads) ** -0.5
        self.norm = nn.GroupNorm(1, channels)
        self.query = nn.Conv2d(channels, channels, 1, groups=channels, bias=qkv_bias)
        self.key = nn.Conv2d(channels, channels, 1, groups=channels, bias=qkv_bias)
        self.value = nn.Conv2d(channels, channels, 1, groups=channels, bias=qkv_bias)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, 1) channel gate in (0, 1)."""
        b, c, h, w = x.shape
        win = min(self.window, h, w)
        y = self.norm(F.avg_pool2d(x, win, win))
        q, k, v = (proj(y).reshape(b, self.heads, c // self.heads, -1)
                   for proj in (self.query, self.key, self.value))
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        mixed = (attn @ v).reshape(b, c, -1)
        return torch.sigmoid(mixed.mean(dim=2)).reshape(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MISBlock(nn.Module):
    """Multi-semantic Information Synergy block: DyConv(3×3)-BN-ReLU → MIE → MIDM."""

    def __init__(self, in_channels: int, out_channels: int, *, dyconv_kernels: int = 4,
                 dyconv_reduction: int = 4, dyconv_temperature: float = 1.0,
                 mie_kernel_sizes: Sequence[int] = (3, 5, 7, 9), midm_heads: int = 8, midm_window: int = 7):
        super().__init__()
        self.dyconv = DynamicConvBNReLU(in_channels, out_channels, 3, num_kernels=dyconv_kernels,
                                        reduction=dyconv_reduction, temperature=dyconv_temperature)
        self.mie = MultiSemanticSpatialAttention(out_channels, mie_kernel_sizes)
        self.midm = ProgressiveChannelSelfAttention(out_channels, midm_heads, midm_window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.midm(self.mie(self.dyconv(x)))


# -------------------------------------------------------------------- LD / Re-DWConv
class ReparamDepthwiseConv(nn.Module):
    """Re-DWConv (Fig. 3): depthwise ``large``×``large`` conv + BN in parallel with a
    depthwise ``small``×``small`` conv + BN, summed. :meth:`reparameterize` merges both into
    one depthwise ``large``×``large`` conv with bias (the small kernel zero-padded to the
    centre, RepLKNet, Ding et al. CVPR 2022)."""

    def __init__(self, channels: int, large_kernel: int = 21, small_kernel: int = 3):
        super().__init__()
        if large_kernel % 2 != 1 or small_kernel % 2 != 1 or small_kernel > large_kernel:
            raise ValueError("Re-DWConv kernels must be odd with small_kernel <= large_kernel")
        self.channels, self.large_kernel, self.small_kernel = channels, large_kernel, small_kernel
        self.large_conv = nn.Conv2d(channels, channels, large_kernel, padding=large_kernel // 2,
                                    groups=channels, bias=False)
        self.large_bn = nn.BatchNorm2d(channels)
        self.small_conv = nn.Conv2d(channels, channels, small_kernel, padding=small_kernel // 2,
                                    groups=channels, bias=False)
        self.small_bn = nn.BatchNorm2d(channels)
        self.register_module("merged", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return self.merged(x)
        return self.large_bn(self.large_conv(x)) + self.small_bn(self.small_conv(x))

    @torch.no_grad()
    def merged_kernel(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weight (C, 1, L, L) and bias (C,) of the single equivalent depthwise conv."""
        s_large, t_large = bn_scale_shift(self.large_bn)
        s_small, t_small = bn_scale_shift(self.small_bn)
        pad = (self.large_kernel - self.small_kernel) // 2
        weight = (self.large_conv.weight * s_large.reshape(-1, 1, 1, 1)
                  + F.pad(self.small_conv.weight * s_small.reshape(-1, 1, 1, 1), [pad] * 4))
        return weight, t_large + t_small

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.merged is not None:
            return
        weight, bias = self.merged_kernel()
        merged = nn.Conv2d(self.channels, self.channels, self.large_kernel, padding=self.large_kernel // 2,
                           groups=self.channels, bias=True).to(weight.device, weight.dtype)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        del self.large_conv, self.large_bn, self.small_conv, self.small_bn
        self.merged = merged

    def fuse_for_inference_(self) -> None:
        self.reparameterize()


class LDBlock(nn.Module):
    """LD block on a skip connection (Fig. 1d):
    ``x + Conv1×1(ReLU(ReDWConv(Conv1×1(BN(x)))))``, width kept."""

    def __init__(self, channels: int, large_kernel: int = 21, small_kernel: int = 3):
        super().__init__()
        self.pre_norm = nn.BatchNorm2d(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1, bias=False)  # the BNs after it absorb a bias
        self.spatial = ReparamDepthwiseConv(channels, large_kernel, small_kernel)
        self.act = nn.ReLU(inplace=True)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.act(self.spatial(self.proj_in(self.pre_norm(x)))))

    @torch.no_grad()
    def fuse_for_inference_(self) -> None:
        """Fold the leading BN into the 1×1 conv: ``W(s·x + t) + b = (W·s)x + (Wt + b)``.
        Exact because a 1×1 conv has no padding for the shift to be lost at."""
        if isinstance(self.pre_norm, nn.Identity):
            return
        scale, shift = bn_scale_shift(self.pre_norm)
        old = self.proj_in
        w2d = old.weight[:, :, 0, 0]
        fused = nn.Conv2d(old.in_channels, old.out_channels, 1, bias=True).to(w2d.device, w2d.dtype)
        fused.weight.copy_(old.weight * scale.reshape(1, -1, 1, 1))
        fused.bias.copy_(w2d @ shift + (old.bias if old.bias is not None else 0))
        self.proj_in = fused
        self.pre_norm = nn.Identity()


# ---------------------------------------------------------------------- the network
class MSLKSeg(nn.Module):
    """MS-LKSeg (reconstructed, see the module docstring).

    Input (B, ``in_channels``, H, W), H and W multiples of 2**(len(widths)−1) (16 by
    default). Output (B, ``num_classes``, H, W) logits.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1,
                 widths: Sequence[int] = (32, 64, 128, 256, 512), dyconv_kernels: int = 4,
                 dyconv_reduction: int = 4, dyconv_temperature: float = 1.0,
                 mie_kernel_sizes: Sequence[int] = (3, 5, 7, 9), midm_heads: int = 8,
                 midm_window: int = 7, ld_large_kernel: int = 21, ld_small_kernel: int = 3):
        super().__init__()
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError("MS-LKSeg needs at least two levels")
        mis = dict(dyconv_kernels=dyconv_kernels, dyconv_reduction=dyconv_reduction,
                   dyconv_temperature=dyconv_temperature, mie_kernel_sizes=tuple(mie_kernel_sizes),
                   midm_heads=midm_heads, midm_window=midm_window)
        self.widths = widths
        self.encoder = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.encoder.append(nn.Sequential(MISBlock(prev, w, **mis), MISBlock(w, w, **mis)))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.skips = nn.ModuleList(LDBlock(w, ld_large_kernel, ld_small_kernel) for w in widths[:-1])
        # decoder[i] produces level i (0 = full resolution) from level i+1 and skip i
        self.decoder = nn.ModuleList(UpConcatDecoder(widths[i + 1], widths[i], widths[i])
                                     for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def set_dyconv_temperature(self, temperature: float) -> None:
        """Softmax temperature of every DyConv (Chen et al. anneal it from 30 to 1)."""
        for m in self.modules():
            if isinstance(m, DynamicConvBNReLU):
                m.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, stage in enumerate(self.encoder):
            if level:
                x = self.pool(x)
            x = stage(x)
            if level < len(self.skips):
                skips.append(self.skips[level](x))
        for level in reversed(range(len(self.decoder))):
            x = self.decoder[level](x, skips[level])
        return self.head(x)
