"""From a training run to shipped weights: held-out evaluation through the predictor
(the path ``lesionseg predict`` takes), the fp16 release file, its model card and the
manifest of ``weights/``.

The held-out metrics are computed on the ``test`` cases of the run's split file, which
the run never trained on nor selected its checkpoint with. They are computed the way a
user gets predictions: :class:`LesionSegLib.inference.Predictor` on the original image
files, at their own resolution, with the card's threshold. Binary and softmax networks
are scored per image (Dice, IoU, HD95 in pixels for photographs); L-Seg's four
overlapping classes are scored per class from their own probability maps, with the area
under the precision–recall curve pooled over all test pixels of a class (IDRiD's
protocol, L-Seg's mAUC being its mean over the classes).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import metrics as M
from .. import models
from ..data.folders import ImagePair
from ..data.images import read_image, read_mask
from ..fileio import atomic_path

PER_IMAGE = ("dice", "iou", "hd95")


@dataclass
class HeldOut:
    """Held-out scores: per image and class, per-class summaries, and the overall line."""
    per_image: List[Dict[str, Any]]
    per_class: Dict[str, Dict[str, float]]
    summary: Dict[str, float]


def heldout_pairs(items: Sequence[ImagePair], split, part: str = "test") -> List[ImagePair]:
    """The pairs of the ``test`` (or ``val``) cases of ``split`` (a dict or JSON file)."""
    if not isinstance(split, dict):
        split = json.loads(Path(split).read_text(encoding="utf-8"))
    cases = set(split.get(part) or [])
    return [it for it in items if it.case in cases]


def data_roots(data: Dict[str, Any]) -> List[Path]:
    """The data folders of a run's ``data`` record (one folder, or a list when several
    trained as one set)."""
    root = data["root"]
    return [Path(r) for r in (root if isinstance(root, list) else [root])]


def split_pairs(name: str, preset: str, data: Dict[str, Any], recipe: Dict[str, Any],
                part: str = "test") -> Tuple[List[ImagePair], List[Path]]:
    """(pairs of the ``part`` cases, data folders) of a run's split, from its ``data`` and
    ``recipe`` records (a run folder's ``data.json``/``recipe.json``, or a release file's
    provenance): the same folders, case rule and split file the run used."""
    from ..data.sources import target_spec
    from .data_prep import folder_items
    spec = target_spec(name, models.preset(name, preset))
    roots = data_roots(data)
    items = folder_items(roots, spec, recipe, {})
    return heldout_pairs(items, data["split"]["source"], part), roots


def _nanmean(values) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def evaluate_heldout(predictor, pairs: Sequence[ImagePair], progress=None, on_image=None) -> HeldOut:
    """Segment every held-out image with ``predictor`` and score it against its mask.
    ``on_image(pair, image, prediction, masks, reference)`` sees each image's result
    (class value → boolean mask), e.g. to draw it."""
    classes = predictor.classes
    multi = models.Outputs.of(predictor.card).multi_label
    names = [c["name"] for c in classes]
    rows: List[Dict[str, Any]] = []
    pooled = {c["value"]: [] for c in classes}
    for n, pair in enumerate(pairs):
        image = read_image(pair.image)
        pred = predictor.predict_image(image, return_probabilities=multi)
        if isinstance(pair.mask, tuple):
            gt = {c["value"]: read_mask(m).astype(bool) for c, m in zip(classes, pair.mask)}
        else:
            lab = read_mask(pair.mask, classes, len(classes))
            gt = {c["value"]: lab == c["value"] for c in classes}
        if multi:
            masks = {c["value"]: pred.probabilities[i] >= predictor.threshold for i, c in enumerate(classes)}
            for i, c in enumerate(classes):
                pooled[c["value"]].append(M.score_counts(pred.probabilities[i], gt[c["value"]]))
        else:
            masks = {c["value"]: pred.labels == c["value"] for c in classes}
        if on_image:
            on_image(pair, image, pred, masks, gt)
        case = M.evaluate_case(masks, gt, classes=[c["value"] for c in classes])
        for c in classes:
            m = case["classes"][c["value"]]
            rows.append({"image": pair.image.name, "case": pair.case, "class": c["name"],
                         "reference_pixels": int(gt[c["value"]].sum()), **{k: m.get(k) for k in PER_IMAGE}})
        if progress:
            progress(n + 1, len(pairs))
    per_class: Dict[str, Dict[str, float]] = {}
    for c, name in zip(classes, names):
        mine = [r for r in rows if r["class"] == name]
        with_lesion = [r for r in mine if r["reference_pixels"] > 0]
        entry = {"images": len(mine), "images_with_lesion": len(with_lesion),
                 # images without the lesion score 1 when nothing is predicted (metrics.py's
                 # rule); the lesion-bearing mean is the stricter figure and is reported too
                 "dice": _nanmean(r["dice"] for r in mine), "iou": _nanmean(r["iou"] for r in mine),
                 "dice_lesion_images": _nanmean(r["dice"] for r in with_lesion),
                 "hd95_px": _nanmean(r["hd95"] for r in with_lesion)}
        if multi:
            counts = pooled[c["value"]]
            entry["aupr"] = M.aupr_from_counts(np.concatenate([v for v, _, _ in counts]),
                                               np.concatenate([p for _, p, _ in counts]),
                                               np.concatenate([q for _, _, q in counts]))
        per_class[name] = entry
    summary = {"images": len(pairs),
               "dice": _nanmean(e["dice"] for e in per_class.values()),
               "iou": _nanmean(e["iou"] for e in per_class.values()),
               "hd95_px": _nanmean(e["hd95_px"] for e in per_class.values())}
    if multi:
        summary["mean_aupr"] = _nanmean(e["aupr"] for e in per_class.values())
    return HeldOut(rows, per_class, summary)


@dataclass
class RunEvaluation:
    """A training run's ``best.pt`` scored on its held-out test cases (:func:`evaluate_run`)."""
    heldout: HeldOut
    checkpoint: Any                  # the Checkpoint, weights rounded to fp16 as shipped
    pairs: List[ImagePair]
    data: Dict[str, Any]             # the run's data.json
    roots: List[Path]


