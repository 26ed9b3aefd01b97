"""Regenerate the "Shipped weights" section of docs/results.md from weights/manifest.json
and the provenance inside each release file (held-out metrics per class, training history).

    .venv/bin/python scripts/release_table.py            # rewrite the section in place
    .venv/bin/python scripts/release_table.py --print    # print it instead

The learning curves are the runs' own ``curves.png``, copied to
``docs/figures/release-<name>-curves.png`` by ``--curves NAME=RUN_DIR`` when the run is at
hand (runs stay outside the repository).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LesionSegLib import checkpoint, models, releases  # noqa: E402
from release_weights import seed_scores_text  # noqa: E402  (a script beside this one)

BEGIN, END = "<!-- BEGIN shipped weights (scripts/release_table.py) -->", "<!-- END shipped weights -->"
# What the papers report for the same task, and how sure docs/networks.md is of it
PAPER = {
    ("m2snet", "polyp"): "Kvasir mDice ≈ 0.91 (unverified; Dice on the continuous map, ImageNet Res2Net-50, 352²)",
    ("m2snet", "breast-us"): "BUSI Dice 0.792 ± 0.014 (Table VIII, verified)",
    ("lseg", "fundus-dr"): "IDRiD test set AUPR EX ≈ 0.79, HE ≈ 0.64, MA ≈ 0.46, SE ≈ 0.71 (unverified)",
}


def _f(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _baseline_cell(b) -> str:
    if not b:
        return "not trained (see below)"
    s = b["heldout"]
    aupr = f", mean AUPR {_f(s['mean_aupr'])}" if "mean_aupr" in s else ""
    return (f"{models.card(b['model'])['display_name']}: Dice {_f(s['dice'])}, IoU {_f(s['iou'])}{aupr} "
            f"({b['epochs_run']} of {b['epochs_planned']} epochs)")


def _baseline_rule(b) -> str:
    rule = b.get("output_rule")
    if not rule:
        return ""
    tried = seed_scores_text(rule["validation_dice"])
    seed = rule.get("seed_threshold")
    chosen = f"seed threshold {seed:g}" if seed else "no seed threshold"
    return (f" Output rule chosen as the release's was (`scripts/evaluate_baseline.py --seed-grid`): {chosen} "
            f"(mean validation Dice {tried}); held-out Dice without it "
            f"{_f((b.get('heldout_without_rule') or b['heldout']).get('dice'))}.")


def _baseline_details(b, stem: str) -> list:
    s = b["heldout"]
    out = [f"**Baseline** ({models.card(b['model'])['display_name']}, same data and split): {b['budget']}; "
           f"{b['hardware']}. Selected epoch {b['best_epoch']} of {b['epochs_run']} run "
           f"({b['epochs_planned']} planned); validation Dice {_f(b.get('val_dice'))}. Held-out: Dice {_f(s['dice'])}, "
           f"IoU {_f(s['iou'])}, HD95 {_f(s['hd95_px'], 1)} px"
           + (f", mean AUPR {_f(s['mean_aupr'])}" if "mean_aupr" in s else "") + "."
           + _baseline_rule(b)]
    per_class = b.get("heldout_per_class") or {}
    if len(per_class) > 1:
        out += ["", "| baseline class | Dice | IoU | AUPR |", "|---|---:|---:|---:|"]
        out += [f"| {c} | {_f(e['dice'])} | {_f(e['iou'])} | {_f(e.get('aupr'))} |" for c, e in per_class.items()]
    out += [""] + [f"- {n}" for n in b.get("notes") or []]
    out += ["", "```bash", b["command"], "```", ""]
    if (ROOT / "docs" / "figures" / f"baseline-{stem}-curves.png").is_file():
        out += [f"![learning curves of the baseline of {stem}](figures/baseline-{stem}-curves.png)", ""]
    return out


def _output_rule_sentence(entry) -> str:
    seed, sel = (entry.get("outputs") or {}).get("seed_threshold"), entry.get("outputs_selection")
    if not seed or not sel:
        return ""
    before = (sel.get("heldout_at_release") or {}).get("dice")
    return (f" Output rule: a lesion is kept only where a pixel reaches probability {seed:g} (hysteresis against "
            f"false alarms), chosen on the {sel['validation_images']} validation images "
            f"(`scripts/tune_release_outputs.py`); held-out Dice without it {_f(before)}.")


def section(folder: Path) -> str:
    manifest = releases.release_manifest(folder)
    lines = [BEGIN, "", "## Shipped weights (`weights/`, held-out test split)", "",
             "Each file's numbers come from `scripts/release_weights.py`: the run's best checkpoint (highest "
             "validation Dice) segments the **test** cases of its split file, which it never trained on nor was "
             "selected with, through the Predictor (the path of `lesionseg predict`), at the card's size and "
             "threshold and with the file's output rule (chosen afterwards on the validation split by "
             "`scripts/tune_release_outputs.py`), scored on the original images. Full tables per class and per image: the card "
             "(`weights/<name>.md`) and `weights/<name>.heldout.json`.", "",
             "| network / preset | test images | Dice | IoU | HD95 px | mean AUPR | U-Net baseline | paper | budget |",
             "|---|---:|---:|---:|---:|---:|---|---|---|"]
    details = []
    for f in manifest["files"]:
        s = f["metrics"]["heldout"]
        name = models.card(f["model"])["display_name"]
        lines.append(f"| {name} / `{f['preset']}` ([card](../weights/{f['card']})) | {s['images']} | {_f(s['dice'])} | "
                     f"{_f(s['iou'])} | {_f(s['hd95_px'], 1)} | {_f(s.get('mean_aupr'))} | {_baseline_cell(f.get('baseline'))} | "
                     f"{PAPER.get((f['model'], f['preset']), '–')} | {f['training']['budget']} |")
        path = folder / f["file"]
        if not path.is_file():
            continue
        _, _, prov = checkpoint.read_metadata(path)
        # a release rescored with an output rule chosen later: the manifest holds the new table
        per_class = f["metrics"].get("heldout_per_class") or prov.get("heldout_per_class") or {}
        hist = prov.get("training", {})
        details += [f"### {name} / `{f['preset']}`", "",
                    f"Selected epoch {int(hist.get('best_epoch', -1)) + 1} of {f['training'].get('epochs', '?')}; "
                    f"validation Dice {_f((prov.get('metrics') or {}).get('val_dice'))}."
                    + _output_rule_sentence(f), ""]
        if len(per_class) > 1 or any("aupr" in e for e in per_class.values()):
            details += ["| class | images with lesion | Dice | Dice (lesion images) | IoU | HD95 px | AUPR |",
                        "|---|---:|---:|---:|---:|---:|---:|"]
            details += [f"| {c} | {e['images_with_lesion']}/{e['images']} | {_f(e['dice'])} | "
                        f"{_f(e['dice_lesion_images'])} | {_f(e['iou'])} | {_f(e['hd95_px'], 1)} | {_f(e.get('aupr'))} |"
                        for c, e in per_class.items()]
            details.append("")
        stem = Path(f["file"]).stem
        if (ROOT / "docs" / "figures" / f"release-{stem}-curves.png").is_file():
            details += [f"![learning curves of {stem}](figures/release-{stem}-curves.png)", ""]
        if f.get("baseline"):
            details += _baseline_details(f["baseline"], stem)
    missing = [f for f in manifest["files"] if not f.get("baseline")]
    lines += ["", "**U-Net baselines**: `scripts/train_unet_baselines.sh` trains the U-Net with each release's data, "
              "split and budget (its own optimiser and schedule, no early stop); `scripts/evaluate_baseline.py` scores "
              "it on the same held-out cases the same way and records it in the manifest."
              + "".join(f" Not trained for `{Path(f['file']).stem}`: no CPU time was left for it." for f in missing),
              "",
              "**Not shipped**: BSNet `covid-ct` does not fit: its fp16 file would be about 92 MB and the three "
              "releases above use 149 of the 150 MB the repository allows; the polyp, ultrasound and fundus "
              "weights serve more users than a network trained on COVID-SemiSeg's 50 labelled slices. "
              "`scripts/train_covid_cpu.sh ../shared/data/covid-semiseg/train runs/covid-cpu` trains it (BSNet "
              "and its U-Net baseline, shortened CPU runs: docs/training.md); a run made with a split file "
              "(`--split`) becomes a release file in a folder of your own with `scripts/release_weights.py RUN "
              "--name bsnet-covid-ct --out DIR …`, used through `LESIONSEG_RELEASE_WEIGHTS=DIR`. MS-LKSeg `binary-lesion`: not trained (its paper names no data "
              "set; LesionSeg's choice is the polyp release's set, split and budget, so that it compares with "
              "M2SNet `polyp` and their U-Net): `scripts/train_mslkseg_binary_lesion.sh runs` trains it "
              "(CVC-ClinicDB + Kvasir-SEG by `weights/splits/polyp.json`, 42 epochs of 320 images, batch 16, 224²; "
              "about 9–10 min per epoch, validation included, on two threads of the AVX2 EPYC in fp32: some 7 h there), then "
              "`scripts/release_weights.py runs/mslkseg-binary-lesion --name mslkseg-binary-lesion --out DIR …` "
              "makes its release file (fp16, 45 MB: more than the 1 MB left of the repository's 150 MB), used "
              "through `LESIONSEG_RELEASE_WEIGHTS=DIR`. MSE-Net ships only as the demo "
              "(`demo/model/`, one ISLES case, synthetic lesions).", "", *details, END]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true")
    ap.add_argument("--curves", action="append", default=[], metavar="NAME=RUN_DIR")
    args = ap.parse_args()
    for item in args.curves:
        stem, run = item.split("=", 1)
        shutil.copyfile(Path(run) / "curves.png", ROOT / "docs" / "figures" / f"release-{stem}-curves.png")
    text = section(ROOT / "weights")
    if args.print:
        print(text)
        return 0
    doc = ROOT / "docs" / "results.md"
    old = doc.read_text(encoding="utf-8")
    if BEGIN in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:  # first time: after the opening paragraph
        first, rest = old.split("\n## ", 1)
        new = first + text + "\n\n## " + rest
    doc.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
