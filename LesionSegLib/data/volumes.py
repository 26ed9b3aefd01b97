"""3D training volumes (NIfTI, NRRD, MHA/MHD): finding image/label pairs, reading them in a
canonical orientation, and the per-volume facts the slice sampler needs.

Orientation. Every volume is reoriented to DICOM ``LPS`` (``SimpleITK.DICOMOrient``): array
axes (z, y, x) run inferior→superior, anterior→posterior, right→left, so ``array[z]`` is an
axial slice in the radiological display convention (patient's right on the image's left,
anterior at the top), whatever the file's storage order (ISLES'22 DWI is stored LAS, for
instance). The slice networks are trained on axial slices in this orientation, and the
inference side must present slices the same way.

Labels are brought onto the image grid: same size and geometry are used as they are; a
label on another grid is resampled to the image's with nearest-neighbour interpolation
(recorded in :attr:`VolumeCase.notes`).

Finding pairs (:func:`volume_pairs`):

* ``<root>/imagesTr`` + ``<root>/labelsTr`` (nnU-Net/MSD: ``case_0000.nii.gz`` ↔ ``case.nii.gz``);
* ``<root>/images`` + ``<root>/labels`` (or ``masks``), matched by stem;
* otherwise every volume file below ``root`` (recursively, e.g. BIDS ``rawdata``/``derivatives``):
  files whose name ends in a label word (``_msk``, ``_mask``, ``_label``, ``_seg``, ``_lesion``,
  ``_gt``) are labels, the others images, matched by the name without its last ``_word``
  (``sub-x_ses-1_dwi`` and ``sub-x_ses-1_msk`` → ``sub-x_ses-1``). With several images per
  label (DWI, ADC, FLAIR), ``modality`` picks one (``"dwi"``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..fileio import VOLUME_EXTENSIONS, split_extension
from .errors import DataError
from .images import read_file

VOLUME_SUFFIXES = VOLUME_EXTENSIONS
LABEL_WORDS = ("msk", "mask", "masks", "label", "labels", "seg", "segmentation", "lesion", "lesions", "gt", "roi")
ORIENTATION = "LPS"


def volume_stem(path: Path) -> str:
    return split_extension(path, VOLUME_SUFFIXES)[0]


def is_volume_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(VOLUME_SUFFIXES)


class VolumePair(NamedTuple):
    """(image, label) paths; ``case`` is the shared name."""
    image: Path
    label: Path

    @property
    def case(self) -> str:
        return _pair_key(volume_stem(self.label))


def _pair_key(stem: str) -> str:
    parts = stem.split("_")
    return "_".join(parts[:-1]) if len(parts) > 1 else stem


def _is_label_name(stem: str) -> bool:
    last = stem.rsplit("_", 1)[-1].rsplit("-", 1)[-1].lower()
    return last in LABEL_WORDS


def volume_pairs(root, modality: Optional[str] = None) -> List[VolumePair]:
    """(image, label) pairs under ``root`` (see the module docstring), sorted by case."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    subs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "imagestr" in subs and "labelstr" in subs:
        labels = {volume_stem(p): p for p in sorted(subs["labelstr"].iterdir()) if is_volume_file(p)}
        pairs = []
        for p in sorted(subs["imagestr"].iterdir()):
            if not is_volume_file(p):
                continue
            stem = volume_stem(p)
            m = re.match(r"^(.*)_(\d{4})$", stem)
            case, channel = (m.group(1), int(m.group(2))) if m else (stem, 0)
            if channel != 0:
                continue  # one image channel per case (the first modality)
            if case not in labels:
                raise DataError(f"{subs['labelstr']}: no label for image {p.name}")
            pairs.append(VolumePair(p, labels[case]))
        if not pairs:
            raise DataError(f"{subs['imagestr']}: no volume files")
        return pairs
    for img_dir, lab_dir in (("images", "labels"), ("images", "masks")):
        if img_dir in subs and lab_dir in subs:
            labels = {volume_stem(p): p for p in sorted(subs[lab_dir].iterdir()) if is_volume_file(p)}
            images = [p for p in sorted(subs[img_dir].iterdir()) if is_volume_file(p)]
            missing = [p.name for p in images if volume_stem(p) not in labels]
            if missing:
                raise DataError(f"{subs[lab_dir]}: no label for {', '.join(missing[:5])}")
            if not images:
                raise DataError(f"{subs[img_dir]}: no volume files")
            return [VolumePair(p, labels[volume_stem(p)]) for p in images]
    files = sorted(p for p in root.rglob("*") if is_volume_file(p))
    if not files:
        raise DataError(f"{root}: no volume files ({', '.join(VOLUME_SUFFIXES)})")
    labels = [p for p in files if _is_label_name(volume_stem(p))]
    if not labels:
        raise DataError(f"{root}: no label volumes found (a label file name ends in one of "
                        f"{', '.join('_' + w for w in LABEL_WORDS)})")
    images: Dict[str, List[Path]] = {}
    for p in files:
        if p not in labels:
            images.setdefault(_pair_key(volume_stem(p)), []).append(p)
    pairs = []
    for lab in labels:
        key = _pair_key(volume_stem(lab))
        cands = images.get(key, [])
        if modality:
            cands = [p for p in cands if volume_stem(p).lower().rsplit("_", 1)[-1] == modality.lower()
                     or modality.lower() in volume_stem(p).lower()]
        if not cands:
            raise DataError(f"{lab}: no image volume with the same name" + (f" and modality {modality!r}" if modality else ""))
        if len(cands) > 1:
            raise DataError(f"{lab}: several images fit ({', '.join(p.name for p in cands)}); choose one with "
                            f"modality=… (e.g. {volume_stem(cands[0]).rsplit('_', 1)[-1]!r})")
        pairs.append(VolumePair(cands[0], lab))
    return pairs


