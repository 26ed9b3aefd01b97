"""Reading inputs and writing results as files (used by ``lesionseg predict``).

Writes are atomic: a temporary file beside the target, then a rename, so an interrupted
run never leaves a half-written label map, and an existing file is only replaced by a
complete one. Input files are never written to.
"""
from __future__ import annotations

import csv
import io as _io
import re
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

from ..fileio import (IMAGE_EXTENSIONS, READABLE_EXTENSIONS, VOLUME_EXTENSIONS, atomic_path, atomic_write_text,
                      split_extension)
from ..preprocessing import InputError

VOLUME_EXTS, IMAGE_EXTS, SUPPORTED_EXTS = VOLUME_EXTENSIONS, IMAGE_EXTENSIONS, READABLE_EXTENSIONS
#: photographs and screenshots: their pixel spacing is not a physical measurement
PHOTO_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
#: label maps must be lossless and single-file: JPEG/BMP labels go to PNG, header+raw pairs to one file
_OUTPUT_EXT = {".jpg": ".png", ".jpeg": ".png", ".bmp": ".png", ".mhd": ".mha", ".nhdr": ".nrrd",
               ".tif": ".tif", ".tiff": ".tiff"}


def split_ext(path) -> Tuple[str, str]:
    """(stem, extension) of an input or output image file (:func:`..fileio.split_extension`)."""
    return split_extension(path, SUPPORTED_EXTS)


def output_ext(input_ext: str) -> str:
    return _OUTPUT_EXT.get(input_ext.lower(), input_ext.lower())


