"""Reading 2D images and label masks (PNG, JPEG, TIFF, BMP) into numpy, and turning
any mask encoding the collections use into a class-index map.

Everything is read with SimpleITK (a LesionSeg dependency), so no imaging library beyond
it is needed. SimpleITK expands palette PNGs to RGB; :func:`read_mask` reads the PNG's
``PLTE`` chunk itself and maps the colours back to the palette indices, which are the
class values of palette masks (COVID-SemiSeg multi-class GT, PASCAL-style masks).

Mask encodings understood by :func:`mask_to_label` (``n_classes`` = foreground classes of
the preset):

* palette PNG: the palette index is the class value;
* grey integer map with values 0…n_classes: used as is;
* binary 0/255 (or 0/1) maps, and lossy JPEG masks: thresholded at 128 (JPEG ringing
  puts values such as 1, 8, 254 near the border; CVC-ClinicDB's masks are JPEG);
* for a one-class network, any multi-class map is merged (every lesion class is
  "lesion"), e.g. ground-glass + consolidation → infection for BSNet;
* RGB colour masks: each colour must be black or one of the preset classes' ``color``.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..fileio import IMAGE_EXTENSIONS
from .errors import DataError

IMAGE_SUFFIXES = IMAGE_EXTENSIONS
JPEG_SUFFIXES = (".jpg", ".jpeg")
#: threshold of 0…255 binary masks (the middle of the 8-bit range, as the brief and the
#: official loaders that resize masks bilinearly and round)
BINARY_THRESHOLD = 128


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_file(path, what: str):
    """SimpleITK image of a training file (:func:`LesionSegLib.inference.io.read_image`),
    or a :class:`DataError` naming the file."""
    from ..inference.io import read_image
    try:
        return read_image(Path(path), what, verify=False)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


def read_image(path, grey_if_equal: bool = False) -> np.ndarray:
    """Pixels of a 2D image: (H, W) grey or (H, W, C) colour, in the file's dtype; alpha
    is dropped. ``grey_if_equal``: an RGB image whose channels are all equal (grey saved
    as RGB) comes back grey, for grey networks. Raises :class:`DataError` naming the file."""
    import SimpleITK as sitk
    path = Path(path)
    img = read_file(path, "the image")
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:  # some TIFF writers add a z of 1
        img = img[:, :, 0]
    if img.GetDimension() != 2:
        raise DataError(f"{path}: expected a 2D image, found a {img.GetDimension()}D image of size {img.GetSize()}")
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if arr.shape[2] == 1 or (grey_if_equal and arr.shape[2] == 3 and np.array_equal(arr[..., 0], arr[..., 1])
                                 and np.array_equal(arr[..., 0], arr[..., 2])):
            arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def png_palette(path) -> Optional[np.ndarray]:
    """The ``PLTE`` colours (N, 3) of an indexed-colour PNG, else None."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos, color_type = 8, None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            color_type = body[9]
        elif ctype == b"PLTE":
            if color_type != 3:  # a suggested palette of a true-colour image: not indices
                return None
            return np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif ctype in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _palette_indices(rgb: np.ndarray, palette: np.ndarray, path) -> np.ndarray:
    key = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pkey = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
    lut: Dict[int, int] = {}
    for i, k in enumerate(pkey.tolist()):
        lut.setdefault(k, i)  # duplicated colours: the first index, as decoders that re-index do
    values, inverse = np.unique(key, return_inverse=True)
    out = np.empty(values.shape, np.int64)
    for j, v in enumerate(values.tolist()):
        if v not in lut:
            raise DataError(f"{path}: palette mask has a colour {((v >> 16) & 255, (v >> 8) & 255, v & 255)} "
                            f"that is not in its palette")
        out[j] = lut[v]
    return out[inverse].reshape(key.shape)


