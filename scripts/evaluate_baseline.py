"""Score a baseline run (the U-Net with the same data, split and budget as a release) on
the release's held-out test cases, the way the release was scored, and record it beside
the release in ``weights/manifest.json`` (``scripts/release_table.py`` shows it).

    python scripts/evaluate_baseline.py RUN_DIR --against lseg-fundus-dr.pt \
        --budget "…" --command "…" [--out weights]

No weights are written: the baseline is evidence about the release, not a release.
``--seed-grid`` gives the baseline the chance the release had when its output rule was
chosen (``scripts/tune_release_outputs.py``): the seed threshold is picked on the run's
validation cases by the same rule, and the held-out scores are given with it (and without).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from LesionSegLib.training.release import add_baseline, evaluate_heldout, evaluate_run, hardware_text, split_pairs  # noqa: E402,E501


def _with_seed_rule(run, recipe, args) -> dict:
    """The seed threshold chosen on the run's validation cases as a release's is, and the
    held-out scores with it (those without it move to ``heldout_without_rule``)."""
    from LesionSegLib.inference import Predictor
    from LesionSegLib.releases import with_release_outputs
    from tune_release_outputs import choose, validation_scores
    ck = run.checkpoint
    val, _ = split_pairs(ck.name, ck.card["preset"]["name"], run.data, recipe, "val")
    scores = validation_scores(Predictor(ck, device="cpu", precision="fp32"), val,
                               [float(g) for g in args.seed_grid.split(",")])
    seed = choose(scores, args.within)
    out = {"output_rule": {"seed_threshold": seed or None, "validation_images": len(val),
                           "validation_dice": {f"{k:g}": round(v, 4) for k, v in scores.items()}},
           "heldout_without_rule": run.heldout.summary}
    if seed:
        ck.card = with_release_outputs(ck.card, {"outputs": {"seed_threshold": seed}})
        ruled = evaluate_heldout(Predictor(ck, device="cpu", precision="fp32"), run.pairs)
        out.update(heldout=ruled.summary, heldout_per_class=ruled.per_class)
    print(f"seed threshold {seed:g} (validation Dice {scores[seed]:.4f}; none {scores[0.0]:.4f})", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--against", required=True, help="the release file in the manifest, e.g. lseg-fundus-dr.pt")
    ap.add_argument("--out", type=Path, default=ROOT / "weights")
    ap.add_argument("--budget", required=True, help="what the baseline was trained with (text)")
    ap.add_argument("--command", required=True, help="the command that reproduces the run")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--limit", type=int, help="evaluate only the first N held-out images (quick checks)")
    ap.add_argument("--seed-grid", help="seed thresholds to choose from on the validation cases, e.g. "
                                        "0.9,0.95,0.96,0.97,0.98,0.99 (as the release's output rule)")
    ap.add_argument("--within", type=float, default=0.005)
    args = ap.parse_args()

    run = evaluate_run(args.run, args.limit, progress=lambda i, n: print(f"  {i}/{n}", file=sys.stderr)
                       if i % 10 == 0 or i == n else None)
    prov = run.checkpoint.provenance
    training = prov.get("training", {})
    with open(args.run / "log.csv", newline="", encoding="utf-8") as f:
        history = list(csv.DictReader(f))
    recipe = json.loads((args.run / "recipe.json").read_text(encoding="utf-8"))
    baseline = {
        "model": run.checkpoint.name, "preset": run.checkpoint.card["preset"]["name"],
        "heldout": run.heldout.summary, "heldout_per_class": run.heldout.per_class,
        "epochs_run": len(history), "epochs_planned": int(recipe["epochs"]),
        "best_epoch": int(training.get("best_epoch", -1)) + 1,
        "val_dice": (prov.get("metrics") or {}).get("val_dice"),
        "budget": args.budget, "command": args.command, "notes": args.note,
        "hardware": f"{hardware_text(prov)}, {training.get('amp') or 'fp32'}",
    }
    if args.seed_grid:
        baseline.update(_with_seed_rule(run, recipe, args))
    add_baseline(args.out, args.against, baseline)
    curves = args.run / "curves.png"
    if curves.is_file():
        shutil.copyfile(curves, ROOT / "docs" / "figures" / f"baseline-{Path(args.against).stem}-curves.png")
    print(json.dumps(run.heldout.summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
