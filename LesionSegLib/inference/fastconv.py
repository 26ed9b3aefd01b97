"""Large-kernel depthwise convolutions computed through the FFT, for CPU inference.

MS-LKSeg's Re-DWConv (RepLKNet style) fuses into one 21×21 depthwise convolution per
skip level. oneDNN computes depthwise convolutions above 13×13 on a slow generic path,
at about 1 GFLOP/s — half of MS-LKSeg's whole inference time at 256² — while through
the FFT a channel costs O(HW log HW) whatever the kernel size (20× faster here). The result is the same linear map
(cross-correlation with zero padding), up to float rounding (≈1e-6 relative).

:func:`replace_large_depthwise` swaps such ``nn.Conv2d`` modules in the *inference copy*
of a network (after ``fuse_for_inference``); the user's network is never modified. It is
applied on the CPU only: cuDNN's depthwise kernels are fast on GPUs.

Training on the CPU uses the same path (``trainable=True``): the FFT module then shares the
convolution's own weight and bias parameters (same names, so state dicts and optimisers
are unchanged) and gradients flow through ``rfft2`` to them. A training step of MS-LKSeg
(batch 4, 192², one thread on a core shared with another job) went from 44 s to 13 s.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

#: smallest kernel side for which the FFT is used: oneDNN's depthwise kernels are fast up
#: to 13×13 (≈0.1 s for 2×32×256² on 2 cores) and fall to a slow path from 15×15 on
#: (1.5–2.3 s), where the FFT takes ≈0.1 s whatever the kernel size
MIN_FFT_KERNEL = 15


def _fast_size(n: int) -> int:
    """Smallest m ≥ n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


class FFTDepthwiseConv2d(nn.Module):
    """``nn.Conv2d`` with ``groups == in == out channels``, stride 1, dilation 1 and zero
    padding, computed as a product of spectra. The kernel's spectrum is cached per
    input size (a volume's slices all have the same size)."""

    def __init__(self, conv: nn.Conv2d, trainable: bool = False) -> None:
        super().__init__()
        if not is_fft_candidate(conv, min_kernel=1):
            raise ValueError("only stride-1, undilated, zero-padded depthwise convolutions can use the FFT")
        if trainable:  # the convolution's own parameters: optimisers and state dicts see no change
            self.weight, self.bias = conv.weight, conv.bias
        else:
            self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
            self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.padding = tuple(conv.padding)
        self._spectra: Dict[Tuple, torch.Tensor] = {}

    def _spectrum(self, size: Tuple[int, int], device, dtype) -> torch.Tensor:
        kernel = self.weight[:, 0].flip(-1, -2).to(device=device, dtype=dtype)
        if self.weight.requires_grad and torch.is_grad_enabled():
            return torch.fft.rfft2(kernel, s=size)  # training: the kernel changes at every step
        key = (size, str(device), dtype, self.weight._version)
        if key not in self._spectra:
            # a convolution with the flipped kernel is the cross-correlation nn.Conv2d computes
            self._spectra = {key: torch.fft.rfft2(kernel, s=size)}  # keep one size: memory stays bounded
        return self._spectra[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.weight.shape[-2:]
        ph, pw = self.padding
        h, w = x.shape[-2:]
        out_h, out_w = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
        size = (_fast_size(h + kh - 1), _fast_size(w + kw - 1))
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        spec = torch.fft.rfft2(x.to(dtype), s=size) * self._spectrum(size, x.device, dtype)
        full = torch.fft.irfft2(spec, s=size)
        # full[n] = Σ_u w[u]·x[n − (k − 1) + u]; nn.Conv2d's y[i] = Σ_u w[u]·x[i − p + u]
        y = full[..., kh - 1 - ph: kh - 1 - ph + out_h, kw - 1 - pw: kw - 1 - pw + out_w]
        if self.bias is not None:
            y = y + self.bias.to(dtype).view(1, -1, 1, 1)
        memory = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 \
            and not x.is_contiguous() else torch.contiguous_format
        return y.to(x.dtype).contiguous(memory_format=memory)


def is_fft_candidate(module: nn.Module, min_kernel: int = MIN_FFT_KERNEL) -> bool:
    return (type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels
            and module.stride == (1, 1) and module.dilation == (1, 1) and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple) and min(module.kernel_size) >= min_kernel)


def replace_large_depthwise(model: nn.Module, min_kernel: int = MIN_FFT_KERNEL, trainable: bool = False) -> int:
    """Replace, in place, every large-kernel depthwise ``nn.Conv2d`` of ``model`` by an
    :class:`FFTDepthwiseConv2d` (``trainable``: sharing its parameters, for training).
    Returns how many were replaced."""
    targets = [name for name, m in model.named_modules() if is_fft_candidate(m, min_kernel)]
    for name in targets:
        model.set_submodule(name, FFTDepthwiseConv2d(model.get_submodule(name), trainable=trainable))
    return len(targets)


def restore_convolutions(model: nn.Module) -> int:
    """Undo a trainable :func:`replace_large_depthwise`: ``nn.Conv2d`` modules holding the
    same parameters again (before exporting or saving the module itself)."""
    targets = [name for name, m in model.named_modules() if isinstance(m, FFTDepthwiseConv2d)]
    for name in targets:
        fft = model.get_submodule(name)
        c, kh, kw = fft.weight.shape[0], fft.weight.shape[-2], fft.weight.shape[-1]
        conv = nn.Conv2d(c, c, (kh, kw), padding=fft.padding, groups=c, bias=fft.bias is not None,
                         device=fft.weight.device, dtype=fft.weight.dtype)
        conv.weight = fft.weight
        if fft.bias is not None:
            conv.bias = fft.bias
        model.set_submodule(name, conv)
    return len(targets)
