"""How far lower precisions (bf16, int8) agree with fp32: Dice of the masks and equal
lesion counts, per image (:func:`compare_masks`), and over whole predictions of real
images or volumes (:func:`agreement`; ``scripts/precision_agreement.py`` runs it for every
trained network and writes the table of docs/performance.md). Below
:data:`AGREEMENT_DICE`, or with another lesion count, a precision does not agree: the
Predictor warns (:class:`PrecisionWarning`) and ``precision="auto"`` keeps fp32."""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np

from .. import models

#: lower precisions must give masks with at least this Dice against fp32 (and the same
#: number of lesions per image) to be used without a warning
AGREEMENT_DICE = 0.99


class PrecisionWarning(UserWarning):
    """A lower precision whose masks do not agree with fp32 well enough."""


def masks_from_logits(logits: np.ndarray, card: Dict[str, Any]) -> np.ndarray:
    """Foreground masks bool (N, K, H, W), one per class, as the Predictor decides them:
    sigmoid above the card's threshold (in logit space), or the softmax's argmax."""
    out = models.Outputs.of(card)
    if out.softmax:
        best = np.asarray(logits).argmax(1)
        return np.stack([best == k for k in range(1, logits.shape[1])], 1)
    t = min(max(out.threshold, 1e-7), 1 - 1e-7)
    return np.asarray(logits) > math.log(t / (1 - t))


def lesion_count(mask: np.ndarray) -> int:
    """Connected lesions of a 2-D or 3-D mask (face connectivity, as the lesion table)."""
    from .postprocess import connected_lesions
    labels, _box, voxels = connected_lesions(np.asarray(mask, bool))
    return 0 if labels is None else len(voxels) - 1


def compare_masks(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> Dict[str, Any]:
    """Agreement of masks with reference ones; one item per image / volume, each bool
    (K, …): one mask per class.

    ``dice``: over all images and classes pooled (2|A∩B| / (|A|+|B|); 1.0 when both are
    empty everywhere); ``min_dice``: the worst image with any foreground;
    ``count_mismatches``: images whose number of lesions differs in any class;
    ``lesions``: lesions in the reference; ``images``: how many were compared."""
    inter = total = 0
    worst = 1.0
    mismatches = lesions = n = 0
    for a, b in zip(reference, other):
        a, b = np.asarray(a, bool), np.asarray(b, bool)
        if a.shape != b.shape:
            raise ValueError(f"masks of different shapes {a.shape} and {b.shape}")
        i, s = int(np.count_nonzero(a & b)), int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        inter, total = inter + i, total + s
        if s:
            worst = min(worst, 2 * i / s)
        ca, cb = [lesion_count(m) for m in a], [lesion_count(m) for m in b]
        lesions += sum(ca)
        mismatches += int(ca != cb)
        n += 1
    if n != len(reference) or n != len(other):
        raise ValueError(f"{len(reference)} reference masks but {len(other)} to compare")
    return {"dice": 1.0 if total == 0 else 2 * inter / total, "min_dice": worst,
            "count_mismatches": mismatches, "lesions": lesions, "images": n}


def agrees(report: Optional[Dict[str, Any]], bar: float = AGREEMENT_DICE) -> bool:
    """True when an agreement report meets the bar: Dice ≥ ``bar`` and no image with a
    different lesion count."""
    return bool(report) and report["dice"] >= bar and report["count_mismatches"] == 0


def describe(report: Dict[str, Any]) -> str:
    return (f"Dice {report['dice']:.4f} (worst image {report['min_dice']:.4f}), lesion count different in "
            f"{report['count_mismatches']} of {report['images']} image(s)")


def prediction_masks(predictor, item, **kwargs) -> np.ndarray:
    """bool (K, …) class masks of one image (numpy) or volume (SimpleITK image) as
    ``predictor`` segments it."""
    if isinstance(item, np.ndarray):
        pred = predictor.predict_image(item, **kwargs)
    else:
        pred = predictor.predict_volume(item, **kwargs)
    return np.stack([np.asarray(pred.masks[int(c["value"])], bool) for c in predictor.classes])


def agreement(source, items: Iterable[Any], precisions: Sequence[str] = ("bf16", "int8"), *,
              preset: Optional[str] = None, calibration=None, cache=None,
              batch_size="auto") -> Dict[str, Dict[str, Any]]:
    """For each precision, :func:`compare_masks` of its masks against fp32 on ``items``
    (images as numpy arrays, volumes as SimpleITK images), whole predictions through the
    Predictor on the CPU. ``calibration`` (and ``cache``) serve int8. Adds ``seconds``
    (the precision's prediction time over all items, the fp32 one under ``fp32``)."""
    from .predictor import Predictor
    items = list(items)
    out: Dict[str, Dict[str, Any]] = {}
    ref = Predictor(source, preset=preset, device="cpu", precision="fp32", batch_size=batch_size)
    t0 = time.perf_counter()
    ref_masks = [prediction_masks(ref, it) for it in items]
    out["fp32"] = {"seconds": time.perf_counter() - t0}
    for p in precisions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)  # the report says it
            other = Predictor(source, preset=preset, device="cpu", precision=p, batch_size=batch_size,
                              calibration=calibration, cache_dir=cache)
            prediction_masks(other, items[0])  # int8: the graph is made (or loaded) here, untimed
        t0 = time.perf_counter()
        masks = [prediction_masks(other, it) for it in items]
        rep = compare_masks(ref_masks, masks)
        rep["seconds"] = time.perf_counter() - t0
        rep["agrees"] = agrees(rep)
        if p == "int8":
            records = other.runner.session.records
            rep["held_out"] = {"x".join(map(str, k)): v.get("agreement") for k, v in records.items()}
        out[p] = rep
    return out
