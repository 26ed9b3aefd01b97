"""Checks of what users give LesionSeg: numeric options, image geometry and whether an
image file is complete. Each failure is one sentence naming the problem.

Needs only the standard library and numpy (no torch), so the command line can validate
options at parse time and Slicer can import it at start-up.
"""
from __future__ import annotations

import argparse
import gzip
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Tuple


class OptionError(ValueError):
    """A numeric option or argument out of its range, with the reason."""


# ----------------------------------------------------------------------------- numbers
def number(value, name: str, *, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False):
    """``value`` as a finite float (or int) within the bounds, else an :class:`OptionError`
    naming ``name`` and the allowed range."""
    text = value if isinstance(value, str) else repr(value)
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value) if not isinstance(value, str) else float(value.strip())
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(x):
        raise OptionError(f"{name} must be a finite number, not {text}")
    if integer:
        if x != int(x):
            raise OptionError(f"{name} must be a whole number, not {text}")
        x = int(x)
    bad_lo = lo is not None and (x <= lo if lo_open else x < lo)
    bad_hi = hi is not None and (x >= hi if hi_open else x > hi)
    if bad_lo or bad_hi:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        if lo is not None and hi is not None:
            rng = f"in {left}, {right}"
        elif lo is not None:
            rng = f"{'greater than' if lo_open else 'at least'} {lo:g}"
        else:
            rng = f"{'less than' if hi_open else 'at most'} {hi:g}"
        raise OptionError(f"{name} must be {rng}, not {text}")
    return x


def threshold(value, name: str = "the threshold") -> Optional[float]:
    """A probability threshold: None (the card's) or a number strictly between 0 and 1."""
    if value is None:
        return None
    return number(value, name, lo=0.0, hi=1.0, lo_open=True, hi_open=True)


def threshold_pair(threshold_value, seed_value, card_threshold: float,
                   card_seed: Optional[float] = None) -> Tuple[float, Optional[float]]:
    """(threshold, seed threshold or None) of a run: the card's (or the weights') unless
    given. A lesion is the connected region above the threshold; with a seed threshold
    (hysteresis) only regions holding a pixel at or above it are kept. ``seed_value=0``
    turns the rule off; a card's seed at or below a threshold the user raised is dropped
    (it would keep every region), a seed the user gives there is refused."""
    thr = card_threshold if threshold_value is None else threshold(threshold_value)
    if seed_value is not None and seed_value == 0:
        return thr, None
    seed = card_seed if seed_value is None else threshold(seed_value, "the seed threshold")
    if seed is not None and seed <= thr:
        if seed_value is None:
            return thr, None
        raise OptionError(f"the seed threshold {seed:g} must be above the threshold {thr:g} (a lesion is kept "
                          f"where one of its pixels reaches the seed threshold); 0 turns the rule off")
    return thr, seed


def window(center, width, name: str = "the window") -> dict:
    c = number(center, f"{name} centre")
    w = number(width, f"{name} width", lo=0.0, lo_open=True)
    return {"center": c, "width": w}


def arg_type(check, **bounds):
    """An ``argparse`` ``type=`` that validates with :func:`number` (or ``check``)."""
    def convert(text: str):
        try:
            if check is number:
                return number(text, "the value", **bounds)
            return check(text)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).replace("the value ", "", 1)) from None
    convert.__name__ = "number"  # argparse names the type in "invalid number value"
    return convert


#: ``type=`` of a probability threshold option: strictly between 0 and 1
probability_arg = arg_type(number, lo=0.0, hi=1.0, lo_open=True, hi_open=True)


def device_arg(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (availability is checked later)."""
    value = (text or "").strip().lower()
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return value
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")


# ----------------------------------------------------------------------------- geometry
def check_geometry(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float],
                   what: str = "the image") -> None:
    """Refuse spacing that is not positive and finite, a non-finite origin, and a
    direction matrix that is not finite or is singular, with one sentence."""
    import numpy as np
    sp = [float(s) for s in spacing]
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"{what} has voxel spacing ({', '.join(f'{s:g}' for s in sp)}); every spacing must be "
                         f"a positive number: fix the image header")
    org = [float(o) for o in origin]
    if not all(math.isfinite(o) for o in org):
        raise ValueError(f"{what} has a non-finite origin ({', '.join(f'{o:g}' for o in org)}); fix the image header")
    d = np.asarray([float(v) for v in direction], float)
    n = int(round(math.sqrt(d.size)))
    if n * n != d.size or not np.all(np.isfinite(d)) or abs(np.linalg.det(d.reshape(n, n))) < 1e-6:
        raise ValueError(f"{what} has an invalid orientation (direction matrix not finite or singular); "
                         f"fix the image header")


# ----------------------------------------------------------------------------- complete files
_CHUNK = 1 << 20


def _nifti_expected(header: bytes) -> Optional[Tuple[int, int]]:
    """(vox_offset, data bytes) from a NIfTI-1/2 header, or None if it is not one."""
    if len(header) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if size == 540 and len(header) >= 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    count = 1
    for d in dims[1:ndim + 1]:
        count *= max(int(d), 1)
    return max(offset, 352 if size == 348 else 544), count * bitpix // 8


def check_complete(path) -> None:
    """Raise ``ValueError`` when an image file is cut short or its compressed data are
    damaged, for the formats whose readers would otherwise fill the gap silently:
    gzip-compressed files (``.nii.gz``), NIfTI (``.nii``), JPEG and BMP."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        total, head = 0, b""
        try:
            with gzip.open(path, "rb") as f:
                while True:
                    block = f.read(_CHUNK)
                    if not block:
                        break
                    if len(head) < 540:
                        head += block[:540 - len(head)]
                    total += len(block)
        except EOFError:
            raise ValueError("the compressed file is cut short (an incomplete download or copy?)") from None
        except (OSError, zlib.error) as e:
            raise ValueError(f"the compressed data are damaged ({' '.join(str(e).split())})") from None
        if name.endswith(".nii.gz"):
            _check_nifti(head, total)
    elif name.endswith(".nii"):
        with open(path, "rb") as f:
            head = f.read(540)
        _check_nifti(head, path.stat().st_size)
    elif name.endswith((".jpg", ".jpeg")):
        data = path.read_bytes()
        if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise ValueError("the JPEG file is cut short (no end-of-image marker after its last scan)")
    elif name.endswith(".bmp"):
        with open(path, "rb") as f:
            head = f.read(54)
        if len(head) >= 34 and head[:2] == b"BM":
            offset, = struct.unpack("<I", head[10:14])
            width, height = struct.unpack("<ii", head[18:26])
            bpp, compression = struct.unpack("<HI", head[28:34])
            if compression in (0, 3) and bpp:
                need = offset + ((abs(width) * bpp + 31) // 32) * 4 * abs(height)
                have = path.stat().st_size
                if have < need:
                    raise ValueError(f"the BMP file is cut short ({have} of {need} bytes)")


def _check_nifti(header: bytes, size: int) -> None:
    expected = _nifti_expected(header)
    if expected is None:
        return
    offset, nbytes = expected
    if size < offset + nbytes:
        raise ValueError(f"the NIfTI file is cut short: its header announces {offset + nbytes} bytes, "
                         f"it holds {size}")
