"""Choose a shipped file's seed threshold (hysteresis against false alarms) on its
validation split, then score the held-out test split with it and rewrite the card.

    python scripts/tune_release_outputs.py m2snet-breast-us [--grid 0.9,0.95,…] [--within 0.005]

The validation images segment once (fp32, the file's own threshold); every candidate seed
threshold is applied to the same probability maps with the Predictor's own rule
(``postprocess.remove_unseeded_lesions``), "none" included. The choice is the *least*
aggressive candidate whose mean validation Dice is within ``--within`` of the best (a
difference that small on a few dozen images is noise; a lower seed misses fewer faint
lesions). The rule goes into ``weights/manifest.json`` beside the file (the file itself is
committed once and never rewritten); the held-out test cases are then segmented through
the Predictor with the rule, as ``lesionseg predict`` does, and the card, the per-image
JSON and the manifest's metrics are written again. The scores the file had at release
(without the rule) stay in its provenance and are quoted in the card.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from LesionSegLib import metrics as M  # noqa: E402
from LesionSegLib import releases  # noqa: E402
from LesionSegLib.checkpoint import load  # noqa: E402
from LesionSegLib.data.images import read_image, read_mask  # noqa: E402
from LesionSegLib.inference import Predictor  # noqa: E402
from LesionSegLib.inference.postprocess import remove_unseeded_lesions  # noqa: E402
from LesionSegLib.training.release import write_manifest, evaluate_heldout, split_pairs  # noqa: E402
from release_weights import card_markdown  # noqa: E402


def validation_scores(predictor: Predictor, pairs, grid) -> dict:
    """Mean validation Dice for no rule (key 0.0) and each seed threshold of ``grid``."""
    if predictor.multi_label or len(predictor.classes) != 1:
        raise SystemExit("seed thresholds are chosen here for single-class networks only")
    value = predictor.classes[0]["value"]
    scores = {s: [] for s in [0.0, *grid]}
    for n, pair in enumerate(pairs):
        pred = predictor.predict_image(read_image(pair.image), seed_threshold=0, return_probabilities=True)
        gt = read_mask(pair.mask) > 0
        for s in scores:
            m = pred.labels == value
            if s:
                remove_unseeded_lesions(m, pred.probabilities[0] >= s)
            scores[s].append(M.evaluate_case({1: m}, {1: gt}, classes=[1])["classes"][1]["dice"])
        if (n + 1) % 10 == 0:
            print(f"  validation {n + 1}/{len(pairs)}", file=sys.stderr)
    return {s: float(np.mean(v)) for s, v in scores.items()}


def choose(scores: dict, within: float) -> float:
    best = max(scores.values())
    return min(s for s, d in scores.items() if d >= best - within)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="release file name without extension, e.g. m2snet-breast-us")
    ap.add_argument("--grid", default="0.9,0.95,0.96,0.97,0.98,0.99")
    ap.add_argument("--within", type=float, default=0.005)
    args = ap.parse_args()
    folder = releases.release_dir()
    path = folder / f"{args.name}.pt"
    manifest = releases.release_manifest(folder)
    entry = next(f for f in manifest["files"] if f["file"] == path.name)
    raw = load(path)
    prov = raw.provenance
    preset = entry["preset"]
    val, _ = split_pairs(raw.name, preset, prov["data"], prov["recipe"], "val")
    test, _ = split_pairs(raw.name, preset, prov["data"], prov["recipe"], "test")
    grid = [float(g) for g in args.grid.split(",")]
    scores = validation_scores(Predictor(raw, device="cpu", precision="fp32"), val, grid)
    seed = choose(scores, args.within)
    print("validation Dice by seed threshold: " + ", ".join(f"{s:g}: {d:.4f}" for s, d in scores.items()),
          file=sys.stderr)
    print(f"chosen: {seed:g}", file=sys.stderr)

    entry["outputs"] = {"seed_threshold": seed} if seed else {}
    entry["outputs_selection"] = {
        "rule": f"least aggressive seed threshold within {args.within} of the best mean validation Dice",
        "validation_images": len(val), "validation_dice": {f"{s:g}": round(d, 4) for s, d in scores.items()},
        "heldout_at_release": prov.get("heldout")}
    if not entry["outputs"]:
        del entry["outputs"]
    write_manifest(folder, manifest)

    heldout = evaluate_heldout(Predictor(str(path), device="cpu", precision="fp32"), test,
                               progress=lambda i, n: print(f"  test {i}/{n}", file=sys.stderr) if i % 20 == 0 else None)
    entry["metrics"] = {"heldout": heldout.summary, "heldout_per_class": heldout.per_class}
    write_manifest(folder, manifest)
    (folder / f"{args.name}.md").write_text(card_markdown(entry, heldout, prov, entry["training"]), encoding="utf-8")
    (folder / f"{args.name}.heldout.json").write_text(json.dumps(heldout.per_image, indent=0) + "\n")
    print(json.dumps(heldout.summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
