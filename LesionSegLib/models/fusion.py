"""Inference form of a network: BatchNorm folded into the preceding convolutions,
re-parameterisable branches merged.

``fuse_for_inference(model)`` returns a fused *copy* in eval mode; the original is not
touched, so a user's training model is never modified by running inference. The fused
copy computes the same function as ``model.eval()`` up to float rounding.

Three sources of fusable pairs, so that no network needs its own fusion code:

* ``nn.Sequential`` children: a ``Conv2d`` directly followed by ``BatchNorm2d``;
* ``bn_fusion_pairs`` declared by a block: ``[(conv_path, bn_path), …]`` for blocks
  whose forward calls a conv and then a BN held under other names (Res2Net, BSNet MBGC);
* a ``fuse_for_inference_()`` method on a block for anything else (fixed filters,
  MS-LKSeg's large-kernel re-parameterisation, dynamic convolution).
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn


def bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x·scale + shift`` per channel."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean * scale


@torch.no_grad()
def fold_bn_into_conv_weights(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d):
    """Weights and bias of ``bn(conv(x))`` as one convolution (weight's dim 0 = out channels)."""
    scale, shift = bn_scale_shift(bn)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias * scale + shift
    return w, b


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    if bn.track_running_stats is False or bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} outputs but BN has {bn.num_features} features")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(conv.weight.device, conv.weight.dtype)
    w, b = fold_bn_into_conv_weights(conv.weight, conv.bias, bn)
    fused.weight.copy_(w)
    fused.bias.copy_(b)
    return fused


def _fuse_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
            seq._modules[a] = fuse_conv_bn(conv, bn)
            seq._modules[b] = nn.Identity()


def _fuse_declared(module: nn.Module) -> None:
    for conv_path, bn_path in getattr(module, "bn_fusion_pairs", ()):
        conv, bn = module.get_submodule(conv_path), module.get_submodule(bn_path)
        if isinstance(bn, nn.Identity):  # already folded (e.g. as part of a Sequential)
            continue
        module.set_submodule(conv_path, fuse_conv_bn(conv, bn))
        module.set_submodule(bn_path, nn.Identity())


def fuse_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the inference form of ``model`` (a fused copy unless ``inplace``), in eval mode.

    The number of folded BatchNorms is stored as ``fused.lesionseg_fused_bn``.
    """
    fused = model if inplace else copy.deepcopy(model)
    fused.eval()
    before = count_batchnorms(fused)
    # children before parents, so a block's own fuse rule sees already-fused children
    for module in reversed(list(fused.modules())):
        hook = getattr(module, "fuse_for_inference_", None)
        if callable(hook):
            hook()
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module)
        _fuse_declared(module)
    fused.lesionseg_fused_bn = before - count_batchnorms(fused)
    fused.lesionseg_is_fused = True
    return fused


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
