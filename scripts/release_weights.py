"""Turn a training run into shipped weights: evaluate its ``best.pt`` on the held-out
test cases of its split (through the predictor, as ``lesionseg predict`` does), write the
fp16 release file and its model card into ``weights/``, and update ``weights/manifest.json``.

    python scripts/release_weights.py RUN_DIR --name m2snet-polyp \
        --budget "…" --licence "…" [--out weights] [--note "…"]

The data folders, the case rule and the split are read from the run (``data.json``,
``recipe.json``), so the test cases are exactly those the run held out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LesionSegLib import models  # noqa: E402
from LesionSegLib.inference.agreement import describe  # noqa: E402
from LesionSegLib.training.release import (bf16_agreement_record, evaluate_run, hardware_text,  # noqa: E402
                                           write_release)


def _fmt(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _case_rule(data, roots) -> str:
    rules = data["case_rule"] if isinstance(data["case_rule"], list) else [data["case_rule"]]
    return "; ".join(f"{Path(r).name}: {rule.replace(str(Path(r)) + '/', '')}" if len(roots) > 1 else
                     rule.replace(str(Path(r)) + "/", "") for r, rule in zip(roots, rules))


#: the card's row that says whether precision="auto" uses bf16 with the file
AGREEMENT_ROW = "CPU bf16 (`precision=auto`)"


def agreement_line(record) -> str:
    if not record:
        return ("not measured: `auto` stays fp32 with these weights (`scripts/record_bf16_agreement.py` measures it; "
                "`--precision bf16` forces bf16)")
    b = record["bf16"]
    verdict = ("meets the bar (Dice ≥ 0.99, equal lesion counts): `auto` uses bf16 on CPUs with native bf16"
               if b["agrees"] else "below the bar (Dice ≥ 0.99, equal lesion counts): `auto` stays fp32 with these "
               "weights; `--precision bf16` forces it")
    where = f" ({record['bf16_compute']} bf16, {record['cpu']})" if record.get("bf16_compute") else ""
    return (f"bf16 vs fp32 masks on {b['images']} held-out images{where}: Dice {b['dice']:.4f}, worst image "
            f"{b['min_dice']:.4f}, {b['count_mismatches']} with another lesion count; {verdict}")


def seed_scores_text(validation_dice) -> str:
    """``none: 0.544, 0.9: 0.602, …`` from a ``validation_dice`` record (key "0": no rule)."""
    return ", ".join(f"{'none' if s == '0' else s}: {d:.3f}" for s, d in validation_dice.items())


def _output_rule_rows(entry) -> list:
    """The rule a release chose after training (``scripts/tune_release_outputs.py``)."""
    seed = (entry.get("outputs") or {}).get("seed_threshold")
    sel = entry.get("outputs_selection")
    if not sel:
        return []
    tried = seed_scores_text(sel["validation_dice"])
    before = sel.get("heldout_at_release") or {}
    rule = (f"a lesion is kept only where one of its pixels reaches probability {seed:g} (hysteresis; "
            f"`--seed-threshold 0` turns it off)" if seed else "none (no seed threshold helped)")
    return [f"| output rule | {rule}; chosen on the {sel['validation_images']} validation images "
            f"({sel['rule']}; mean validation Dice {tried}); held-out Dice without it: {_fmt(before.get('dice'))} |"]


def card_markdown(entry, heldout, provenance, info) -> str:
    name = models.card(entry["model"])["display_name"]
    hist = provenance.get("training", {})
    metrics = provenance.get("metrics", {})
    multi = "mean_aupr" in heldout.summary
    lines = [f"# {name} — `{entry['preset']}` release weights ({entry['file']})", "",
             info.get("summary", ""), "",
             "| | |", "|---|---|",
             f"| network / preset | {entry['model']} / {entry['preset']} |",
             f"| file | `{entry['file']}`, {entry['size'] / 1e6:.1f} MB, fp16 (loaded as fp32), SHA-256 `{entry['sha256']}` |",
             f"| training data | {info['data']} |",
             f"| split | {info['split']} |",
             f"| start | {info.get('start', 'random initialisation')} |",
             f"| budget | {info['budget']} |",
             f"| hardware | {info['hardware']} |",
             f"| selected checkpoint | epoch {int(hist.get('best_epoch', -1)) + 1} of {info['epochs']} (highest "
             f"validation Dice, {_fmt(metrics.get('val_dice'))}) |",
             f"| data licence | {info['licence']} |",
             f"| {AGREEMENT_ROW} | {agreement_line(entry.get('precision_agreement'))} |",
             *_output_rule_rows(entry), "",
             f"## Held-out test metrics ({heldout.summary['images']} images never trained on or used for selection)", "",
             "Computed with `lesionseg predict`'s path (the predictor at the card's input size, the card's threshold "
             "and output rule) "
             "on the original files. Dice/IoU: mean over images (an image without the lesion scores 1 when nothing is "
             "predicted); \"Dice (lesion images)\": mean over images that have the lesion; HD95 in pixels of the "
             "original image, over images with the lesion.", ""]
    head = "| class | images with lesion | Dice | Dice (lesion images) | IoU | HD95 px |" + (" AUPR |" if multi else "")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for cls, e in heldout.per_class.items():
        lines.append(f"| {cls} | {e['images_with_lesion']}/{e['images']} | {_fmt(e['dice'])} | "
                     f"{_fmt(e['dice_lesion_images'])} | {_fmt(e['iou'])} | {_fmt(e['hd95_px'], 1)} |"
                     + (f" {_fmt(e['aupr'])} |" if multi else ""))
    s = heldout.summary
    lines += ["", f"Summary: Dice {_fmt(s['dice'])}, IoU {_fmt(s['iou'])}, HD95 {_fmt(s['hd95_px'], 1)} px"
              + (f", mean AUPR {_fmt(s['mean_aupr'])}" if multi else "") + ".", ""]
    if info.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in info["notes"]] + [""]
    tune = ([f"python scripts/tune_release_outputs.py {Path(entry['file']).stem}   # the output rule"]
            if entry.get("outputs_selection") else [])
    lines += ["## Reproduce", "", "```bash", info["command"], *tune, "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", required=True, help="release file name without extension")
    ap.add_argument("--out", type=Path, default=ROOT / "weights")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--licence", required=True)
    ap.add_argument("--data-text", help="training data description (default: from the run)")
    ap.add_argument("--start", default=None, help="initialisation (pretrained backbone), for the card")
    ap.add_argument("--summary", default="")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--command", required=True, help="the command that reproduces the run")
    ap.add_argument("--limit", type=int, help="evaluate only the first N held-out images (quick checks)")
    ap.add_argument("--agreement-images", type=int, default=8,
                    help="held-out images on which bf16 is compared with fp32 (emulated on CPUs without "
                         "native bf16: slower, same masks; 0: skip)")
    args = ap.parse_args()

    best = args.run / "best.pt"
    run = evaluate_run(args.run, args.limit, progress=lambda i, n: print(f"  {i}/{n}", file=sys.stderr)
                       if i % 10 == 0 or i == n else None)
    heldout, shipped, pairs, data, roots = run.heldout, run.checkpoint, run.pairs, run.data, run.roots
    provenance = shipped.provenance
    split = data["split"]["source"]
    agreement = None
    if args.agreement_images:  # what lets precision="auto" use bf16 with these weights (runtime.keep_masks)
        agreement = bf16_agreement_record(shipped, pairs, args.agreement_images)
        print(f"bf16 ({agreement['bf16_compute']}) against fp32: {describe(agreement['bf16'])}", file=sys.stderr)
    info = {"data": args.data_text or ", ".join(Path(r).name for r in roots)
            + f" ({data['train_items']} training, {data['val_items']} validation images)",
            "split": f"`weights/splits/{Path(split).name}`: validation {len(data['val_cases'])} cases, "
                     f"test {len(data['split']['held_out_test_cases'])} cases; {_case_rule(data, roots)}",
            "budget": args.budget, "hardware": hardware_text(provenance), "licence": args.licence, "summary": args.summary,
            "start": args.start, "notes": args.note, "command": args.command,
            "epochs": len((args.run / "log.csv").read_text().splitlines()) - 1}
    if len(roots) > 1:  # several folders trained as one set: the score of each on its own
        for root in roots:
            mine = [r for r in heldout.per_image if r["case"].startswith(Path(root).name + "/")]
            if mine:
                info["notes"] = info["notes"] + [
                    f"Held-out {Path(root).name} alone: {len(mine)} images, Dice "
                    f"{sum(r['dice'] for r in mine) / len(mine):.3f}, IoU {sum(r['iou'] for r in mine) / len(mine):.3f}."]
    entry = write_release(best, args.out, name=args.name, heldout=heldout, info=info,
                          precision_agreement=agreement)
    (args.out / f"{args.name}.md").write_text(card_markdown(entry, heldout, provenance, info), encoding="utf-8")
    (args.out / f"{args.name}.heldout.json").write_text(json.dumps(heldout.per_image, indent=0) + "\n")
    print(json.dumps(heldout.summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
