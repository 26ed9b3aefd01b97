"""Surface distances (HD95, ASSD, Hausdorff) in millimetres, and lesion-wise detection
(connected components matched by overlap)."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .common import NAN, MetricsError, _as_array


def _mask_image(mask: np.ndarray, spacing_zyx: Sequence[float], pad: int = 0) -> sitk.Image:
    if pad:
        mask = np.pad(mask, pad)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(reversed(spacing_zyx)))
    return img


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]):
    """(distances of the surface voxels of ``pred`` to the surface of ``gt``, and of
    ``gt``'s to ``pred``'s) in mm; ``spacing_zyx`` in numpy axis order. Both masks must be
    non-empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        raise MetricsError("surface distances need two non-empty masks")
    # one voxel of background around, so that border-touching objects have a surface there
    p_img, g_img = _mask_image(pred, spacing_zyx, pad=1), _mask_image(gt, spacing_zyx, pad=1)
    p_surface, g_surface = _surface(p_img), _surface(g_img)
    p_mask = sitk.GetArrayFromImage(p_surface).astype(bool)
    g_mask = sitk.GetArrayFromImage(g_surface).astype(bool)
    return _distance_to(g_surface)[p_mask], _distance_to(p_surface)[g_mask]


def _surface(mask_img: sitk.Image) -> sitk.Image:
    """Object voxels with a face-neighbour in the background (fullyConnected=False: a voxel
    whose background neighbours are all diagonal is not on the surface)."""
    return sitk.LabelContour(mask_img, fullyConnected=False)


def _distance_to(surface_img: sitk.Image) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of ``surface_img``.

    The Maurer map of the *surface* image, clipped at 0: outside the surface set it is the
    distance to the nearest surface voxel, on it ≤ 0. (The Maurer map of the object itself
    would measure inside points to ITK's own, fully connected contour, a different
    surface than the one the distances start from.)"""
    d = sitk.SignedMaurerDistanceMap(surface_img, insideIsPositive=False, squaredDistance=False,
                                     useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(d), 0.0)


def _distance_metrics(pred, gt, spacing_zyx) -> Dict[str, float]:
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return {"hd95": 0.0, "assd": 0.0, "hausdorff": 0.0}
    if p_any != g_any:
        return {"hd95": NAN, "assd": NAN, "hausdorff": NAN}
    d_pg, d_gp = surface_distances(pred, gt, spacing_zyx)
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(_mask_image(pred, spacing_zyx), _mask_image(gt, spacing_zyx))
    return {"hd95": float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))),
            "assd": float((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size)),
            "hausdorff": float(hd.GetHausdorffDistance())}


def _components(mask: np.ndarray, fully_connected: bool) -> Tuple[np.ndarray, int]:
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), fully_connected)
    arr = sitk.GetArrayFromImage(cc)
    return arr, int(arr.max()) if arr.size else 0


def lesion_detection(pred, gt, *, fully_connected: bool = True, min_overlap: int = 1) -> Dict[str, float]:
    """Lesion-wise detection of one class from boolean masks (arrays or images): see the
    module docstring for the rule. Returns tp, fp, fn, precision, recall, f1 and the
    lesion counts ``reference`` and ``predicted``."""
    p = _as_array(pred).astype(bool)
    g = _as_array(gt).astype(bool)
    if p.shape != g.shape:
        raise MetricsError(f"lesion_detection: prediction shape {p.shape} != reference shape {g.shape}")
    g_cc, n_g = _components(g, fully_connected)
    p_cc, n_p = _components(p, fully_connected)
    overlap_per_gt = np.bincount(g_cc[p], minlength=n_g + 1)[1:]           # predicted voxels in each GT lesion
    tp = int(np.count_nonzero(overlap_per_gt >= min_overlap))
    overlap_per_pred = np.bincount(p_cc[g], minlength=n_p + 1)[1:]         # GT voxels in each predicted component
    matched_pred = int(np.count_nonzero(overlap_per_pred >= min_overlap))
    fp = n_p - matched_pred
    fn = n_g - tp
    if n_g == 0 and n_p == 0:
        f1 = 1.0
    else:
        f1 = 2 * tp / (2 * tp + fp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "reference": n_g, "predicted": n_p, "f1": f1,
            "recall": tp / n_g if n_g else NAN, "precision": matched_pred / n_p if n_p else NAN}
