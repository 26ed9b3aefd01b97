"""Reading inputs and writing results as files (used by ``lesionseg predict``).

Writes are atomic: a temporary file beside the target, then a rename, so an interrupted
run never leaves a half-written label map, and an existing file is only replaced by a
complete one. Input files are never written to.
"""
from __future__ import annotations

import csv
import io as _io
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

from ..fileio import atomic_path, atomic_write_text
from ..preprocessing import InputError

VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUPPORTED_EXTS = VOLUME_EXTS + IMAGE_EXTS
#: photographs and screenshots: their pixel spacing is not a physical measurement
PHOTO_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
#: label maps must be lossless and single-file: JPEG/BMP labels go to PNG, header+raw pairs to one file
_OUTPUT_EXT = {".jpg": ".png", ".jpeg": ".png", ".bmp": ".png", ".mhd": ".mha", ".nhdr": ".nrrd",
               ".tif": ".tif", ".tiff": ".tiff"}


def split_ext(path) -> Tuple[str, str]:
    """(stem, extension) with double extensions such as ``.nii.gz`` kept whole."""
    name = Path(path).name
    low = name.lower()
    for ext in SUPPORTED_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)], ext
    p = Path(name)
    return p.stem, p.suffix.lower()


def output_ext(input_ext: str) -> str:
    return _OUTPUT_EXT.get(input_ext.lower(), input_ext.lower())


def list_inputs(paths: Sequence[str], recursive: bool = False,
                exclude: Iterable[Path] = ()) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """Files to process from files and folders: (files, [(path, reason)] for unusable
    arguments). Folders give their supported files in name order; ``exclude`` folders
    (the output folder) are skipped, so results are not taken for inputs."""
    exclude = [Path(e).resolve() for e in exclude]
    files, problems = [], []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            found = sorted(f for f in it if f.is_file() and not f.name.startswith(".")
                           and split_ext(f)[1] in SUPPORTED_EXTS
                           and not any(f.resolve().is_relative_to(e) for e in exclude))
            if not found:
                problems.append((str(p), "folder holds no NIfTI, NRRD, MHA, PNG or JPEG file"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append((str(p), "no such file or folder"))
    return files, problems


def read_image(path):
    """SimpleITK image of a file, or an :class:`InputError` naming the file and the reason."""
    import SimpleITK as sitk
    path = Path(path)
    ext = split_ext(path)[1]
    if ext not in SUPPORTED_EXTS:
        raise InputError(f"unsupported file type {ext or '(none)'}; use {', '.join(SUPPORTED_EXTS)}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        # ITK's messages start with source locations; the reason follows "ERROR:" / "Description:"
        for marker in ("Description:", "ERROR:"):
            if marker in detail:
                detail = detail.split(marker)[-1].strip()
                break
        if detail.startswith("Unable to determine ImageIO reader"):
            detail = "no reader recognises its content: damaged, or not the format its name says"
        raise InputError(f"cannot read the image ({detail[:200]})") from None


def write_image(image, path, compress: bool = True) -> Path:
    """Write a SimpleITK image atomically (temporary file, then rename)."""
    import SimpleITK as sitk
    path = Path(path)
    ext = split_ext(path)[1]
    with atomic_path(path, suffix=f".tmp{ext}") as tmp:
        # PNG/JPEG writers take no compression flag worth setting; volumes are compressed
        sitk.WriteImage(image, str(tmp), compress and ext in VOLUME_EXTS)
    return path


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