@dataclass
class VolumeCase:
    """One volume in memory, canonical orientation, arrays (z, y, x)."""
    image: np.ndarray               # raw intensities (file dtype), or (z, y, x, C) for colour
    label: np.ndarray               # int64 class values
    spacing: Tuple[float, float, float]  # (x, y, z) mm
    case: str
    source: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def lesion_slices(self) -> np.ndarray:
        return np.flatnonzero(self.label.reshape(self.label.shape[0], -1).any(axis=1))


def canonical(img):
    """``img`` reoriented to LPS (array axes z, y, x: axial slices first)."""
    import SimpleITK as sitk
    if img.GetDimension() != 3:
        raise DataError(f"expected a 3D volume, got {img.GetDimension()}D")
    return sitk.DICOMOrient(img, ORIENTATION)


def _same_grid(a, b, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-2 * min(a.GetSpacing())))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def resample_in_plane(img, spacing_xy: Sequence[float], is_label: bool):
    """Resample an LPS volume to ``spacing_xy`` mm in-plane, keeping its slices."""
    import SimpleITK as sitk
    sp = img.GetSpacing()
    new_sp = (float(spacing_xy[0]), float(spacing_xy[1]), sp[2])
    size = [max(1, int(round(img.GetSize()[i] * sp[i] / new_sp[i]))) for i in range(2)] + [img.GetSize()[2]]
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), new_sp, img.GetDirection(),
                         0, img.GetPixelID())


