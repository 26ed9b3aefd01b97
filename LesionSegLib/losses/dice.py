"""Cross-entropy + soft Dice, the loss of the nets whose authors released no training
code with a loss of its own (MSE-Net, MS-LKSeg) and of the U-Net baseline.

* one output channel (sigmoid): ``BCE(x, m)`` (mean over pixels) ``+ 1 − Dice(σ(x), m)``;
* several channels (softmax, channel 0 = background): ``CE(x, label)`` (mean over
  pixels) ``+ 1 − Dice(softmax(x), onehot(label))`` averaged over the foreground classes
  1..C−1 only: the background's Dice is close to 1 on every lesion image and would only
  dilute the signal (nnU-Net's default leaves it out too).

Soft Dice is computed per image and per class, ``(2 Σ p·t + s) / (Σ p + Σ t + s)`` with
``s = 1``, then averaged. Per image rather than over the whole batch, so that a small
lesion counts as much as a large one in the same batch; the +1 keeps an image without
that lesion defined (its Dice then rewards predicting nothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .structure import as_float

DICE_SMOOTH = 1.0


def soft_dice(prob: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice per image and channel, (B, C)."""
    inter = (prob * target).sum(dim=(2, 3))
    return (2.0 * inter + smooth) / (prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + smooth)


def bce_dice_loss(logits: torch.Tensor, mask: torch.Tensor, *, dice_weight: float = 1.0,
                  smooth: float = DICE_SMOOTH, return_parts: bool = False):
    """Binary (per-channel sigmoid) BCE + Dice; ``mask`` has the logits' shape."""
    if logits.shape != mask.shape:
        raise ValueError(f"BCE+Dice: logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ")
    logits = as_float(logits)
    mask = mask.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    dice = 1.0 - soft_dice(torch.sigmoid(logits), mask, smooth).mean()
    loss = bce + dice_weight * dice
    return (loss, bce, dice) if return_parts else loss


def ce_dice_loss(logits: torch.Tensor, label: torch.Tensor, *, dice_weight: float = 1.0,
                 smooth: float = DICE_SMOOTH, return_parts: bool = False):
    """Softmax CE + Dice over the foreground classes; ``label`` (B, H, W) in 0..C−1."""
    B, C = logits.shape[:2]
    if C < 2:
        raise ValueError("CE+Dice needs at least two output channels (background and one class)")
    if label.shape != (B,) + tuple(logits.shape[2:]):
        raise ValueError(f"CE+Dice: label {tuple(label.shape)} does not match logits {tuple(logits.shape)}")
    label = label.long()
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi >= C:
        raise ValueError(f"CE+Dice: label values must lie in 0..{C - 1} for a {C}-channel output, "
                         f"found {lo}..{hi}")
    logits = as_float(logits)
    ce = F.cross_entropy(logits, label)
    onehot = F.one_hot(label, C).permute(0, 3, 1, 2).to(logits.dtype)
    dice = 1.0 - soft_dice(torch.softmax(logits, dim=1)[:, 1:], onehot[:, 1:], smooth).mean()
    loss = ce + dice_weight * dice
    return (loss, ce, dice) if return_parts else loss
