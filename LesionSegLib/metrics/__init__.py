"""Segmentation metrics: overlap, surface distances, AUPR and lesion-wise detection.

Used by ``lesionseg evaluate`` (per case, from files), by the trainer for validation
(:func:`dice_iou` on torch or numpy batches) and by anything that holds a prediction and
a reference. No torch import here; :func:`dice_iou` works on tensors through their own
methods.

Definitions (per class c; P = predicted voxels of c, G = reference voxels of c):

* counts ``tp = |P∩G|``, ``fp = |P\\G|``, ``fn = |G\\P|``, ``tn`` = the rest;
* ``dice = 2tp/(2tp+fp+fn)``, ``iou = tp/(tp+fp+fn)`` — from SimpleITK's
  ``LabelOverlapMeasuresImageFilter``; ``sensitivity = tp/(tp+fn)``,
  ``specificity = tn/(tn+fp)``, ``precision = tp/(tp+fp)`` — from the counts (ITK's
  ``FalsePositiveError`` changed meaning in ITK 5.4, from 1−precision to 1−specificity,
  so it is not used, to give the same numbers in every Slicer);
* surfaces: object voxels with a face-neighbour outside the object
  (``LabelContour``, face connectivity), after padding the image by one background voxel
  so that objects touching the image border have a surface there too. The distance of a
  surface voxel of P to G is the Euclidean distance in mm (image spacing) to the nearest
  surface voxel of G (``SignedMaurerDistanceMap`` of G's surface), and vice versa;
* ``hd95`` = max(95th percentile of the P→G distances, 95th percentile of the G→P
  distances) (linear interpolation between order statistics, numpy's default) — the
  BraTS / MONAI definition, which is ≤ the Hausdorff distance, as the name promises;
* ``assd`` = mean of all P→G and G→P surface distances pooled (Heimann et al. 2009);
* ``hausdorff``: SimpleITK's ``HausdorffDistanceImageFilter`` (as Slicer's Segment
  Comparison): the largest distance from a voxel of one mask to the nearest voxel of the
  other, over all voxels rather than surfaces, so it need not equal the largest surface
  distance (a voxel inside the other mask counts 0 there);
* ``aupr``: area under the precision–recall curve of the class probability against G,
  exact step-wise average precision ``Σ_n (R_n − R_{n−1}) P_n`` over the distinct score
  thresholds (scikit-learn's ``average_precision_score``, without interpolation); L-Seg's
  mAUC is the mean of the per-class AUPR;
* lesion-wise detection: lesions are the connected components of G and of P (full
  connectivity: 8 in 2D, 26 in 3D, as ISLES'22). A reference lesion is *detected* when at
  least ``min_overlap`` (default 1) of its voxels are predicted as the class; a predicted
  component that overlaps no reference lesion is a false positive. ``lesion_tp`` =
  detected reference lesions, ``lesion_fn`` = missed ones, ``lesion_fp`` = false-positive
  components; ``lesion_f1 = 2tp/(2tp+fp+fn)``, ``lesion_recall = tp/(tp+fn)``,
  ``lesion_precision`` = components overlapping a reference lesion / all predicted
  components. (One component covering two lesions detects both.)

Empty cases — chosen so that a correct "no lesion" answer counts as correct and a false
alarm on a lesion-free case counts as wrong:

* P and G both empty: dice = iou = 1, hd95 = assd = hausdorff = 0, lesion_f1 = 1;
  sensitivity, precision, lesion_recall, lesion_precision and aupr are NaN (0/0:
  nothing to find);
* exactly one of P, G empty: dice = iou = 0, lesion_f1 = 0; the distances are NaN (there
  is no surface to measure from), sensitivity / precision are 0 or NaN as their
  denominators say.

Summaries average with ``nanmean`` and report how many cases had a defined value.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .common import NAN, GeometryError, MetricsError, _as_array
from .distances import _distance_metrics, _mask_image, lesion_detection, surface_distances
from .overlap import aupr, aupr_from_counts, dice_iou, score_counts

__all__ = ["dice_iou", "aupr", "score_counts", "aupr_from_counts", "lesion_detection", "surface_distances",
           "evaluate_case", "summarize", "check_geometry", "geometry_text", "MetricsError", "GeometryError",
           "CASE_METRICS"]


#: per-class values evaluate_case returns, in CSV order
CASE_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "hd95", "assd", "hausdorff", "aupr",
                "lesion_f1", "lesion_precision", "lesion_recall", "lesion_tp", "lesion_fp", "lesion_fn",
                "lesions_reference", "lesions_predicted", "tp", "fp", "fn", "tn",
                "reference_volume_mm3", "predicted_volume_mm3")
#: averaged in summaries (the counts are summed instead)
MEAN_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "hd95", "assd", "hausdorff", "aupr",
                "lesion_f1", "lesion_precision", "lesion_recall")


# --------------------------------------------------------------- images, geometry
def geometry_text(image: sitk.Image) -> str:
    def fmt(v):
        return "(" + ", ".join(f"{x:g}" for x in v) + ")"
    return (f"size {fmt(image.GetSize())}, spacing {fmt(image.GetSpacing())}, origin {fmt(image.GetOrigin())}, "
            f"direction {fmt(image.GetDirection())}")


def check_geometry(pred: sitk.Image, gt: sitk.Image, pred_name: str = "prediction",
                   gt_name: str = "reference", tolerance: float = 1e-4) -> None:
    """Raise :class:`GeometryError` naming both geometries unless the two images share
    size, spacing, origin and direction (origin within ``tolerance`` × the spacing)."""
    problems = []
    if pred.GetDimension() != gt.GetDimension():
        problems.append(f"{pred.GetDimension()}D vs {gt.GetDimension()}D")
    else:
        if pred.GetSize() != gt.GetSize():
            problems.append("size")
        sp_p, sp_g = np.array(pred.GetSpacing()), np.array(gt.GetSpacing())
        if not np.allclose(sp_p, sp_g, rtol=tolerance, atol=0):
            problems.append("spacing")
        if not np.allclose(pred.GetOrigin(), gt.GetOrigin(), rtol=0, atol=tolerance * float(sp_g.min())):
            problems.append("origin")
        if not np.allclose(pred.GetDirection(), gt.GetDirection(), rtol=0, atol=tolerance):
            problems.append("direction")
    if problems:
        raise GeometryError(f"geometry mismatch ({', '.join(problems)}) between {pred_name} "
                            f"[{geometry_text(pred)}] and {gt_name} [{geometry_text(gt)}]")


def _spacing_of(image, spacing, ndim) -> Tuple[float, ...]:
    """Spacing in numpy axis order (z, y, x)."""
    if isinstance(image, sitk.Image):
        return tuple(float(s) for s in reversed(image.GetSpacing()))
    if spacing is None:
        return (1.0,) * ndim
    if len(spacing) != ndim:
        raise MetricsError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {ndim}D image")
    return tuple(float(s) for s in reversed(tuple(spacing)))  # given as (x, y[, z]) like SimpleITK


def _masks(source, classes: Sequence[int], shape) -> Dict[int, np.ndarray]:
    if isinstance(source, Mapping):
        out = {}
        for c in classes:
            m = source.get(c)
            out[c] = np.zeros(shape, bool) if m is None else _as_array(m).astype(bool)
        return out
    arr = _as_array(source)
    return {c: arr == c for c in classes}


# ---------------------------------------------------------------------- per case
def _prob_for_classes(prob_image, classes: Sequence[int], shape) -> Dict[int, np.ndarray]:
    """Probability map per class value from an image / array / dict (see evaluate_case)."""
    if prob_image is None:
        return {}
    if isinstance(prob_image, Mapping):
        out = {}
        for c, p in prob_image.items():
            a = _as_array(p) if not isinstance(p, sitk.Image) else sitk.GetArrayViewFromImage(p)
            if a.shape != tuple(shape):
                raise MetricsError(f"probability map of class {c} has shape {a.shape}, the labels {tuple(shape)}")
            out[int(c)] = a
        return out
    if isinstance(prob_image, sitk.Image):
        arr = sitk.GetArrayViewFromImage(prob_image)
        if prob_image.GetNumberOfComponentsPerPixel() > 1:
            arr = np.moveaxis(arr, -1, 0)  # vector image: one component per class
    else:
        arr = _as_array(prob_image)
    if arr.shape == tuple(shape):
        arr = arr[None]
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != tuple(shape):
        raise MetricsError(f"probability map of shape {arr.shape} does not fit labels of shape {tuple(shape)} "
                           f"(expected (C, {', '.join(map(str, shape))}) or the label shape)")
    # channel i belongs to the i-th class of `classes` (1..C when the classes were not given)
    return {c: arr[i] for i, c in enumerate(classes) if i < arr.shape[0]}


def _class_values(source) -> List[int]:
    if isinstance(source, Mapping):
        return [int(c) for c, m in source.items() if _as_array(m).any()]
    arr = _as_array(source)
    vals = np.unique(arr)
    bad = vals[(vals != np.round(vals)) | (vals < 0)] if np.issubdtype(vals.dtype, np.floating) else vals[vals < 0]
    if bad.size:
        raise MetricsError(f"a label map was expected (non-negative integers) but it holds {bad[:3].tolist()}; "
                           f"probabilities belong in prob_image")
    return [int(v) for v in vals if v != 0]


def absent_class_metrics(n_voxels: int) -> Dict[str, float]:
    """What :func:`evaluate_case` reports for a class absent from both prediction and
    reference (so a folder evaluation can fill rows without re-reading the case)."""
    row = _overlap_metrics(0, 0, 0, int(n_voxels))
    row.update({"hd95": 0.0, "assd": 0.0, "hausdorff": 0.0, "aupr": NAN, "lesion_f1": 1.0,
                "lesion_precision": NAN, "lesion_recall": NAN, "lesion_tp": 0, "lesion_fp": 0,
                "lesion_fn": 0, "lesions_reference": 0, "lesions_predicted": 0,
                "reference_volume_mm3": 0.0, "predicted_volume_mm3": 0.0})
    return row


def _ratio(a: float, b: float) -> float:
    return a / b if b else NAN


def _overlap_metrics(tp: int, fp: int, fn: int, tn: int) -> Dict[str, float]:
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            # both empty: perfect agreement (see the module docstring)
            "dice": 1.0 if tp + fp + fn == 0 else NAN, "iou": 1.0 if tp + fp + fn == 0 else NAN}


def evaluate_case(pred_image, gt_image, classes: Optional[Iterable[int]] = None, prob_image=None, *,
                  spacing: Optional[Sequence[float]] = None, fully_connected: bool = True,
                  min_overlap: int = 1, pred_name: str = "prediction", gt_name: str = "reference") -> Dict[str, Any]:
    """All metrics of one case, per class.

    ``pred_image`` / ``gt_image``: SimpleITK label images on the same grid (checked:
    :class:`GeometryError` names both geometries), numpy label maps (``spacing`` (x, y[, z])
    in mm, default 1), or dicts ``{class value: bool mask}`` for multi-label predictions
    (L-Seg's overlapping lesions; ``Prediction.masks``). ``classes``: class values to
    evaluate; default all non-zero values present in either. ``prob_image``: optional
    probabilities for AUPR: an image/array (C, …) whose channel i belongs to the i-th
    class of ``classes`` (1..C when ``classes`` is None), a vector image with C
    components, a single map for one class, or a dict ``{class value: map}``.

    Returns ``{"spacing": (x, y[, z]), "shape": numpy shape, "voxel_volume_mm3": v,
    "classes": {value: {metric: value}}}`` with the metrics of :data:`CASE_METRICS`.
    """
    if isinstance(pred_image, sitk.Image) and isinstance(gt_image, sitk.Image):
        check_geometry(pred_image, gt_image, pred_name, gt_name)
    ref = gt_image if not isinstance(gt_image, Mapping) else next(iter(gt_image.values()), None)
    if ref is None:
        ref = pred_image if not isinstance(pred_image, Mapping) else next(iter(pred_image.values()), None)
    if ref is None:
        raise MetricsError("evaluate_case: empty dicts of masks; nothing to evaluate")
    shape = _as_array(ref).shape
    for src, what in ((pred_image, pred_name), (gt_image, gt_name)):
        srcs = src.values() if isinstance(src, Mapping) else [src]
        for s in srcs:
            if _as_array(s).shape != shape:
                raise GeometryError(f"{what} has shape {_as_array(s).shape}, expected {shape}")
    spacing_zyx = _spacing_of(gt_image if isinstance(gt_image, sitk.Image) else pred_image
                              if isinstance(pred_image, sitk.Image) else None, spacing, len(shape))
    voxel_mm3 = float(np.prod(spacing_zyx))
    explicit = classes is not None
    classes = sorted({int(c) for c in classes}) if explicit else sorted(
        set(_class_values(pred_image)) | set(_class_values(gt_image)))
    prob_classes = classes if explicit else None
    if prob_image is not None and not explicit and not isinstance(prob_image, Mapping):
        n = _prob_channels(prob_image, shape)
        prob_classes = list(range(1, n + 1))
        classes = sorted(set(classes) | set(prob_classes))
    probs = _prob_for_classes(prob_image, prob_classes or classes, shape)
    pmasks, gmasks = _masks(pred_image, classes, shape), _masks(gt_image, classes, shape)
    n_vox = int(np.prod(shape))
    result = {"spacing": tuple(reversed(spacing_zyx)), "shape": tuple(shape), "voxel_volume_mm3": voxel_mm3,
              "classes": {}}
    for c in classes:
        p, g = pmasks[c], gmasks[c]
        tp = int(np.count_nonzero(p & g))
        n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
        row = _overlap_metrics(tp, n_p - tp, n_g - tp, n_vox - n_p - n_g + tp)
        if n_p and n_g:
            overlap = sitk.LabelOverlapMeasuresImageFilter()
            overlap.Execute(_mask_image(p, spacing_zyx), _mask_image(g, spacing_zyx))
            row["dice"] = float(overlap.GetDiceCoefficient(1))
            row["iou"] = float(overlap.GetJaccardCoefficient(1))
        elif n_p or n_g:  # ITK would only warn "label not found" and return 0
            row["dice"] = row["iou"] = 0.0
        row.update(_distance_metrics(p, g, spacing_zyx))
        det = lesion_detection(p, g, fully_connected=fully_connected, min_overlap=min_overlap)
        row.update({"lesion_f1": det["f1"], "lesion_precision": det["precision"], "lesion_recall": det["recall"],
                    "lesion_tp": det["tp"], "lesion_fp": det["fp"], "lesion_fn": det["fn"],
                    "lesions_reference": det["reference"], "lesions_predicted": det["predicted"]})
        row["reference_volume_mm3"] = n_g * voxel_mm3
        row["predicted_volume_mm3"] = n_p * voxel_mm3
        if c in probs:
            counts = score_counts(probs[c], g)
            row["aupr"] = aupr_from_counts(*counts)
            row["_score_counts"] = counts  # for pooled AUPR in summarize(); not a CSV column
        else:
            row["aupr"] = NAN
        result["classes"][c] = row
    return result


def _prob_channels(prob_image, shape) -> int:
    if isinstance(prob_image, sitk.Image):
        n = prob_image.GetNumberOfComponentsPerPixel()
        if n > 1:
            return n
        arr_shape = tuple(reversed(prob_image.GetSize()))
    else:
        arr_shape = tuple(_as_array(prob_image).shape)
    return 1 if arr_shape == tuple(shape) else int(arr_shape[0])


# ------------------------------------------------------------------------ summary
def summarize(cases: Sequence[Mapping[str, Any]]) -> Dict[int, Dict[str, Any]]:
    """Per class over cases (each an :func:`evaluate_case` result): for each metric of
    ``MEAN_METRICS`` ``{"mean", "std", "n"}`` ignoring NaN; ``pooled_dice`` /
    ``pooled_iou`` from the summed counts (every voxel of the set weighs the same);
    lesion counts summed and ``pooled_lesion_f1`` from them; ``pooled_aupr`` over all
    voxels of all cases with probabilities (the IDRiD / L-Seg way). Key ``"mAUC"`` (not a
    class): mean of the classes' pooled AUPR."""
    out: Dict[Any, Dict[str, Any]] = {}
    classes = sorted({c for case in cases for c in case["classes"]})
    for c in classes:
        rows = [case["classes"][c] for case in cases if c in case["classes"]]
        s: Dict[str, Any] = {"cases": len(rows)}
        for m in MEAN_METRICS:
            vals = np.array([r[m] for r in rows], dtype=np.float64)
            ok = vals[~np.isnan(vals)]
            s[m] = {"mean": float(ok.mean()) if ok.size else NAN,
                    "std": float(ok.std()) if ok.size else NAN, "n": int(ok.size)}
        tot = {k: sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn", "lesion_tp", "lesion_fp",
                                                          "lesion_fn", "lesions_reference", "lesions_predicted")}
        s.update(tot)
        denom = 2 * tot["tp"] + tot["fp"] + tot["fn"]
        s["pooled_dice"] = 2 * tot["tp"] / denom if denom else 1.0
        s["pooled_iou"] = tot["tp"] / (tot["tp"] + tot["fp"] + tot["fn"]) if denom else 1.0
        ldenom = 2 * tot["lesion_tp"] + tot["lesion_fp"] + tot["lesion_fn"]
        s["pooled_lesion_f1"] = 2 * tot["lesion_tp"] / ldenom if ldenom else 1.0
        counts = [r["_score_counts"] for r in rows if "_score_counts" in r]
        s["pooled_aupr"] = aupr_from_counts(*(np.concatenate(x) for x in zip(*counts))) if counts else NAN
        s["aupr_cases"] = len(counts)
        out[c] = s
    auprs = [out[c]["pooled_aupr"] for c in classes if not math.isnan(out[c]["pooled_aupr"])]
    out["mAUC"] = {"value": float(np.mean(auprs)) if auprs else NAN, "classes": len(auprs)}
    return out
