"""Validation of a training run: loss, Dice and IoU with the definitions of
:func:`LesionSegLib.metrics.dice_iou`, per image (2D folders) or per case (volumes)."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .. import models
from ..data.dataset import collate
from ..data.sources import TargetSpec
from .distributed import DistEnv


def _metrics_fn():
    """``LesionSegLib.metrics.dice_iou`` (the project's definition), or None."""
    try:
        from ..metrics import dice_iou
        return dice_iou
    except Exception:  # pragma: no cover - metrics.py is part of LesionSeg
        return None


def counts(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per sample and class: (intersection, predicted, true) pixel counts, (B, N, 3)."""
    out = []
    for c in range(1, n_classes + 1):
        p, t = pred == c, target == c
        out.append(torch.stack([(p & t).flatten(1).sum(1), p.flatten(1).sum(1), t.flatten(1).sum(1)], 1))
    return torch.stack(out, 1).double()


def dice_iou_from_counts(c: np.ndarray):
    """Dice and IoU of one item from its (N classes, 3) counts (intersection, predicted,
    true), with the definitions of :func:`LesionSegLib.metrics.dice_iou`: per class
    ``2tp/(P+G)`` and ``tp/(P+G−tp)``, 1 where the class is absent from both, then the
    mean over the classes."""
    inter, p, t = c[:, 0], c[:, 1], c[:, 2]
    total = p + t
    union = total - inter
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(dice.mean()), float(iou.mean())


def dice_iou_channels(pred: torch.Tensor, target: torch.Tensor):
    """Per item, the mean over channels of Dice and IoU of binary (B, K, H, W) maps (1 for a
    channel empty in both), as float64 (B,) tensors."""
    p, t = pred.flatten(2).double(), target.flatten(2).double()
    inter, total = (p * t).sum(2), p.sum(2) + t.sum(2)
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    iou = torch.where(total - inter > 0, inter / (total - inter).clamp(min=1), torch.ones_like(total))
    return dice.mean(1).cpu(), iou.mean(1).cpu()


def predict_labels(out: torch.Tensor, spec: TargetSpec, threshold: float) -> torch.Tensor:
    out = out.float()
    if spec.softmax:
        return out.argmax(1)
    prob = torch.sigmoid(out)
    if out.shape[1] == 1:
        return (prob[:, 0] >= threshold).long()
    best = prob.argmax(1) + 1  # multi-label: most probable class where any passes
    return torch.where(prob.max(1).values >= threshold, best, torch.zeros_like(best))


def validate_epoch(ddp_model, model, val_ds, loss_fn, spec, threshold, dev, dist: DistEnv, amp_dtype, channels_last,
              recipe, name, cancel) -> Optional[Dict[str, float]]:
    """Validation loss, Dice and IoU. Dice/IoU per item (an image of a 2D folder, a case
    of volumes: slices summed into one volume score), averaged; ranks share the items
    and add their counts. None when cancelled."""
    n = len(val_ds)
    source = val_ds.source
    per_case = source.kind != "folder" and not spec.multi_label  # volumes: one score per case, its slices summed
    item_names = sorted({source.case(i) for i in range(n)}) if per_case else None
    item_index = {c: j for j, c in enumerate(item_names)} if per_case else None
    table = torch.zeros(len(item_names) if per_case else 1, spec.n_classes, 3, dtype=torch.float64)
    image_scores = torch.zeros(3, dtype=torch.float64)  # sum of Dice, sum of IoU, images
    loss_sum = torch.zeros(2, dtype=torch.float64)
    dice_iou = _metrics_fn()
    bs = int(recipe.get("val_batch_size") or recipe["batch_size"])
    mine = list(range(dist.rank, n, dist.world_size))
    model.eval()
    loss_fn.eval()
    with torch.no_grad():
        for b0 in range(0, len(mine), bs):
            if cancel is not None and getattr(cancel, "cancelled", False) and not dist.enabled:
                return None
            idx = mine[b0:b0 + bs]
            batch = collate([val_ds[i] for i in idx])
            batch = {k: v.to(dev) for k, v in batch.items()}
            x = batch["image"]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(x)  # the bare module: no DDP synchronisation in evaluation
                loss = loss_fn(outputs, batch)
            loss_sum += torch.tensor([float(loss) * len(idx), len(idx)], dtype=torch.float64)
            if spec.multi_label:
                # overlapping classes: each channel is its own binary map
                prob = torch.sigmoid(models.inference_output(name, outputs).float())
                d, u = dice_iou_channels(prob >= threshold, batch["mask"] >= 0.5)
                image_scores += torch.stack([d.sum(), u.sum(), torch.tensor(float(len(idx)), dtype=torch.float64)])
                continue
            pred = predict_labels(models.inference_output(name, outputs), spec, threshold)
            if per_case:
                c = counts(pred, batch["label"], spec.n_classes).cpu()
                for j, i in enumerate(idx):
                    table[item_index[source.case(i)]] += c[j]
            else:
                classes = torch.arange(1, spec.n_classes + 1, device=pred.device)[None, :, None, None]
                p_oh, g_oh = pred[:, None] == classes, batch["label"][:, None] == classes
                if dice_iou is not None:
                    d, u = dice_iou(p_oh, g_oh)
                    d, u = d.double().mean(1).cpu(), u.double().mean(1).cpu()
                else:
                    pairs = [dice_iou_from_counts(c.numpy()) for c in counts(pred, batch["label"], spec.n_classes).cpu()]
                    d = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
                    u = torch.tensor([b for _, b in pairs], dtype=torch.float64)
                image_scores += torch.stack([d.sum(), u.sum(), torch.tensor(float(len(idx)), dtype=torch.float64)])
    dist.all_reduce_sum(loss_sum)
    if per_case:
        dist.all_reduce_sum(table)
        scores = [dice_iou_from_counts(table[i].numpy()) for i in range(len(item_names))]
        dice = float(np.mean([s_[0] for s_ in scores])) if scores else float("nan")
        iou = float(np.mean([s_[1] for s_ in scores])) if scores else float("nan")
    else:
        dist.all_reduce_sum(image_scores)
        k = float(image_scores[2])
        dice = float(image_scores[0]) / k if k else float("nan")
        iou = float(image_scores[1]) / k if k else float("nan")
    return {"val_loss": float(loss_sum[0] / max(1.0, float(loss_sum[1]))), "val_dice": dice, "val_iou": iou}
