"""2D training folders: image/mask pairs, their layout, and the case each image belongs to.

Layouts (folder names matched without regard to case), detected in this order:

* ``<root>/images`` + ``<root>/masks``   (Kvasir-SEG, CVC-ClinicDB style)
* ``<root>/Imgs`` + ``<root>/GT`` [+ ``<root>/Edge``]   (COVID-SemiSeg / Inf-Net)
* ``<root>/image`` + ``<root>/mask``     (the M2SNet release's loader)

Any layout may have an ``Edge``/``edges`` folder of boundary maps (BSNet's edge output);
without one, edges are derived from the masks (:func:`LesionSegLib.data.images.derive_edge`).

Pairs are matched by file stem. When stems differ by a role word (``fine_3_10_fram.jpg`` ↔
``fine_3_10_mask.jpg``, ``12_img.png`` ↔ ``12_gt.png``), the word is dropped first.

Cases. Slices of one patient must never be split between training and validation.
A case id comes from the file name (:func:`case_ids`):

1. a ``cases.csv`` in the root (``file,case`` rows; file stem or name), or the ``cases``
   argument (dict or CSV path) — for data whose names carry no patient id;
2. else ``case_regex`` (named group ``case``, else group 1, else the whole match);
3. else the default rule: the name without its trailing number (``fine_3_10`` → case
   ``fine_3``: CVC-ClinicDB frames ``<seq>_<frame>``; ``pat07_slice012`` → ``pat07``).
   When that leaves a single prefix for every file (names that are *only* running
   numbers, as COVID-SemiSeg's ``0.jpg … 67.jpg``, or the frames of a single video,
   ``fine_3_1 … fine_3_20``), the numbers are grouped in blocks of
   ``number_block`` (10) consecutive values: COVID-SemiSeg numbers the slices of the
   MedSeg set in their source order, which stacks each patient's slices together, so
   neighbouring numbers are the likely patient-mates; a block keeps them on one side of
   the split (a patient can straddle a block edge only, not be scattered). See
   docs/training.md.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .errors import DataError
from .images import is_image_file

#: (image folder, mask folder) name pairs, in detection order
LAYOUTS: Tuple[Tuple[str, str], ...] = (("images", "masks"), ("imgs", "gt"), ("image", "mask"))
EDGE_FOLDERS = ("edge", "edges")
#: words naming a file's role, dropped from stems before matching (``_mask``, ``-gt`` …)
ROLE_WORDS = ("mask", "masks", "gt", "label", "labels", "seg", "segmentation", "annotation",
              "fram", "frame", "img", "image", "edge", "edges")
_ROLE_RE = re.compile(r"[_\-. ]+(?:" + "|".join(ROLE_WORDS) + r")$", re.IGNORECASE)
_TRAILING_NUMBER_RE = re.compile(r"^(?P<prefix>.*?)[_\-. ]*(?P<number>\d+)$")
NUMBER_BLOCK = 10


@dataclass(frozen=True)
class ImagePair:
    """One 2D training sample on disk."""
    image: Path
    mask: Union[Path, Tuple[Path, ...]]  # a tuple: one file per class (multi-label targets)
    edge: Optional[Path] = None
    case: str = ""
    key: str = ""


@dataclass
class FolderLayout:
    root: Path
    images: Path
    masks: Path
    edges: Optional[Path]
    name: str = field(default="")


def _subdirs(root: Path) -> Dict[str, Path]:
    return {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()}


def detect_layout(root) -> FolderLayout:
    """Find the image/mask folders of ``root``; :class:`DataError` naming what was found."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (2D training data is a folder of image and mask folders)")
    subs = _subdirs(root)
    for img_name, mask_name in LAYOUTS:
        if img_name in subs and mask_name in subs:
            edges = next((subs[e] for e in EDGE_FOLDERS if e in subs), None)
            return FolderLayout(root, subs[img_name], subs[mask_name], edges,
                                f"{subs[img_name].name}/{subs[mask_name].name}" + (f"/{edges.name}" if edges else ""))
    found = ", ".join(p.name for p in subs.values()) or "no sub-folders"
    expected = " | ".join("{" + f"{a},{b}" + "}" for a, b in (("images", "masks"), ("Imgs", "GT[,Edge]"),
                                                                ("image", "mask")))
    raise DataError(f"{root}: no known image/mask folder layout; expected <root>/{expected}; found: {found}")


