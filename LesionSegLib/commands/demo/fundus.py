"""The fundus part of ``lesionseg demo``: L-Seg's shipped ``fundus-dr`` weights on a real
IDRiD photograph that they never trained on nor were selected with (a ``test`` case of
``weights/splits/idrid.json``), scored per lesion class against the expert masks.

IDRiD (CC BY 4.0) is read in place from its folder (``../shared/data/fundus-idrid20``
beside the repository, or ``--fundus DIR``); nothing of it is copied. Without the folder
or without the shipped weights this part says why and is skipped.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

DEFAULT_CASE = "IDRiD_11"  # the held-out test image with the most exudates (no soft exudates)
# Lesion colours of the overlay, in the order of L-Seg's classes where present
COLOURS = {"EX": (255, 220, 0), "HE": (255, 40, 40), "MA": (60, 255, 60), "SE": (0, 200, 255)}
SHRINK = 4  # the 4288 x 2848 photograph is drawn at a quarter of its size


def default_folder() -> Path:
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "fundus-idrid20"


def _shrink_image(rgb: np.ndarray) -> np.ndarray:
    h, w = (rgb.shape[0] // SHRINK) * SHRINK, (rgb.shape[1] // SHRINK) * SHRINK
    return rgb[:h, :w].reshape(h // SHRINK, SHRINK, w // SHRINK, SHRINK, -1).mean(axis=(1, 3))


def _shrink_mask(mask: np.ndarray) -> np.ndarray:
    # any pixel of a block: microaneurysms are a few pixels wide and must stay visible
    h, w = (mask.shape[0] // SHRINK) * SHRINK, (mask.shape[1] // SHRINK) * SHRINK
    return mask[:h, :w].reshape(h // SHRINK, SHRINK, w // SHRINK, SHRINK).any(axis=(1, 3))


def overlay(image: np.ndarray, expert: Dict[str, np.ndarray], predicted: Dict[str, np.ndarray]) -> np.ndarray:
    """Two panels side by side: the photograph with the expert's lesions (left) and with
    the network's (right), one colour per class (:data:`COLOURS`)."""
    base = _shrink_image(np.asarray(image, dtype=np.float32)[..., :3])
    panels = []
    for masks in (expert, predicted):
        rgb = base.copy()
        for cls, colour in COLOURS.items():
            if cls in masks:
                m = _shrink_mask(masks[cls])
                rgb[m] = 0.25 * rgb[m] + 0.75 * np.array(colour, np.float32)
        panels.append(rgb)
    gap = np.full((base.shape[0], 8, 3), 255.0, np.float32)
    return np.concatenate([panels[0], gap, panels[1]], axis=1).clip(0, 255).astype(np.uint8)


def _number(v):
    """JSON has no NaN: an undefined score (class absent from the image) is null."""
    return (None if math.isnan(v) else round(v, 4)) if isinstance(v, float) else v


def run_fundus(folder: Optional[Path], case: str, out: Path, device: str) -> Optional[dict]:
    """Segment ``case`` of the IDRiD folder; returns the summary, or None when skipped."""
    from ... import models, releases
    from ...data.sources import target_spec
    from ...data.folders import class_mask_pairs
    from ...inference import Predictor
    from ...inference.io import write_text
    from ...training.data_prep import class_suffixes
    from ...training.plot import write_png
    from ...training.release import evaluate_heldout, heldout_pairs

    print("\n--- Fundus photograph: L-Seg, four diabetic-retinopathy lesion classes ---")
    entry = releases.find_released("lseg", "fundus-dr")
    if entry is None:
        print("Skipped: this checkout has no shipped L-Seg fundus-dr weights (weights/manifest.json).")
        return None
    folder = Path(folder) if folder else default_folder()
    if not folder.is_dir():
        print(f"Skipped: the IDRiD folder {folder} is not on this machine. IDRiD (CC BY 4.0) is not "
              f"copied into the repository; pass --fundus DIR (images/ and masks/<case>_EX.png …).")
        return None
    spec = target_spec("lseg", models.preset("lseg", "fundus-dr"))
    suffixes = class_suffixes(spec)  # EX, HE, MA, SE: the mask files' and the overlay's names
    pairs = [p for p in class_mask_pairs(folder, suffixes, case_regex="^(.*)$") if p.case == case]
    if not pairs:
        print(f"Skipped: {folder} has no image {case} with its four lesion masks.")
        return None
    split = releases.release_dir() / "splits" / "idrid.json"
    if split.is_file() and heldout_pairs(pairs, split):
        print(f"Input   {pairs[0].image}: {case}, IDRiD (CC BY 4.0), held out from training and model selection")
    else:
        print(f"Input   {pairs[0].image}: {case}, IDRiD (CC BY 4.0). Note: not a held-out test case of "
              f"weights/splits/idrid.json; the scores below may be optimistic.")
    print(f"Weights {entry.path} (shipped; card {Path(entry.path).with_suffix('.md').name})")

    t0 = time.perf_counter()
    predictor = Predictor(entry.path, device=device)
    drawn = {}
    short = {c["value"]: s for c, s in zip(spec.classes, suffixes)}
    short_of_name = {c["name"]: s for c, s in zip(spec.classes, suffixes)}

    def keep(pair, image, prediction, masks, reference):
        drawn["picture"] = overlay(image, {short[v]: m for v, m in reference.items()},
                                   {short[v]: m for v, m in masks.items()})

    scores = evaluate_heldout(predictor, pairs, on_image=keep)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    picture = write_png(out / "fundus-overlay.png", drawn["picture"])

    per_class = {short_of_name[name]: {"expert_pixels": next(r["reference_pixels"] for r in scores.per_image
                                                              if r["class"] == name),
                                       "dice": e["dice"], "iou": e["iou"], "aupr": e.get("aupr")}
                 for name, e in scores.per_class.items()}
    summary = {"case": case, "input": str(pairs[0].image), "weights": entry.path, "seconds": round(seconds, 2),
               "classes": {k: {m: _number(v) for m, v in d.items()} for k, d in per_class.items()},
               "mean_aupr": round(scores.summary["mean_aupr"], 4)}
    write_text(json.dumps(summary, indent=2), out / "fundus-summary.json")

    print(f"\nSegmented in {seconds:.1f} s on {predictor.device}. Against the expert masks:")
    print(f"  {'class':6s} {'expert px':>10s} {'Dice':>6s} {'AUPR':>6s}")
    for cls, d in per_class.items():
        if d["expert_pixels"] == 0:
            print(f"  {cls:6s} {0:10d}  none in this image: Dice and AUPR undefined")
            continue
        print(f"  {cls:6s} {d['expert_pixels']:10d} {d['dice']:6.3f} {d['aupr']:6.3f}")
    scored = sum(d["expert_pixels"] > 0 for d in per_class.values())
    print(f"  mean AUPR over the {scored} classes present: {summary['mean_aupr']:.3f} (the measure of L-Seg's paper)")
    print(f"  {'overlay (left expert, right network; EX yellow, HE red, MA green, SE blue)':52s} {picture}")
    print(f"  {'summary':52s} {out / 'fundus-summary.json'}")
    return summary
