"""``lesionseg evaluate PRED GT``: compare predicted label maps with reference ones.

PRED and GT are two files, or two folders whose files are matched by name without
extension (``case01.nii.gz`` ↔ ``case01.png`` is fine: same stem). Formats: NIfTI, NRRD,
MHA/MHD, PNG, JPEG, BMP, TIFF. Per case and class it computes Dice, IoU, sensitivity,
specificity, precision, HD95, ASSD and Hausdorff (mm, from the image spacing), lesion-wise
detection (F1, precision, recall; connected components, a reference lesion is detected
when a predicted voxel of its class touches it) and, with ``--prob``, the area under the
precision–recall curve (AUPR; L-Seg's mAUC is their mean over classes). Definitions and
the empty-mask rules are in ``LesionSegLib/metrics.py``.

Label files: integer label maps (0 background). 8-bit masks holding only 0 and 255 are
read as 0/1; JPEG masks (lossy) are binarised at 128; palette PNGs give their palette
indices; RGB files whose three channels are equal are read as grey.

Probability files (``--prob``, matched to PRED by stem): one map per class (channel i =
i-th class of ``--classes``, or class i+1): a scalar image for one class, a vector image
with one component per class, a 4D image or a ``.npy`` array (C, …) on the label grid.

Prediction and reference must share the voxel grid (size, spacing, origin, direction);
otherwise the case fails with both geometries named. In folder mode unmatched files and
failing cases are listed and the exit status is 1, but every matched case is still
evaluated and written.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..data.images import png_palette
from ..fileio import IMAGE_EXTENSIONS, READABLE_EXTENSIONS, atomic_path, split_extension
from ..validation import arg_type, number

LABEL_EXTENSIONS = READABLE_EXTENSIONS
PROB_EXTENSIONS = LABEL_EXTENSIONS + (".npy",)
EIGHT_BIT_EXTENSIONS = IMAGE_EXTENSIONS
LOSSY_EXTENSIONS = (".jpg", ".jpeg")


class EvaluationInputError(ValueError):
    """A file or folder that cannot be evaluated, with the reason and the path."""


# -------------------------------------------------------------------------- files
def list_cases(folder: Path, extensions) -> Dict[str, Path]:
    """stem → file for the readable files of ``folder`` (hidden files ignored);
    two files with the same stem are an error."""
    found: Dict[str, List[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        stem, ext = split_extension(p, extensions)
        if ext in extensions:
            found.setdefault(stem, []).append(p)
    dup = {s: ps for s, ps in found.items() if len(ps) > 1}
    if dup:
        raise EvaluationInputError(f"{folder}: several files share a case name: " + "; ".join(
            ", ".join(p.name for p in ps) for ps in dup.values()))
    return {s: ps[0] for s, ps in found.items()}


def _read_whole(path: Path):
    """SimpleITK image of a file that is complete (a file cut short is refused even where
    ITK would fill the gap with zeros)."""
    from ..inference.io import read_image
    try:
        return read_image(path, "it as an image")
    except ValueError as e:
        raise EvaluationInputError(f"{path}: {e}") from None


def read_labels(path) -> "object":
    """A scalar integer SimpleITK label image from ``path`` (rules in the module doc)."""
    import numpy as np
    import SimpleITK as sitk
    path = Path(path)
    img = _read_whole(path)
    _, ext = split_extension(path, LABEL_EXTENSIONS)
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        palette = png_palette(path) if ext == ".png" else None
        rgb = arr[..., :3].astype(np.int64)
        if palette is not None:
            keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            pal_keys = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
            lookup = {}
            for index, key in enumerate(pal_keys.tolist()):
                lookup.setdefault(key, index)  # first index of a repeated colour
            used, inverse = np.unique(keys, return_inverse=True)
            missing = [hex(k) for k in used.tolist() if k not in lookup]
            if missing:
                raise EvaluationInputError(f"{path}: colours {missing[:3]} are not in its palette")
            arr = np.array([lookup[k] for k in used.tolist()], np.int64)[inverse].reshape(keys.shape)
        elif all(np.array_equal(arr[..., 0], arr[..., i]) for i in range(1, arr.shape[-1])):
            arr = arr[..., 0]
        else:
            raise EvaluationInputError(
                f"{path}: a colour image ({img.GetNumberOfComponentsPerPixel()} channels with different values); "
                f"label files must hold one label value per voxel (grey, or a palette PNG)")
    if np.issubdtype(arr.dtype, np.floating):
        bad = arr[arr != np.round(arr)]
        if bad.size or (arr < 0).any():
            example = bad[:1].tolist() or arr[arr < 0][:1].tolist()
            raise EvaluationInputError(f"{path}: not a label map (holds non-integer or negative values, e.g. "
                                       f"{example[0]:g}); pass probability maps with --prob")
    elif (arr < 0).any():
        raise EvaluationInputError(f"{path}: not a label map (holds negative values)")
    if ext in LOSSY_EXTENSIONS:
        arr = arr >= 128  # JPEG compression smears 0/255 masks into every grey level
    elif ext in EIGHT_BIT_EXTENSIONS and arr.max(initial=0) == 255 and set(np.unique(arr).tolist()) <= {0, 255}:
        arr = arr == 255  # binary mask saved as black/white
    out = sitk.GetImageFromArray(arr.astype(np.uint16 if arr.max(initial=0) < 65536 else np.int32))
    out.CopyInformation(img)  # same grid: only the pixel values were changed
    return out


def read_probabilities(path):
    """Probabilities from ``path``: a SimpleITK image (scalar, vector or 4D) or, for
    ``.npy``, a numpy array."""
    import numpy as np
    import SimpleITK as sitk
    path = Path(path)
    _, ext = split_extension(path, PROB_EXTENSIONS)
    if ext == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EvaluationInputError(f"{path}: cannot read it as a numpy array ({e})") from e
    img = _read_whole(path)
    if img.GetPixelID() in (sitk.sitkUInt8, sitk.sitkVectorUInt8):
        img = sitk.Cast(img, sitk.sitkVectorFloat32 if img.GetNumberOfComponentsPerPixel() > 1
                        else sitk.sitkFloat32) / 255.0  # 8-bit probability images: 0-255 → 0-1
    return img


# ----------------------------------------------------------------------- running
def _evaluate_one(pred_path, gt_path, prob_path, classes, fully_connected, min_overlap):
    import SimpleITK as sitk
    from .. import metrics
    pred, gt = read_labels(pred_path), read_labels(gt_path)
    prob = None
    if prob_path is not None:
        prob = read_probabilities(prob_path)
        if isinstance(prob, sitk.Image) and prob.GetDimension() == gt.GetDimension():
            metrics.check_geometry(prob, gt, f"probabilities {prob_path}", f"GT {gt_path}")
    return metrics.evaluate_case(pred, gt, classes=classes, prob_image=prob, fully_connected=fully_connected,
                                 min_overlap=min_overlap, pred_name=f"PRED {pred_path}", gt_name=f"GT {gt_path}")


def _cases(pred: Path, gt: Path, prob: Optional[Path]):
    """[(case, pred, gt, prob)], [problems]."""
    problems: List[str] = []
    if pred.is_dir() != gt.is_dir():
        raise EvaluationInputError(f"PRED and GT must both be files or both be folders "
                                   f"({pred}: {'folder' if pred.is_dir() else 'file'}, "
                                   f"{gt}: {'folder' if gt.is_dir() else 'file'})")
    if not pred.is_dir():
        if prob is not None and prob.is_dir():
            raise EvaluationInputError(f"--prob {prob} is a folder but PRED and GT are files")
        return [(split_extension(pred, PROB_EXTENSIONS)[0], pred, gt, prob)], problems
    p_cases, g_cases = list_cases(pred, LABEL_EXTENSIONS), list_cases(gt, LABEL_EXTENSIONS)
    q_cases = None
    if prob is not None:
        if not prob.is_dir():
            raise EvaluationInputError(f"--prob {prob} must be a folder when PRED and GT are folders")
        q_cases = list_cases(prob, PROB_EXTENSIONS)
    only_pred = sorted(set(p_cases) - set(g_cases))
    only_gt = sorted(set(g_cases) - set(p_cases))
    if only_pred:
        problems.append(f"{len(only_pred)} file(s) in PRED {pred} have no match in GT {gt}: "
                        + ", ".join(p_cases[s].name for s in only_pred))
    if only_gt:
        problems.append(f"{len(only_gt)} file(s) in GT {gt} have no match in PRED {pred}: "
                        + ", ".join(g_cases[s].name for s in only_gt))
    matched = sorted(set(p_cases) & set(g_cases))
    if q_cases is not None:
        no_prob = [s for s in matched if s not in q_cases]
        if no_prob:
            problems.append(f"{len(no_prob)} case(s) have no probability file in {prob} (AUPR left empty): "
                            + ", ".join(no_prob))
    if not matched:
        problems.append(f"no file names match between PRED {pred} and GT {gt}")
    return [(s, p_cases[s], g_cases[s], q_cases.get(s) if q_cases else None) for s in matched], problems


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.10g}"
    return str(v)


def _atomic_text(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            write(f)


def write_csv(path: Path, results, names: Dict[int, str]) -> None:
    from ..metrics import CASE_METRICS

    def write(f):
        w = csv.writer(f)
        w.writerow(["case", "class", "class_name", *CASE_METRICS])
        for case, r in results:
            for c, row in sorted(r["classes"].items()):
                w.writerow([case, c, names.get(c, ""), *(_fmt(row[m]) for m in CASE_METRICS)])
    _atomic_text(path, write)


def _json_safe(obj):
    import numpy as np
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def print_summary(summary, n_cases: int, names: Dict[int, str], out=sys.stdout) -> None:
    def val(s, unit=""):
        if s["n"] == 0:
            return "—"
        return f"{s['mean']:.4f} ± {s['std']:.4f}{unit} (n={s['n']})"
    rows = [("dice", "Dice"), ("iou", "IoU"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
            ("precision", "precision"), ("hd95", "HD95 mm"), ("assd", "ASSD mm"), ("hausdorff", "Hausdorff mm"),
            ("lesion_f1", "lesion F1"), ("lesion_precision", "lesion precision"), ("lesion_recall", "lesion recall"),
            ("aupr", "AUPR")]
    for c, s in summary.items():
        if c == "mAUC":
            continue
        title = f"class {c}" + (f" ({names[c]})" if c in names else "")
        print(f"{title}: {s['cases']} case(s)", file=out)
        for key, label in rows:
            extra = ""
            if key == "dice":
                extra = f"   pooled {s['pooled_dice']:.4f}"
            elif key == "iou":
                extra = f"   pooled {s['pooled_iou']:.4f}"
            elif key == "lesion_f1":
                extra = (f"   pooled {s['pooled_lesion_f1']:.4f} (detected {s['lesion_tp']} of "
                         f"{s['lesions_reference']} lesions, {s['lesion_fp']} false positive components)")
            elif key == "aupr" and s["aupr_cases"]:
                extra = f"   pooled {s['pooled_aupr']:.4f} over {s['aupr_cases']} case(s)"
            print(f"  {label:<17}{val(s[key])}{extra}", file=out)
    m = summary.get("mAUC", {})
    if m.get("classes"):
        print(f"mAUC (mean pooled AUPR over {m['classes']} class(es)): {m['value']:.4f}", file=out)
    print(f"{n_cases} case(s) evaluated", file=out)


def register(subparsers) -> None:
    s = subparsers.add_parser("evaluate", help="metrics of predicted label maps against reference ones",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("pred", help="predicted label file or folder")
    s.add_argument("gt", help="reference (ground-truth) label file or folder")
    s.add_argument("--prob", help="probability file or folder (for AUPR / mAUC)")
    s.add_argument("--classes", nargs="+", type=arg_type(number, lo=1, integer=True), metavar="VALUE",
                   help="label values to evaluate (default: every non-zero value present)")
    s.add_argument("--csv", help="write per-case, per-class metrics to this CSV file")
    s.add_argument("--json", help="write per-case metrics and the summary to this JSON file")
    s.add_argument("--model", help="name classes after this network's card (no weights are loaded)")
    s.add_argument("--preset", help="task preset of --model, for class names")
    s.add_argument("--face-connected", action="store_true",
                   help="lesions are face-connected components (default: full connectivity, 8 in 2D, 26 in 3D)")
    s.add_argument("--min-overlap", type=arg_type(number, lo=1, integer=True), default=1, metavar="VOXELS",
                   help="predicted voxels a reference lesion needs to count as detected (default 1)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import metrics
    pred, gt = Path(args.pred), Path(args.gt)
    prob = Path(args.prob) if args.prob else None
    for p, what in ((pred, "PRED"), (gt, "GT")) + (((prob, "--prob"),) if prob else ()):
        if not p.exists():
            print(f"lesionseg evaluate: error: {what} {p} does not exist", file=sys.stderr)
            return 2
    inputs = {pred.resolve(), gt.resolve()} | ({prob.resolve()} if prob else set())
    for out in (args.csv, args.json):
        if out and Path(out).resolve() in inputs:
            print(f"lesionseg evaluate: error: output {out} would overwrite an input", file=sys.stderr)
            return 2
    names: Dict[int, str] = {}
    if args.model:
        from .. import models
        names = {int(c["value"]): c["name"] for c in models.preset(args.model, args.preset)["classes"]}
    try:
        cases, problems = _cases(pred, gt, prob)
    except EvaluationInputError as e:
        print(f"lesionseg evaluate: error: {e}", file=sys.stderr)
        return 1
    classes = sorted(set(args.classes)) if args.classes else None
    results = []
    for case, p, g, q in cases:
        try:
            results.append((case, _evaluate_one(p, g, q, classes, not args.face_connected, args.min_overlap)))
        except (EvaluationInputError, metrics.MetricsError) as e:
            problems.append(f"case {case}: {e}")
        except RuntimeError as e:  # SimpleITK's errors on files it read but cannot process
            problems.append(f"case {case} ({p.name}, {g.name}): {str(e).strip().splitlines()[-1]}")
    # the same classes in every case: a class absent from both files of a case is a correct
    # "nothing there" (metrics.absent_class_metrics), not a missing row
    all_classes = sorted({c for _, r in results for c in r["classes"]})
    for _, r in results:
        n_vox = 1
        for d in r["shape"]:
            n_vox *= d
        for c in all_classes:
            r["classes"].setdefault(c, metrics.absent_class_metrics(n_vox))
    if args.csv and results:
        write_csv(Path(args.csv), results, names)
    summary = metrics.summarize([r for _, r in results]) if results else {}
    if args.json:
        payload = {"cases": {case: r for case, r in results}, "summary": summary, "problems": problems,
                   "class_names": names}
        _atomic_text(Path(args.json), lambda f: json.dump(_json_safe(payload), f, indent=2))
    if results:
        print_summary(summary, len(results), names)
        if args.csv:
            print(f"per-case metrics: {args.csv}")
    for msg in problems:
        print(f"lesionseg evaluate: error: {msg}", file=sys.stderr)
    return 1 if problems or not results else 0
