"""Write the fixed train / validation / test splits of the release weights
(``weights/splits/polyp.json``, ``weights/splits/busi.json``) from the data in ../shared/data.

Cases never straddle two parts: CVC-ClinicDB is split by video sequence, Kvasir-SEG by
image, BUSI by groups of near-duplicate images (:func:`busi_groups`). The ``test`` cases are never trained on nor used for model selection; the release
cards report metrics on them. Re-running this script reproduces the file byte for byte.
(``weights/splits/idrid.json`` is written by hand: 15 images, two for validation, three
for test, listed in the file.)

    python scripts/make_splits.py [--data ../shared/data] [--out weights/splits] [polyp] [busi]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import csv

import numpy as np
import SimpleITK as sitk

from LesionSegLib.data.folders import folder_pairs

SEED = 20261201


def pick(cases, n, rng):
    order = sorted(cases)
    return sorted(order[i] for i in rng.permutation(len(order))[:n])


def polyp(data: Path) -> dict:
    rng = np.random.default_rng(SEED)
    clinic = sorted({p.case for p in folder_pairs(data / "polyp-clinicdb")}, key=int)
    kvasir = sorted({p.case for p in folder_pairs(data / "polyp-kvasir256")})
    c_test = pick(clinic, 4, rng)
    c_val = pick([c for c in clinic if c not in c_test], 3, rng)
    k_test = pick(kvasir, 90, rng)
    k_val = pick([c for c in kvasir if c not in k_test], 90, rng)
    return {"dataset": "polyp-clinicdb (by video sequence) + polyp-kvasir256 (by image), trained as one set",
            "case_rule": "ClinicDB: sequences.csv; Kvasir: one image = one case; ids prefixed by folder name",
            "val": [f"polyp-clinicdb/{c}" for c in c_val] + [f"polyp-kvasir256/{c}" for c in k_val],
            "test": [f"polyp-clinicdb/{c}" for c in c_test] + [f"polyp-kvasir256/{c}" for c in k_test]}


def _thumb(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` averaged down (or up) to n×n."""
    ys = np.linspace(0, a.shape[0], n + 1).astype(int)
    xs = np.linspace(0, a.shape[1], n + 1).astype(int)
    cum = np.pad(a.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    y0, y1 = np.maximum(ys[:-1], 0), np.maximum(ys[1:], ys[:-1] + 1)
    x0, x1 = np.maximum(xs[:-1], 0), np.maximum(xs[1:], xs[:-1] + 1)
    s = cum[y1][:, x1] - cum[y0][:, x1] - cum[y1][:, x0] + cum[y0][:, x0]
    return s / ((y1 - y0)[:, None] * (x1 - x0)[None, :])


def _unit(a: np.ndarray) -> np.ndarray:
    a = a.ravel() - a.mean()
    return a / (np.linalg.norm(a) + 1e-9)


def busi_groups(root: Path, files) -> list:
    """Groups of BUSI images that are near-duplicates of each other: the same frame saved
    twice, re-cropped or rescaled (Pawłowska et al., Data in Brief 2023). Two images are
    linked when their whole-image 32×32 thumbnails correlate ≥ 0.9, or — crop- and
    scale-tolerant — when their lesions match: the mask inside its bounding box (24×24)
    overlaps with IoU ≥ 0.85, the image inside that box (32×32) correlates ≥ 0.85 and the
    boxes' aspect ratios differ by less than 15 %. Groups are the connected components.
    The rule errs towards linking (a split can only lose variety, never leak); on the 700
    images here it gives 474 groups, the largest of 18 images."""
    thumbs, shapes, patches, aspect, lesion = [], [], [], [], []
    for f in files:
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "images" / f))).astype(np.float32)
        img = img.mean(-1) if img.ndim == 3 else img
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / f))) > 127
        mask = mask.any(-1) if mask.ndim == 3 else mask
        thumbs.append(_unit(_thumb(img, 32)))
        lesion.append(bool(mask.any()))
        if mask.any():
            ys, xs = np.nonzero(mask)
            box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            shapes.append(_thumb(mask[box], 24).ravel() > 0.5)
            patches.append(_unit(_thumb(img[box], 32)))
            aspect.append(np.log((xs.max() + 1 - xs.min()) / (ys.max() + 1 - ys.min())))
        else:
            shapes.append(np.zeros(24 * 24, bool))
            patches.append(np.zeros(32 * 32))
            aspect.append(0.0)
    shape = np.array(shapes, np.float32)
    inter = shape @ shape.T
    area = shape.sum(1)
    iou = inter / np.maximum(area[:, None] + area[None] - inter, 1)
    patch = np.array(patches) @ np.array(patches).T
    aspect = np.array(aspect)
    both = np.array(lesion)[:, None] & np.array(lesion)[None]
    linked = (np.array(thumbs) @ np.array(thumbs).T >= 0.9) | (
        both & (iou >= 0.85) & (patch >= 0.85) & (np.abs(aspect[:, None] - aspect[None]) < np.log(1.15)))
    group = -np.ones(len(files), int)
    for start in range(len(files)):
        if group[start] >= 0:
            continue
        group[start], todo = start, [start]
        while todo:
            i = todo.pop()
            for j in np.nonzero(linked[i] & (group < 0))[0]:
                group[j] = start
                todo.append(j)
    return [[files[i] for i in np.nonzero(group == g)[0]] for g in sorted(set(group))]


def busi(data: Path) -> dict:
    """About 15 % test and 10 % validation images of each class (benign, malignant,
    normal), whole near-duplicate groups at a time; a group counts for its first image's class."""
    root = data / "breast-busi"
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        label = {r["file"]: r["class"] for r in csv.DictReader(f)}
    groups = busi_groups(root, sorted(label))
    rng = np.random.default_rng(SEED)
    test, val = [], []
    for cls in sorted(set(label.values())):
        mine = [g for g in groups if label[g[0]] == cls]
        total = sum(len(g) for g in mine)
        taken = 0
        for k in rng.permutation(len(mine)):
            part = test if taken < 0.15 * total else val if taken < 0.25 * total else None
            if part is None:
                break
            part.extend(mine[k])
            taken += len(mine[k])
    stem = lambda files: sorted(Path(f).stem for f in files)  # noqa: E731
    return {"dataset": "breast-busi (BUSI, 700 images here: benign, malignant, normal)",
            "case_rule": "one image = one case (case_regex ^(.*)$); near-duplicate images (busi_groups in "
                         "scripts/make_splits.py) always on the same side; about 15 % test, 10 % validation "
                         "of each class",
            "groups": len(groups),
            "val": stem(val), "test": stem(test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "weights" / "splits")
    ap.add_argument("what", nargs="*", default=["polyp"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.what:
        split = {"polyp": polyp, "busi": busi}[name](args.data)
        (args.out / f"{name}.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(split['val'])} validation, {len(split['test'])} test cases")


if __name__ == "__main__":
    main()