def match_key(stem: str) -> str:
    """The stem with a trailing role word removed (``fine_3_10_mask`` → ``fine_3_10``)."""
    return _ROLE_RE.sub("", stem)


def _files_by(folder: Path, key_fn) -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not is_image_file(p):
            continue
        k = key_fn(p.stem)
        if k in out:
            raise DataError(f"{folder}: two files have the same name stem {k!r}: {out[k].name} and {p.name}; "
                            f"remove one")
        out[k] = p
    return out


def _match(images: Path, masks: Path) -> Tuple[Dict[str, Path], Dict[str, Path], object]:
    exact_i, exact_m = _files_by(images, str), _files_by(masks, str)
    if exact_i and set(exact_i) <= set(exact_m):
        return exact_i, exact_m, str
    try:
        loose_i, loose_m = _files_by(images, match_key), _files_by(masks, match_key)
    except DataError:
        return exact_i, exact_m, str
    if len(set(loose_i) & set(loose_m)) > len(set(exact_i) & set(exact_m)):
        return loose_i, loose_m, match_key
    return exact_i, exact_m, str


#: header names of the case column in a case table (``cases.csv`` or ClinicDB's ``sequences.csv``)
CASE_COLUMNS = ("case", "sequence", "patient", "subject", "group")
CASE_TABLES = ("cases.csv", "sequences.csv")