def evaluate_run(run_dir, limit: Optional[int] = None, progress=None) -> RunEvaluation:
    """Score ``run_dir/best.pt`` on the test cases of the run's own split: the data
    folders, case rule and split file come from the run (``data.json``, ``recipe.json``),
    so the test cases are exactly those it held out. The numbers are those of the file
    users get: the weights rounded to fp16 (the release format), computed in fp32 (the
    reference of every lower precision)."""
    from ..checkpoint import load
    from ..inference import Predictor
    run_dir = Path(run_dir)
    data = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    recipe = json.loads((run_dir / "recipe.json").read_text(encoding="utf-8"))
    shipped = load(run_dir / "best.pt")
    shipped.model.half().float()
    predictor = Predictor(shipped, device="cpu", precision="fp32")
    pairs, roots = split_pairs(predictor.name, predictor.preset, data, recipe)
    pairs = pairs[:limit]
    return RunEvaluation(evaluate_heldout(predictor, pairs, progress=progress), shipped, pairs, data, roots)


def hardware_text(provenance: Dict[str, Any]) -> str:
    """The machine of a run, for cards: this CPU (the run is scored where it trained), the
    features that decide precision, and the run's torch threads."""
    from ..inference.runtime import cpu_features, cpu_name
    feats = cpu_features()
    threads = int(provenance.get("training", {}).get("torch_threads", 1))
    return (f"{cpu_name()} ({', '.join(k for k, v in feats.items() if v and k != 'native_bf16') or 'no AVX2'}), "
            f"{threads} torch thread(s), CPU only")


