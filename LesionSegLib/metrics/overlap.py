"""Overlap on batches (:func:`dice_iou`, the trainer's validation) and the area under the
precision-recall curve (:func:`aupr`, L-Seg's metric), exact over all thresholds."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .common import NAN, MetricsError


def dice_iou(pred, gt, spatial_dims: int = 2, empty: float = 1.0):
    """Dice and IoU of boolean masks, per sample and channel, on torch or numpy.

    ``pred`` and ``gt``: same shape (…, *spatial), bool or integer 0/1 (threshold
    probabilities first: float input is refused so a probability map is never silently
    binarised at 0). The last ``spatial_dims`` axes are reduced: (B, K, H, W) gives
    (B, K). Torch tensors stay on their device (no host sync); numpy gives float64 arrays.
    Where both masks are empty the result is ``empty`` (1.0, as :func:`evaluate_case`).
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise MetricsError(f"dice_iou: prediction shape {tuple(pred.shape)} != reference shape {tuple(gt.shape)}")
    if pred.ndim < spatial_dims:
        raise MetricsError(f"dice_iou: need at least {spatial_dims} spatial dims, got shape {tuple(pred.shape)}")
    dims = tuple(range(pred.ndim - spatial_dims, pred.ndim))
    if hasattr(pred, "is_floating_point"):  # torch
        import torch
        for t, what in ((pred, "prediction"), (gt, "reference")):
            if t.is_floating_point():
                raise MetricsError(f"dice_iou: {what} is {t.dtype}; pass boolean masks (threshold first)")
        p, g = pred.bool(), gt.bool()
        inter = (p & g).sum(dim=dims).double()
        total = p.sum(dim=dims).double() + g.sum(dim=dims).double()
        union = total - inter
        fill = torch.full_like(total, float(empty))
        dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), fill)
        iou = torch.where(union > 0, inter / union.clamp_min(1), fill)
        return dice, iou
    p, g = np.asarray(pred), np.asarray(gt)
    for a, what in ((p, "prediction"), (g, "reference")):
        if np.issubdtype(a.dtype, np.floating):
            raise MetricsError(f"dice_iou: {what} is {a.dtype}; pass boolean masks (threshold first)")
    p, g = p.astype(bool), g.astype(bool)
    inter = np.logical_and(p, g).sum(axis=dims, dtype=np.float64)
    total = p.sum(axis=dims, dtype=np.float64) + g.sum(axis=dims, dtype=np.float64)
    union = total - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), float(empty))
        iou = np.where(union > 0, inter / np.maximum(union, 1), float(empty))
    return dice, iou


def score_counts(probabilities, gt) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (ascending) with the number of positive and negative voxels at
    each: everything the precision–recall curve depends on. Counts of several cases can
    be pooled with :func:`aupr_from_counts` without keeping their voxels."""
    s = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(gt).ravel()
    if s.shape != y.shape:
        raise MetricsError(f"aupr: {s.size} scores for {y.size} reference voxels")
    if s.size and not np.isfinite(s).all():
        raise MetricsError("aupr: the probabilities contain NaN or infinite values")
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y.astype(bool), minlength=values.size)
    total = np.bincount(inverse, minlength=values.size)
    return values, pos, total - pos


def aupr_from_counts(values, pos, neg) -> float:
    """Average precision from (possibly concatenated, unsorted, repeated) score counts."""
    values, pos, neg = np.asarray(values, np.float64), np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if values.size == 0:
        return NAN
    uniq, inverse = np.unique(values, return_inverse=True)
    pos = np.bincount(inverse, weights=pos, minlength=uniq.size)[::-1]  # descending score
    neg = np.bincount(inverse, weights=neg, minlength=uniq.size)[::-1]
    total_pos = pos.sum()
    if total_pos == 0:
        return NAN  # recall undefined: no reference voxel of the class
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    precision = tp / (tp + fp)
    recall = tp / total_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def aupr(probabilities, gt) -> float:
    """Area under the precision–recall curve (exact step-wise average precision, as
    scikit-learn's ``average_precision_score``): ``Σ_n (R_n − R_{n−1}) P_n`` with one
    step per distinct score (tied scores form one threshold). NaN when ``gt`` is empty."""
    return aupr_from_counts(*score_counts(probabilities, gt))
