"""Connected lesions of a mask: removal of small ones and the lesion table.

Lesions are connected components with full connectivity (26 neighbours in 3D, 8 in
2D: voxels touching at an edge or a corner belong to the same lesion), computed with
SimpleITK on the bounding box of the mask only, so that a large, mostly empty volume
costs little. Lesions are numbered from 1 by decreasing size.

Size levels (MSE-Net's small / medium / large) come from a model card's
``lesion_size_levels`` entry: a lesion is graded by its largest cross-section in the
slicing plane (axial for volumes), in mm², against ``thresholds`` —
``small < t0 ≤ medium < t1 ≤ large`` (MSE-Net's card: the areas of 20 mm and 40 mm
circles, 314.16 and 1256.64 mm²).
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


def _bbox(mask: np.ndarray) -> Optional[Tuple[slice, ...]]:
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if hit.size == 0:
            return None
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)


def connected_lesions(mask: np.ndarray) -> Tuple[Optional[np.ndarray], Tuple[slice, ...], np.ndarray]:
    """``(labels, box, voxels)``: component labels (uint32, 1…n by decreasing size) of
    ``mask[box]``, the bounding box, and ``voxels[k]`` = size of lesion k (index 0 unused).
    ``labels`` is None for an empty mask."""
    import SimpleITK as sitk
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"a lesion mask must be 2-D or 3-D, not {mask.ndim}-D")
    box = _bbox(mask)
    if box is None:
        return None, tuple(slice(0, 0) for _ in range(mask.ndim)), np.zeros(1, np.int64)
    crop = np.ascontiguousarray(mask[box], dtype=np.uint8)
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(crop), True)
    cc = sitk.RelabelComponent(cc, sortByObjectSize=True)
    labels = sitk.GetArrayFromImage(cc).astype(np.uint32, copy=False)
    voxels = np.bincount(labels.ravel())
    voxels[0] = 0
    return labels, box, voxels


def remove_small_lesions(mask: np.ndarray, spacing: Sequence[float], min_size_mm3: float) -> int:
    """Clear, in place, every lesion of ``mask`` (bool) smaller than ``min_size_mm3``
    (mm² for 2-D masks; ``spacing`` in ITK order x, y[, z]). Returns how many were removed."""
    if not min_size_mm3 or min_size_mm3 <= 0:
        return 0
    labels, box, voxels = connected_lesions(mask)
    if labels is None:
        return 0
    unit = float(np.prod(spacing))
    small = np.flatnonzero(voxels * unit < min_size_mm3)
    small = small[small > 0]
    if small.size:
        sub = mask[box]
        sub[np.isin(labels, small)] = False
    return int(small.size)


def remove_unseeded_lesions(mask: np.ndarray, seeds: np.ndarray) -> int:
    """Clear, in place, every lesion of ``mask`` (bool) that holds no pixel of ``seeds``
    (bool, same shape): hysteresis thresholding, where ``mask`` is the probability above
    the threshold and ``seeds`` above the higher seed threshold. Returns how many were removed."""
    labels, box, voxels = connected_lesions(mask)
    if labels is None:
        return 0
    seeded = np.unique(labels[np.asarray(seeds)[box] & (labels > 0)])
    unseeded = np.setdiff1d(np.arange(1, voxels.size), seeded)
    if unseeded.size:
        mask[box][np.isin(labels, unseeded)] = False
    return int(unseeded.size)


def size_level(area_mm2: float, levels: Optional[Dict[str, Any]]) -> Optional[str]:
    """Name of the size level of a lesion whose largest cross-section is ``area_mm2``."""
    if not levels:
        return None
    if levels.get("unit", "mm2") != "mm2":
        raise ValueError(f"lesion size levels in unit {levels.get('unit')!r} are not supported (mm2 only)")
    names, thresholds = list(levels["names"]), [float(t) for t in levels["thresholds"]]
    if len(names) != len(thresholds) + 1:
        raise ValueError("lesion_size_levels needs one name more than thresholds")
    return names[bisect_right(thresholds, area_mm2)]


def lesion_table(mask: np.ndarray, spacing: Sequence[float], class_value: int,
                 size_levels: Optional[Dict[str, Any]] = None, *, origin: Optional[Sequence[float]] = None,
                 direction: Optional[Sequence[float]] = None, slice_axis: int = 0) -> List[Dict[str, Any]]:
    """One row per connected lesion of ``mask`` (bool, numpy (z, y, x) or (y, x)).

    ``spacing``, ``origin`` (default 0) and ``direction`` (default identity) are the
    image's geometry in ITK order (x, y[, z]). ``slice_axis`` is the numpy axis of the
    slicing direction (the one closest to axial for volumes; see
    :class:`~LesionSegLib.inference.geometry.Canonical.slice_axis`) — the in-plane
    cross-sections used for the size level are taken perpendicular to it.

    Rows: ``class``, ``lesion`` (1 = largest), ``voxels``, ``volume_mm3`` (area in mm²
    for a 2-D mask), ``centroid_ijk`` (continuous index, x y [z]), ``centroid_lps_mm``
    (physical point, LPS), ``max_section_mm2`` and ``size_level`` (None without levels).
    """
    mask = np.asarray(mask)
    nd = mask.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != nd:
        raise ValueError(f"a {nd}-D mask needs {nd} spacing values, got {len(spacing)}")
    origin = np.zeros(nd) if origin is None else np.asarray(origin, np.float64)
    d = np.eye(nd) if direction is None else np.asarray(direction, np.float64).reshape(nd, nd)
    labels, box, voxels = connected_lesions(mask)
    if labels is None:
        return []
    n = len(voxels) - 1
    flat = np.flatnonzero(labels)
    ids = labels.ravel()[flat].astype(np.int64)
    coords = np.unravel_index(flat, labels.shape)  # numpy order, within the box
    counts = voxels[1:].astype(np.float64)
    centroid_np = [np.bincount(ids, weights=c.astype(np.float64), minlength=n + 1)[1:] / counts + box[a].start
                   for a, c in enumerate(coords)]
    # largest cross-section perpendicular to the slicing axis
    if nd == 3:
        slice_axis = int(slice_axis) % 3
        n_slices = labels.shape[slice_axis]
        per_slice = np.bincount(ids * n_slices + coords[slice_axis], minlength=(n + 1) * n_slices)
        max_section = per_slice.reshape(n + 1, n_slices)[1:].max(axis=1)
        in_plane = [spacing[nd - 1 - a] for a in range(3) if a != slice_axis]
        pixel_area = in_plane[0] * in_plane[1]
    else:
        max_section = voxels[1:]
        pixel_area = spacing[0] * spacing[1]
    unit = float(np.prod(spacing))
    rows = []
    for k in range(n):
        ijk = np.array([centroid_np[nd - 1 - a][k] for a in range(nd)])  # numpy order → x, y[, z]
        lps = origin + d @ (ijk * np.asarray(spacing))
        area = float(max_section[k]) * pixel_area
        rows.append({"class": int(class_value), "lesion": k + 1, "voxels": int(voxels[k + 1]),
                     "volume_mm3": float(voxels[k + 1]) * unit,
                     "centroid_ijk": [round(float(v), 3) for v in ijk],
                     "centroid_lps_mm": [round(float(v), 3) for v in lps],
                     "max_section_mm2": round(area, 3),
                     "size_level": size_level(area, size_levels)})
    return rows