def list_inputs(paths: Sequence[str], recursive: bool = False,
                exclude: Iterable[Path] = ()) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """Files to process from files and folders: (files, [(path, reason)] for unusable
    arguments). Folders give their supported files in name order, without segmentations
    (``.seg.nrrd``) and the Slicer batch's ``*_lesionseg.*`` results; ``exclude`` folders
    (the output folder) are skipped, so results are not taken for inputs."""
    exclude = [Path(e).resolve() for e in exclude]
    files, problems = [], []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            found = sorted(f for f in it if f.is_file() and not f.name.startswith(".")
                           and split_ext(f)[1] in SUPPORTED_EXTS and not _is_result(f.name)
                           and not any(f.resolve().is_relative_to(e) for e in exclude))
            if not found:
                problems.append((str(p), "folder holds no NIfTI, NRRD, MHA, PNG or JPEG file"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append((str(p), "no such file or folder"))
    return files, problems


def _is_result(name: str) -> bool:
    name = name.lower()
    return name.endswith(".seg.nrrd") or "_lesionseg." in name


def read_image(path, what: str = "the image", *, verify: bool = True):
    """SimpleITK image of a file, or an :class:`InputError` with the reason (callers
    name the file): the one image reader of LesionSeg, for predictions, training data,
    evaluation and Slicer's fallback.

    ``verify`` (for files users give): a file cut short or with damaged compressed data
    is refused even where ITK would fill the gap with zeros (``.nii.gz``, ``.nii``, JPEG,
    BMP), and so is a header whose spacing or orientation is not usable. Training reads
    the same files every epoch and leaves it off (it would decompress each file twice)."""
    import SimpleITK as sitk
    from ..validation import check_complete, check_geometry
    path = Path(path)
    ext = split_ext(path)[1]
    if ext not in SUPPORTED_EXTS:
        raise InputError(f"unsupported file type {ext or '(none)'}; use {', '.join(SUPPORTED_EXTS)}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"cannot read {what} ({itk_reason(e)})") from None
    if not verify:
        return image
    try:
        check_complete(path)
        check_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), what)
    except OSError as e:
        raise InputError(f"cannot read {what} ({e.strerror or e})") from None
    except ValueError as e:
        raise InputError(str(e)) from None
    return image


def itk_reason(error: BaseException) -> str:
    """The reason in an ITK/SimpleITK exception, without source locations and object
    addresses, and never cut before the reason."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    body = []
    for ln in lines:
        if ln.startswith("Exception thrown in SimpleITK") or re.match(r"^/\S+:\d+:?$", ln):
            continue
        ln = re.sub(r"^(ITK ERROR|sitk::ERROR):\s*", "", ln)
        ln = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", ln)
        body.append(ln)
    detail = " ".join(body) or type(error).__name__
    if "Unable to determine ImageIO reader" in detail:
        return "no reader recognises its content: damaged, or not the format its name says"
    if "File cannot be read" in detail and "No such file or directory" in detail:
        return "its data are incomplete or unreadable; the file may be cut short"
    if "Error while reading file" in detail or "PNG critical error" in detail:
        return "its PNG data are damaged or cut short"
    nrrd = [ln for ln in body if ln.startswith("[nrrd]")]
    if nrrd:  # teem's message is a stack, innermost (the reason) last
        reason = nrrd[-1].split(":", 1)[-1].strip() or nrrd[-1]
        return f"NRRD: {reason}"
    return detail if len(detail) <= 300 else "… " + detail[-300:]


def _verify_image(image, ext: str):
    """A ``verify`` for :func:`atomic_path`: the written file must read back complete,
    with the same pixels and grid."""
    import numpy as np
    import SimpleITK as sitk
    from ..validation import check_complete
    want = sitk.GetArrayViewFromImage(image)

    def verify(tmp: Path) -> None:
        check_complete(tmp)
        back = sitk.ReadImage(str(tmp))
        got = sitk.GetArrayViewFromImage(back)
        if got.shape != want.shape or not np.array_equal(got, want):
            raise ValueError("what was read back differs from what was written")
        if back.GetSize() != image.GetSize():
            raise ValueError("the written image has another size")
    return verify


def write_image(image, path, compress: bool = True) -> Path:
    """Write a SimpleITK image atomically (temporary file, then rename); the file is
    read back and compared before it is put in place, so a full disk never leaves a
    truncated file at ``path``."""
    import SimpleITK as sitk
    path = Path(path)
    ext = split_ext(path)[1]
    lossy = ext in (".jpg", ".jpeg")
    with atomic_path(path, suffix=f".tmp{ext}", verify=None if lossy else _verify_image(image, ext)) as tmp:
        # PNG/JPEG writers take no compression flag worth setting; volumes are compressed
        try:
            sitk.WriteImage(image, str(tmp), compress and ext in VOLUME_EXTS)
        except RuntimeError as e:
            raise write_error(path, tmp, e) from None
    return path


def write_error(path: Path, tmp: Path, error: BaseException):
    """A :class:`~LesionSegLib.fileio.WriteError` for an ITK writer's exception: one line
    naming the destination (never the temporary file), saying when the disk is full."""
    import errno
    import os
    from ..fileio import WriteError
    text = str(error)
    full = "No space left on device" in text
    if not full:
        try:
            st = os.statvfs(path.parent)
            full = st.f_bavail * st.f_frsize < 1024 * 1024 and st.f_bavail < 0.01 * max(st.f_blocks, 1)
        except (OSError, AttributeError):
            pass
    if full:
        return WriteError(errno.ENOSPC, f"cannot write {path}: no space left on the device")
    reason = itk_reason(error).replace(str(tmp), str(path)).replace(tmp.name, path.name)
    return WriteError(errno.EIO, f"cannot write {path}: {reason}")


def write_text(text: str, path) -> Path:
    return atomic_write_text(path, text)


LESION_COLUMNS = ("file", "class", "class_name", "lesion", "voxels", "volume_mm3", "max_section_mm2", "size_level",
                  "centroid_i", "centroid_j", "centroid_k", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm")


def lesions_csv(rows, file_name: str, classes) -> str:
    """The lesion table as CSV text (one row per lesion; LPS millimetres)."""
    names = {int(c["value"]): c["name"] for c in classes}
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LESION_COLUMNS)
    for r in rows:
        ijk = list(r["centroid_ijk"]) + [""] * (3 - len(r["centroid_ijk"]))
        lps = list(r["centroid_lps_mm"]) + [""] * (3 - len(r["centroid_lps_mm"]))
        w.writerow([file_name, r["class"], names.get(r["class"], ""), r["lesion"], r["voxels"],
                    f"{r['volume_mm3']:.3f}", f"{r['max_section_mm2']:.3f}", r["size_level"] or "", *ijk, *lps])
    return buf.getvalue()