def add_baseline(out_dir, release_file: str, baseline: Dict[str, Any]) -> Dict[str, Any]:
    """Record a baseline run (e.g. the U-Net with the same data, split and budget) beside
    the release ``release_file`` in ``<out_dir>/manifest.json``; returns the entry."""
    from ..releases import MANIFEST_NAME, release_manifest
    manifest = release_manifest(out_dir)
    entry = next((f for f in manifest["files"] if f["file"] == release_file), None)
    if entry is None:
        raise ValueError(f"{release_file}: not in {Path(out_dir) / MANIFEST_NAME}")
    entry["baseline"] = baseline
    write_manifest(out_dir, manifest)
    return entry


def write_manifest(out_dir, manifest: Dict[str, Any]) -> None:
    from ..releases import MANIFEST_NAME
    with atomic_path(Path(out_dir) / MANIFEST_NAME) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------- bf16 evidence
def bf16_agreement_record(source, pairs: Sequence[ImagePair], images: Optional[int] = 8) -> Dict[str, Any]:
    """The record that lets ``precision="auto"`` use bf16 with a release file
    (:func:`..inference.runtime.keep_masks`): bf16 masks against fp32 masks on held-out
    ``pairs``, every ``len(pairs) // images``-th (all of them when ``images`` is None),
    through the Predictor with the file's own threshold and output rule.

    On a CPU without native bf16 the same autocast runs emulated: the operands are rounded
    to bf16 alike and only the accumulation order differs, so the masks agree as they do on
    a CPU that has it (docs/performance.md compares the two on the polyp release). The
    record says which it was (``bf16_compute``)."""
    from ..inference import agreement as q
    from ..inference.runtime import cpu_features, cpu_name
    some = list(pairs) if not images else list(pairs)[:: max(1, len(pairs) // images)][:images]
    rep = q.agreement(source, [read_image(p.image) for p in some], ["bf16"])["bf16"]
    return {"bf16": {k: rep[k] for k in ("dice", "min_dice", "count_mismatches", "images", "agrees")},
            "cpu": cpu_name(), "bf16_compute": "native" if cpu_features()["native_bf16"] else "emulated",
            "images": "held-out test images"}


# ------------------------------------------------------------------------- release files
def write_release(checkpoint_path, out_dir, *, name: str, heldout: HeldOut, info: Dict[str, Any],
                  precision_agreement: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``<out_dir>/<name>.pt`` (the checkpoint with fp16 tensors) and add or replace
    its entry in ``<out_dir>/manifest.json``; returns the entry. ``info``: what the card
    and manifest say about training (data, split, budget, hardware, licence).
    ``precision_agreement``: lower precisions against fp32 on held-out images
    (:func:`..inference.quantization.agreement`); the Predictor's ``auto`` reads it
    (:func:`..inference.runtime.keep_masks`)."""
    from .. import checkpoint as ckpt
    from ..releases import MANIFEST_FORMAT, release_manifest
    from ..weights import sha256_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ck = ckpt.load(checkpoint_path)
    model = ck.model.half()  # half precision halves the file; loading casts back to fp32
    provenance = dict(ck.provenance, heldout=heldout.summary, heldout_per_class=heldout.per_class,
                      release=info)
    if precision_agreement:
        provenance["precision_agreement"] = precision_agreement
    target = out_dir / f"{name}.pt"
    ckpt.save(target, model, card=ck.card, config=ck.config, provenance=provenance)
    entry = {"file": target.name, "model": ck.name, "preset": ck.card["preset"]["name"],
             "sha256": sha256_file(target), "size": target.stat().st_size, "dtype": "float16",
             "card": f"{name}.md", "date": _dt.date.today().isoformat(),
             "metrics": {"heldout": heldout.summary}, "training": info}
    if precision_agreement:
        entry["precision_agreement"] = precision_agreement
    manifest = release_manifest(out_dir)
    old = next((f for f in manifest["files"] if f["file"] == entry["file"]), {})
    if "baseline" in old:  # a separate run: still the comparison for new weights of the same task
        entry["baseline"] = old["baseline"]
    manifest = {"format": MANIFEST_FORMAT, "version": 1,
                "files": [f for f in manifest["files"] if f["file"] != entry["file"]] + [entry]}
    manifest["files"].sort(key=lambda f: f["file"])
    write_manifest(out_dir, manifest)
    return entry