def load_case(image, label, case: Optional[str] = None, pixel_spacing: Optional[Sequence[float]] = None,
              n_classes: int = 1) -> VolumeCase:
    """Read (paths or SimpleITK images) into a :class:`VolumeCase`: LPS orientation,
    label on the image grid, optional in-plane resampling to ``pixel_spacing`` (x, y) mm,
    label values checked against ``n_classes`` (a one-class network merges classes)."""
    import SimpleITK as sitk
    notes: List[str] = []
    src = str(image) if not isinstance(image, sitk.Image) else "memory"
    img = image if isinstance(image, sitk.Image) else read_file(image, "the image")
    lab = label if isinstance(label, sitk.Image) else read_file(label, "the label")
    where_l = str(label) if not isinstance(label, sitk.Image) else "label"
    where_i = src
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise DataError(f"{where_i}: expected a 3D image volume, found {img.GetDimension()}D {img.GetSize()}")
    if lab.GetDimension() != 3:
        raise DataError(f"{where_l}: expected a 3D label volume, found {lab.GetDimension()}D {lab.GetSize()}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{where_i}: multi-component volumes are not supported; give one channel per file")
    img, lab = canonical(img), canonical(lab)
    if not _same_grid(img, lab):
        if lab.GetSize() == img.GetSize():
            notes.append("label geometry differs slightly from the image's; label taken on the image grid")
            lab = sitk.Cast(lab, sitk.sitkInt32)
            lab.CopyInformation(img)
        else:
            notes.append(f"label grid {lab.GetSize()} resampled (nearest) onto the image grid {img.GetSize()}")
            lab = sitk.Resample(lab, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
    if pixel_spacing:
        if not np.allclose(img.GetSpacing()[:2], pixel_spacing, rtol=1e-3):
            notes.append(f"resampled in-plane from {tuple(round(s, 4) for s in img.GetSpacing()[:2])} "
                         f"to {tuple(pixel_spacing)} mm")
            img = resample_in_plane(img, pixel_spacing, False)
            lab = resample_in_plane(lab, pixel_spacing, True)
    arr = sitk.GetArrayFromImage(img)
    lab_arr = sitk.GetArrayFromImage(lab)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise DataError(f"{where_i}: the image contains NaN or infinite values")
    if lab_arr.dtype.kind == "f":
        lab_arr = np.round(lab_arr)
    if lab_arr.min(initial=0) < 0:
        raise DataError(f"{where_l}: the label has negative values")
    lab_arr = lab_arr.astype(np.int64)
    top = int(lab_arr.max(initial=0))
    if top > n_classes:
        if n_classes == 1:
            lab_arr = (lab_arr > 0).astype(np.int64)
            notes.append(f"label values up to {top} merged into one lesion class")
        else:
            raise DataError(f"{where_l}: label values up to {top}, but the preset has {n_classes} classes")
    return VolumeCase(arr, lab_arr, tuple(float(s) for s in img.GetSpacing()),
                      case or (volume_stem(Path(image)) if not isinstance(image, sitk.Image) else "case"), src, notes)


def memory_case(item: Any, index: int, n_classes: int = 1, pixel_spacing=None) -> VolumeCase:
    """A Slicer-style in-memory case: ``(image zyx, spacing, label)``, ``((image, spacing),
    label)``, ``(image, label)`` (1 mm), a dict with ``image``/``label``/``spacing``
    (and optional ``case``), or ``(SimpleITK image, SimpleITK label)``. Arrays are taken
    in the given (z, y, x) order: the caller presents axial slices along axis 0."""
    import SimpleITK as sitk
    case = f"case{index:03d}"
    if isinstance(item, dict):
        image, label, spacing = item["image"], item["label"], item.get("spacing", (1.0, 1.0, 1.0))
        case = str(item.get("case", case))
    elif isinstance(item, (tuple, list)) and len(item) == 3:
        image, spacing, label = item
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)):
        (image, spacing), label = item
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        image, label = item
        spacing = (1.0, 1.0, 1.0)
    else:
        raise DataError(f"in-memory case {index}: expected (image, spacing, label), got {type(item).__name__}")
    if isinstance(image, sitk.Image):
        return load_case(image, label, case, pixel_spacing, n_classes)
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim != 3 or label.shape != image.shape:
        raise DataError(f"in-memory case {index} ({case}): image {image.shape} and label {label.shape} must be "
                        f"equal (z, y, x) arrays")
    if label.dtype.kind == "f":
        label = np.round(label)
    label = label.astype(np.int64)
    if label.min(initial=0) < 0:
        raise DataError(f"in-memory case {index} ({case}): the label has negative values")
    if label.max(initial=0) > n_classes:
        if n_classes != 1:
            raise DataError(f"in-memory case {index} ({case}): label values up to {label.max()}, "
                            f"but the preset has {n_classes} classes")
        label = (label > 0).astype(np.int64)
    spacing = tuple(float(s) for s in spacing)
    if pixel_spacing and not np.allclose(spacing[:2], pixel_spacing, rtol=1e-3):
        img = sitk.GetImageFromArray(image)
        img.SetSpacing(spacing)
        lab = sitk.GetImageFromArray(label.astype(np.int16))
        lab.SetSpacing(spacing)
        image = sitk.GetArrayFromImage(resample_in_plane(img, pixel_spacing, False))
        label = sitk.GetArrayFromImage(resample_in_plane(lab, pixel_spacing, True)).astype(np.int64)
        spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]), spacing[2])
    return VolumeCase(image, label, spacing, case, "memory")