def _read_case_file(path: Path) -> Dict[str, str]:
    """``file → case`` from a CSV table: ``file,case`` rows, or a header naming the file
    column (file, image, name, stem) and a case column (:data:`CASE_COLUMNS`, e.g.
    CVC-ClinicDB's ``file,frame,sequence``)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    except OSError as e:
        raise DataError(f"{path}: cannot read the case table ({e})") from None
    file_col, case_col = 0, 1
    if rows and rows[0][0].strip().lower() in ("file", "image", "name", "stem"):
        header = [h.strip().lower() for h in rows[0]]
        case_col = next((header.index(c) for c in CASE_COLUMNS if c in header), 1)
        rows = rows[1:]
    table: Dict[str, str] = {}
    for i, row in enumerate(rows):
        if len(row) <= max(file_col, case_col):
            raise DataError(f"{path}: row {i + 1} ({','.join(row)}): expected a file name and a case")
        table[Path(row[file_col].strip()).stem] = row[case_col].strip()
    return table


def case_ids(keys: Sequence[str], case_regex: Optional[str] = None,
             cases: Union[None, Dict[str, str], str, Path] = None, number_block: int = NUMBER_BLOCK,
             where: str = "") -> Tuple[Dict[str, str], str]:
    """Case id of every key (file stem) and a description of the rule used."""
    if cases is not None:
        table = dict(cases) if isinstance(cases, dict) else _read_case_file(Path(cases))
        table = {Path(k).stem: str(v) for k, v in table.items()}
        missing = [k for k in keys if k not in table]
        if missing:
            raise DataError(f"{where or 'case table'}: no case given for {len(missing)} file(s), e.g. "
                            f"{', '.join(missing[:5])}")
        return {k: table[k] for k in keys}, "case table" + (f" {cases}" if not isinstance(cases, dict) else "")
    if case_regex:
        rx = re.compile(case_regex)
        out = {}
        for k in keys:
            m = rx.search(k)
            if not m:
                raise DataError(f"{where}: file {k!r} does not match case_regex {case_regex!r}")
            gd = m.groupdict()
            out[k] = gd["case"] if gd.get("case") is not None else (m.group(1) if m.groups() else m.group(0))
        return out, f"case_regex {case_regex!r}"
    prefixes = {}
    for k in keys:
        m = _TRAILING_NUMBER_RE.match(k)
        prefixes[k] = (m.group("prefix"), int(m.group("number"))) if m else (k, None)
    distinct = {p for p, _ in prefixes.values()}
    if len(keys) > 1 and len(distinct) == 1 and all(n is not None for _, n in prefixes.values()):
        block = max(1, int(number_block))
        out = {}
        for k, (p, n) in prefixes.items():
            lo = n // block * block
            out[k] = f"{p}#{lo}-{lo + block - 1}" if p else f"{lo}-{lo + block - 1}"
        return out, (f"running numbers without a patient id: blocks of {block} consecutive numbers "
                     f"(neighbouring slices of the source stack stay together)")
    return {k: (p if n is not None and p else k) for k, (p, n) in prefixes.items()}, \
        "file name without its trailing number"


def folder_pairs(root, *, case_regex: Optional[str] = None, cases=None, number_block: int = NUMBER_BLOCK,
                 allow_unmatched: bool = False) -> List[ImagePair]:
    """The image/mask(/edge) pairs of a 2D training folder, sorted by name, each with
    its case id. Raises :class:`DataError` for an unknown layout, no masks, or images
    without a mask (``allow_unmatched`` skips those instead)."""
    layout = detect_layout(root)
    imgs, masks, key_fn = _match(layout.images, layout.masks)
    if not imgs:
        raise DataError(f"{layout.images}: no image files ({', '.join(s for s in ('.png', '.jpg', '.tif', '.bmp'))})")
    if not masks:
        raise DataError(f"{layout.masks}: no masks found")
    unmatched = [p.name for k, p in imgs.items() if k not in masks]
    if unmatched and not allow_unmatched:
        raise DataError(f"{layout.masks}: no mask for {len(unmatched)} of {len(imgs)} image(s), e.g. "
                        f"{', '.join(unmatched[:5])} (masks are matched by file name stem)")
    edges = _files_by(layout.edges, key_fn) if layout.edges else {}
    keys = sorted((k for k in imgs if k in masks), key=_natural_key)
    if not keys:
        raise DataError(f"{layout.root}: no image has a mask with the same name stem "
                        f"(e.g. image {next(iter(imgs.values())).name}, mask {next(iter(masks.values())).name})")
    if cases is None and case_regex is None:
        cases = case_table(layout.root)
    ids, _ = case_ids(keys, case_regex, cases, number_block, where=str(layout.root))
    return [ImagePair(imgs[k], masks[k], edges.get(k), ids[k], k) for k in keys]


def case_table(root) -> Optional[Path]:
    """The case table of a 2D folder (:data:`CASE_TABLES`), or None."""
    return next((Path(root) / n for n in CASE_TABLES if (Path(root) / n).is_file()), None)


def class_mask_pairs(root, suffixes: Sequence[str], *, case_regex: Optional[str] = None, cases=None,
                     number_block: int = NUMBER_BLOCK) -> List[ImagePair]:
    """Pairs of a folder with one mask file per class and image (IDRiD:
    ``images/IDRiD_01.jpg`` with ``masks/IDRiD_01_EX.png``, ``…_HE.png``, …): each pair's
    ``mask`` is a tuple of paths in the order of ``suffixes`` (the network's channels).
    Mask files of other classes (IDRiD's optic disc ``_OD``) are ignored; a missing class
    file is an error naming it (an absent lesion is an all-zero file)."""
    layout = detect_layout(root)
    imgs = _files_by(layout.images, str)
    if not imgs:
        raise DataError(f"{layout.images}: no image files")
    mask_files = _files_by(layout.masks, str)
    pairs_keys, missing = [], []
    for k in sorted(imgs, key=_natural_key):
        found = [mask_files.get(f"{k}_{s}") for s in suffixes]
        if not any(found):
            continue
        if not all(found):
            missing.extend(f"{k}_{s}" for s, f in zip(suffixes, found) if f is None)
        pairs_keys.append((k, tuple(found)))
    if missing:
        raise DataError(f"{layout.masks}: no mask file for {', '.join(missing[:5])}"
                        f"{' …' if len(missing) > 5 else ''} (one file per class and image; an absent lesion "
                        f"is an all-zero mask)")
    if not pairs_keys:
        raise DataError(f"{layout.masks}: no per-class mask files <image>_<class> for the classes "
                        f"{', '.join(suffixes)}")
    keys = [k for k, _ in pairs_keys]
    if cases is None and case_regex is None:
        cases = case_table(layout.root)
    ids, _ = case_ids(keys, case_regex, cases, number_block, where=str(layout.root))
    return [ImagePair(imgs[k], m, None, ids[k], k) for k, m in pairs_keys]


def has_class_masks(root, suffixes: Sequence[str]) -> bool:
    """True when ``root``'s mask folder holds per-class files ``<stem>_<suffix>``."""
    if not suffixes:
        return False
    try:
        layout = detect_layout(root)
    except DataError:
        return False
    stems = {p.stem for p in layout.masks.iterdir() if is_image_file(p)}
    return any(f"{p.stem}_{suffixes[0]}" in stems for p in layout.images.iterdir() if is_image_file(p))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]
