"""Structure loss (weighted BCE + weighted IoU) and the boundary helpers of the
PraNet family (PraNet, Inf-Net, MSNet/M2SNet, BSNet's inferred recipe).

The structure loss, as M2SNet's ``train.py`` defines it for logits ``x`` and a mask
``m`` (both (B, C, H, W)):

* ``weit = 1 + 5·|avgpool31(m) − m|`` (kernel 31, stride 1, padding 15, PyTorch's
  default ``count_include_pad=True``: the zero padding counts in the average, so
  pixels near the image border see a diluted neighbourhood, exactly as the original);
* weighted BCE per image and channel: ``Σ weit·bce(x, m) / Σ weit``;
* weighted IoU per image and channel, with ``p = σ(x)``:
  ``1 − (Σ p·m·weit + 1) / (Σ (p + m)·weit − Σ p·m·weit + 1)``;
* ``loss = mean over the batch (and channels) of wBCE + wIoU``.

The official code computes the BCE with ``reduce='none'``. That is the *legacy
boolean* argument, and the string is truthy, so PyTorch returns the **mean BCE over the
whole batch** (a scalar), and the following "weighting" divides ``Σ weit·scalar`` by
``Σ weit``: the wBCE of the released code is plain, unweighted mean BCE. Both
behaviours are offered: ``bce_reduction_quirk=False`` (default) weights every pixel's
BCE as the PraNet paper describes; ``True`` reproduces the released code bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: the boundary-weight window of the structure loss (``avg_pool2d(kernel 31, stride 1, pad 15)``)
WEIGHT_KERNEL = 31
#: the boundary-weight gain (``1 + 5·|…|``)
WEIGHT_GAIN = 5.0


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Half-precision predictions (autocast) are lifted to float32: sums of BCE over
    hundreds of thousands of pixels lose too much in fp16. float64 stays float64
    (gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def boundary_weight(mask: torch.Tensor) -> torch.Tensor:
    """``1 + 5·|avgpool31(mask) − mask|`` (stride 1, padding 15, count_include_pad=True)."""
    pad = WEIGHT_KERNEL // 2
    return 1.0 + WEIGHT_GAIN * (F.avg_pool2d(mask, kernel_size=WEIGHT_KERNEL, stride=1, padding=pad) - mask).abs()


def weighted_bce(pred: torch.Tensor, mask: torch.Tensor, weit: torch.Tensor,
                 bce_reduction_quirk: bool = False) -> torch.Tensor:
    """wBCE per image and channel, shape (B, C)."""
    if bce_reduction_quirk:
        # The released code's value: one mean BCE over every pixel of the batch, the same
        # for all images (Σ weit·s / Σ weit == s). Written out instead of calling the
        # deprecated ``reduce=`` argument, which PyTorch may drop.
        mean_bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="mean")
        return mean_bce.expand(pred.shape[:2])
    bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="none")
    return (weit * bce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))


def weighted_iou(pred: torch.Tensor, mask: torch.Tensor, weit: torch.Tensor) -> torch.Tensor:
    """wIoU loss per image and channel, shape (B, C); ``pred`` are logits."""
    p = torch.sigmoid(pred)
    inter = (p * mask * weit).sum(dim=(2, 3))
    union = ((p + mask) * weit).sum(dim=(2, 3))
    return 1.0 - (inter + 1.0) / (union - inter + 1.0)


def structure_loss(pred: torch.Tensor, mask: torch.Tensor, *, bce_reduction_quirk: bool = False,
                   return_parts: bool = False):
    """Structure loss of logits ``pred`` against ``mask`` (same shape (B, C, H, W), mask in
    [0, 1], soft values allowed). Returns the scalar loss, or ``(loss, wbce, wiou)`` with
    the batch means of both terms when ``return_parts``."""
    if pred.dim() != 4 or pred.shape != mask.shape:
        raise ValueError(f"structure_loss needs prediction and mask of the same (B, C, H, W) shape, "
                         f"got {tuple(pred.shape)} and {tuple(mask.shape)}")
    pred = as_float(pred)
    mask = mask.to(pred.dtype)
    weit = boundary_weight(mask)
    wbce = weighted_bce(pred, mask, weit, bce_reduction_quirk)
    wiou = weighted_iou(pred, mask, weit)
    loss = (wbce + wiou).mean()
    if return_parts:
        return loss, wbce.mean(), wiou.mean()
    return loss


def morphological_edge(mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Boundary band of a (soft) mask: grey-level dilation minus erosion over a
    ``kernel_size``² square (max-pooling; the padding is −∞, so the image border itself
    is not an edge). For a binary mask this is the one-pixel band on both sides of the
    contour; on COVID-SemiSeg it contains every pixel of Inf-Net's released edge maps."""
    if mask.dim() != 4:
        raise ValueError(f"morphological_edge needs a (B, C, H, W) mask, got {tuple(mask.shape)}")
    pad = kernel_size // 2
    dilated = F.max_pool2d(mask, kernel_size, stride=1, padding=pad)
    eroded = -F.max_pool2d(-mask, kernel_size, stride=1, padding=pad)
    return dilated - eroded