def read_mask(path, classes: Sequence[Dict] = (), n_classes: int = 1) -> np.ndarray:
    """Class-index map (H, W) int64 of a mask file (0 background, 1…n_classes)."""
    import SimpleITK as sitk
    path = Path(path)
    img = read_file(path, "the mask")
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
    arr = sitk.GetArrayFromImage(img)
    palette = png_palette(path) if arr.ndim == 3 else None
    if palette is not None:
        arr = _palette_indices(arr[..., :3], palette, path)
        return mask_to_label(arr, path, classes, n_classes, indices=True)
    return mask_to_label(arr, path, classes, n_classes, jpeg=path.suffix.lower() in JPEG_SUFFIXES)


def mask_to_label(arr: np.ndarray, path, classes: Sequence[Dict] = (), n_classes: int = 1, *,
                  jpeg: bool = False, indices: bool = False) -> np.ndarray:
    """See the module docstring for the encodings. ``indices``: values are class indices
    (palette) and are never thresholded."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if arr.shape[2] == 1 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            arr = arr[..., 0]
        else:
            return _colour_mask(arr, path, classes, n_classes)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{path}: the mask contains NaN or infinite values")
        if arr.max(initial=0) <= 1.0 and arr.min(initial=0) >= 0 and not np.all(arr == np.round(arr)):
            return (arr >= 0.5).astype(np.int64)  # a probability-like [0, 1] mask
        arr = np.round(arr)
    if arr.min(initial=0) < 0:
        raise DataError(f"{path}: the mask has negative values")
    arr = arr.astype(np.int64)
    top = int(arr.max(initial=0))
    if jpeg and not indices:
        # lossy compression smears 0/255 edges into a range of values: threshold
        return (arr >= BINARY_THRESHOLD).astype(np.int64)
    if top <= n_classes:
        return arr
    if n_classes == 1:
        # one-class network: 0/255 (or anti-aliased 0…255) masks are thresholded, small
        # integer multi-class maps are merged into "lesion"
        return (arr >= BINARY_THRESHOLD).astype(np.int64) if top >= BINARY_THRESHOLD and not indices \
            else (arr > 0).astype(np.int64)
    values = np.unique(arr)
    if not indices and set(values.tolist()) <= {0, 255}:
        return (arr > 0).astype(np.int64)  # a binary mask given to a multi-class net: class 1
    raise DataError(f"{path}: mask values {values[:12].tolist()}{' …' if values.size > 12 else ''} do not fit "
                    f"the {n_classes} classes of this preset (expected 0…{n_classes}, or a 0/255 binary mask)")


def _colour_mask(rgb: np.ndarray, path, classes: Sequence[Dict], n_classes: int) -> np.ndarray:
    colours = {(0, 0, 0): 0}
    for c in classes:
        if c.get("color") is not None:
            colours[tuple(int(v) for v in c["color"][:3])] = int(c["value"])
    key = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    values, inverse = np.unique(key, return_inverse=True)
    lut = {(r << 16) | (g << 8) | b: v for (r, g, b), v in colours.items()}
    out = np.empty(values.shape, np.int64)
    for j, v in enumerate(values.tolist()):
        if v not in lut:
            known = ", ".join(f"{k}→{val}" for k, val in colours.items())
            raise DataError(f"{path}: colour mask has colour {((v >> 16) & 255, (v >> 8) & 255, v & 255)}, which is "
                            f"neither black nor a class colour of this preset ({known}); save masks as class "
                            f"indices or a palette PNG")
        out[j] = lut[v]
    label = out[inverse].reshape(key.shape)
    return (label > 0).astype(np.int64) if n_classes == 1 else label


def derive_edge(label: np.ndarray) -> np.ndarray:
    """Boundary map (H, W) uint8 0/1: pixels with a 4-neighbour of another class.

    This reproduces COVID-SemiSeg's released ``Edge/`` maps (Inf-Net's edge GT): on the
    50 training slices they are exactly a subset of this band, which straddles the
    boundary by one pixel on each side (checked while writing this; see docs/training.md).
    The image border is not an edge (replicate padding).
    """
    lab = np.asarray(label)
    p = np.pad(lab, 1, mode="edge")
    c = p[1:-1, 1:-1]
    edge = (p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) | (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c)
    return edge.astype(np.uint8)
