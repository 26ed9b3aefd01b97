#!/usr/bin/env python3
"""The runs behind docs/results.md: each network trained on real data (or, for L-Seg,
synthetic fundus images), cross-validated by case, evaluated on the held-out images with
``LesionSegLib.metrics`` and compared with the U-Net baseline trained the same way.

One command per experiment (each run folder ``OUT/<experiment>/<network>/fold<k>`` keeps
its checkpoints, log.csv, curves.png and ``result.json`` with the per-image metrics; the
experiment's ``results.json`` and ``results.md`` gather all runs present)::

    python scripts/results.py covid   [--models unet,bsnet,m2snet,mslkseg] [--folds 3]
    python scripts/results.py polyp   [--models unet,m2snet,mslkseg]
    python scripts/results.py stroke  [--models unet,msenet]
    python scripts/results.py fundus  [--models unet,lseg]
    python scripts/results.py table   OUT/covid          # rebuild results.md from the runs

Shortened CPU budget (the defaults; no GPU and no ImageNet backbone files here): every
network runs a fixed number of epochs of ``--epoch-length`` samples at a reduced size,
with its own recipe's optimiser, learning rate, loss and augmentation, but a constant
learning rate (the recipes' schedules span 50–300 full epochs) and no multi-scale
training. ``--threads`` torch threads (1 by default, so that two experiments can run
side by side on two cores). What every run used is written into results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

#: MS-LKSeg's DyConv temperature anneals 30 → 1 over 10 epochs of 150 in its recipe; these
#: runs are shorter than 10 epochs, so the annealing is compressed into the first half of the
#: run (the network is validated and used at 1, and must have trained there)
#: per experiment: data, networks with their task preset, split, size, and the fixed
#: number of epochs each network gets (chosen so that every run takes a few minutes on
#: one 2.5 GHz core; the U-Net baseline gets the same number of epochs as the network
#: it is compared with: the same images, splits and number of optimiser steps)
EXPERIMENTS: Dict[str, Dict[str, Any]] = {
    "covid": {
        "data": SHARED / "covid-semiseg" / "train",
        "presets": {"unet": "covid-ct", "bsnet": "covid-ct", "m2snet": "covid-ct", "mslkseg": "binary-lesion"},
        "folds": 3, "size": [192, 192], "epochs": 8, "epoch_length": 24, "batch_size": 4,
        "description": "COVID-SemiSeg train (50 axial CT slices, binary infection masks), case-level "
                       "3-fold cross-validation (cases: blocks of 10 consecutive slice numbers)",
        "overrides": {"mslkseg": {"dyconv_temperature": {"start": 30.0, "end": 1.0, "epochs": 4}}},
    },
    "polyp": {
        "data": SHARED / "cvc-clinicdb-20",
        "presets": {"unet": "polyp", "m2snet": "polyp", "mslkseg": "binary-lesion"},
        "folds": 2, "size": [192, 256], "epochs": 6, "epoch_length": 24, "batch_size": 4,
        "description": "CVC-ClinicDB (20 consecutive colonoscopy frames of one sequence), 2-fold "
                       "cross-validation by blocks of 10 consecutive frames",
        "overrides": {"mslkseg": {"dyconv_temperature": {"start": 30.0, "end": 1.0, "epochs": 3}}},
    },
    "stroke": {
        "presets": {"unet": "stroke-dwi", "msenet": "isles-dwi"},
        "folds": 2, "size": [112, 112], "epochs": 12, "epoch_length": 32, "batch_size": 8,
        "description": "ISLES'22 sub-strokecase0009 DWI (one case, 73 slices at 2 mm): functional check "
                       "only. The volume is cut into two slabs (slices 0-44 and 45-72; the lesion spans "
                       "27-57, but 512 of its 523 voxels are in the lower slab, 11 in the upper); each "
                       "slab is validated by the network trained on the other (2 folds). Adjacent anatomy "
                       "and one patient: not a generalisation result",
    },
    "fundus": {
        "presets": {"unet": "polyp", "lseg": "fundus-dr"},
        "folds": None, "val_fraction": 0.25, "size": [192, 288], "epochs": 10, "epoch_length": 24,
        "batch_size": 2,
        "description": "40 synthetic fundus-like images (288x192) with the four DR lesion types at known "
                       "places (scripts/results.py synthetic_fundus), 30 train / 10 validation",
        # U-Net takes the four lesion types as a 5-way softmax (background + 4); L-Seg's own
        # HED solver (SGD 1e-6, batch 1 x 10 accumulated) needs thousands of steps from a
        # pretrained VGG-16, so both get Adam here, at U-Net's and a 10x lower rate
        "overrides": {"unet": {"model_config": {"num_classes": 5}},
                      "lseg": {"optimizer": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0},
                               "accumulate": 1}},
    },
}
DEFAULT_MODELS = {"covid": "unet,bsnet,m2snet,mslkseg", "polyp": "unet,m2snet,mslkseg",
                  "stroke": "unet,msenet", "fundus": "unet,lseg"}
ISLES = SHARED / "isles22-strokecase0009"
SLAB_SPLIT = 45


# ---------------------------------------------------------------------------- data
def synthetic_fundus(out: Path, n: int = 40, size=(192, 288), seed: int = 0) -> Path:
    """``n`` fundus-like RGB images with hard exudates (1), haemorrhages (2),
    microaneurysms (3) and soft exudates (4) at random places, masks as grey PNG class
    maps (``out/images``, ``out/masks``). Each image is its own case."""
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    h, w = size
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    for i in range(n):
        cy, cx, r = h / 2, w / 2, 0.47 * h * rng.uniform(0.95, 1.05)
        fov = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
        shade = np.clip(1.0 - 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)), 0, 1)
        img = np.zeros((h, w, 3), np.float32)
        base = np.array([190, 80, 35], np.float32) * rng.uniform(0.8, 1.1)
        img[...] = base * shade[..., None]
        img += rng.normal(0, 6, (h, w, 3))
        # vessels: dark smooth random walks from the optic disc
        od = (cy + rng.uniform(-10, 10), cx + (1 if rng.random() < 0.5 else -1) * 0.55 * r)
        vessels = np.zeros((h, w), np.float32)
        for _ in range(8):
            y, x, ang = od[0], od[1], rng.uniform(0, 2 * np.pi)
            for _ in range(160):
                ang += rng.normal(0, 0.12)
                y, x = y + np.sin(ang), x + np.cos(ang)
                if 0 <= int(y) < h and 0 <= int(x) < w:
                    vessels[int(y), int(x)] = 1
        vessels = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(vessels), 0.8)) > 0.08
        img[vessels] *= np.array([0.55, 0.35, 0.4])
        disc = ((yy - od[0]) ** 2 + (xx - od[1]) ** 2) <= (0.09 * h) ** 2
        img[disc] = img[disc] * 0.3 + np.array([240, 200, 150]) * 0.7
        label = np.zeros((h, w), np.uint8)
        inside = np.argwhere(fov & ~disc & ~vessels)
        # class: (count range, radius range px, colour, edge softness)
        kinds = {1: ((3, 9), (1.5, 4.0), (250, 230, 110), 0.3),   # EX: bright yellow, sharp
                 2: ((1, 5), (2.5, 6.0), (110, 15, 10), 0.5),     # HE: dark red blots
                 3: ((3, 10), (0.8, 1.4), (120, 20, 15), 0.2),    # MA: tiny dark red dots
                 4: ((0, 3), (4.0, 8.0), (235, 215, 190), 2.0)}   # SE: pale, fuzzy
        for value, ((lo, hi), (rlo, rhi), colour, soft) in kinds.items():
            for _ in range(rng.integers(lo, hi + 1)):
                py, px = inside[rng.integers(len(inside))]
                rad = rng.uniform(rlo, rhi)
                ey, ex = rad * rng.uniform(0.7, 1.3), rad * rng.uniform(0.7, 1.3)
                d = np.sqrt(((yy - py) / ey) ** 2 + ((xx - px) / ex) ** 2)
                alpha = 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / (0.08 * soft + 0.05), 50.0)))
                free = (label == 0)
                a = (alpha * free)[..., None]
                img = img * (1 - a) + np.array(colour, np.float32) * a
                label[(alpha > 0.5) & free & fov] = value
        img[~fov] = rng.normal(3, 1.5, (int((~fov).sum()), 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(img, isVector=True), str(out / "images" / f"fundus{i:03d}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(out / "masks" / f"fundus{i:03d}.png"))
    (out / "cases.csv").write_text("file,case\n" + "".join(f"fundus{i:03d},fundus{i:03d}\n" for i in range(n)))
    return out


def stroke_slabs():
    """The ISLES'22 DWI as two in-memory cases (lower and upper slab), LPS-oriented."""
    import SimpleITK as sitk
    from LesionSegLib.data.volumes import canonical
    img = canonical(sitk.ReadImage(str(ISLES / "sub-strokecase0009_ses-0001_dwi.nii.gz"), sitk.sitkFloat32))
    msk = canonical(sitk.ReadImage(str(ISLES / "sub-strokecase0009_ses-0001_msk.nii.gz")))
    n = img.GetSize()[2]
    cases = []
    for name, lo, hi in (("lower", 0, SLAB_SPLIT), ("upper", SLAB_SPLIT, n)):
        cases.append({"image": img[:, :, lo:hi], "label": msk[:, :, lo:hi] > 0, "case": f"slab-{name}"})
    return cases


# ---------------------------------------------------------------------------- runs
def recipe_for(exp: Dict[str, Any], name: str, fold: Optional[int]) -> Dict[str, Any]:
    r: Dict[str, Any] = {
        "epochs": exp["epochs"], "epoch_length": exp["epoch_length"], "batch_size": exp["batch_size"],
        "size": exp["size"], "multiscale": None, "schedule": {"name": "constant"}, "early_stopping": None,
        "checkpoint_every_steps": 0, "log_every_steps": 1000,
    }
    if exp.get("folds"):
        r.update({"folds": exp["folds"], "fold": fold})
    else:
        r["val_fraction"] = exp.get("val_fraction", 0.2)
    r.update(json.loads(json.dumps(exp.get("overrides", {}).get(name, {}))))
    return r


def evaluate_run(name: str, run: Path, data, kind: str) -> List[Dict[str, Any]]:
    """Predict the run's validation images with its best checkpoint and score them."""
    import SimpleITK as sitk
    from LesionSegLib.inference import Predictor
    from LesionSegLib.metrics import aupr, evaluate_case
    pred = Predictor(str(run / "best.pt"), device="cpu")
    classes = [c["value"] for c in pred.card["classes"]]
    desc = json.loads((run / "data.json").read_text())
    cases = []
    pooled_p: Dict[int, list] = {c: [] for c in classes}
    pooled_g: Dict[int, list] = {c: [] for c in classes}
    if kind == "folder":
        from LesionSegLib.data import folders, images
        pairs = {p.image.name: p for p in folders.folder_pairs(data)}
        for fname in desc["files"]["val"]:
            p = pairs[fname]
            img = images.read_image(p.image)
            gt = images.read_mask(p.mask, pred.card["classes"], n_classes=len(classes))
            out = pred.predict_image(img, return_probabilities=True)
            probs = {c: out.probabilities[i] for i, c in enumerate(classes)}
            masks = {c: out.masks[c] for c in classes}
            gt_masks = {c: gt == c for c in classes}
            res = evaluate_case(masks, gt_masks, classes=classes, prob_image=probs, spacing=(1.0, 1.0))
            res["case"] = fname
            cases.append(res)
            for c in classes:
                pooled_p[c].append(probs[c].ravel())
                pooled_g[c].append(gt_masks[c].ravel())
    else:  # in-memory stroke slabs
        for case in data:
            if case["case"] not in desc["val_cases"]:
                continue
            out = pred.predict_volume(case["image"], return_probabilities=True)
            gt = sitk.Cast(case["label"], sitk.sitkUInt8)
            gt.CopyInformation(out.labels)
            res = evaluate_case(out.labels, gt, classes=[1], prob_image={1: out.probabilities[0]})
            res["case"] = case["case"]
            cases.append(res)
            pooled_p[1].append(out.probabilities[0].ravel())
            pooled_g[1].append(sitk.GetArrayViewFromImage(gt).ravel() > 0)
    # AUPR over all held-out pixels together (the IDRiD / L-Seg way), per class
    pooled = {c: aupr(np.concatenate(pooled_p[c]), np.concatenate(pooled_g[c])) for c in classes if pooled_p[c]}
    return cases, pooled


def run_experiment(exp_name: str, args) -> Path:
    import torch
    from LesionSegLib.training import train
    torch.set_num_threads(args.threads)
    exp = EXPERIMENTS[exp_name]
    out = Path(args.out) / exp_name
    out.mkdir(parents=True, exist_ok=True)
    if exp_name == "fundus":
        data, kind = synthetic_fundus(out / "data"), "folder"
    elif exp_name == "stroke":
        data, kind = stroke_slabs(), "memory"
    else:
        data, kind = exp["data"], "folder"
        if not Path(data).is_dir():
            raise SystemExit(f"results: {data} is not there (../shared/data beside the repository)")
    models_ = [m.strip() for m in (args.models or DEFAULT_MODELS[exp_name]).split(",") if m.strip()]
    folds = list(range(args.folds or exp["folds"])) if exp.get("folds") else [None]
    if args.folds:
        exp = dict(exp, folds=args.folds)
    if args.epochs:
        exp = dict(exp, epochs=args.epochs)
    meta = {"experiment": exp_name, "description": exp["description"], "machine": _machine(args.threads)}
    (out / "experiment.json").write_text(json.dumps(meta, indent=1))
    for name in models_:
        for fold in folds:
            key = f"{name}/fold{fold if fold is not None else 0}"
            run = out / key
            if run.exists():
                shutil.rmtree(run)  # a result is one complete run: start again rather than mix
            recipe = recipe_for(exp, name, fold)
            print(f"[{exp_name}] {key}: training ({recipe['epochs']} epochs of {recipe['epoch_length']} samples)",
                  flush=True)
            start = time.time()
            r = train(name, data, run, preset=exp["presets"][name], recipe_overrides=recipe, device="cpu",
                      seed=args.seed)
            seconds = time.time() - start
            cases, pooled_aupr = evaluate_run(name, run, data, kind)
            best = max(r.history, key=lambda h: h.get("val_dice", -1))
            # one file per run, so that experiments split over several processes do not collide
            (run / "result.json").write_text(json.dumps({
                "model": name, "fold": fold, "preset": exp["presets"][name], "recipe_overrides": recipe,
                "train_seconds": seconds, "epochs_done": len(r.history), "best_epoch": best.get("epoch"),
                "best_val_dice": best.get("val_dice"), "threads": args.threads,
                "pooled_aupr": {str(c): float(v) for c, v in pooled_aupr.items()},
                "cases": _jsonable(cases)}, indent=1))
            print(f"[{exp_name}] {key}: {seconds / 60:.1f} min, best val Dice {best.get('val_dice'):.3f}", flush=True)
    write_table(out)
    return out


def _jsonable(cases):
    out = []
    for c in cases:
        c = dict(c)
        c["classes"] = {str(k): {m: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else None)
                                 for m, v in vals.items() if not m.startswith("_")}
                        for k, vals in c["classes"].items()}
        out.append({k: v for k, v in c.items() if k in ("case", "classes", "spacing")})
    return out


def _machine(threads: int) -> Dict[str, Any]:
    from LesionSegLib.commands.benchmark import machine_description
    m = machine_description()
    m["threads_used"] = threads
    return m


# ---------------------------------------------------------------------------- tables
def _mean_sd(vals) -> Dict[str, float]:
    """``{"mean", "std", "n"}`` of the finite values, as ``metrics.summarize`` reports metrics."""
    v = np.array([x for x in vals if x is not None and not math.isnan(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else math.nan, "std": float(v.std()) if v.size else math.nan,
            "n": int(v.size)}


def summarise(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per network, over all held-out images of all folds (``metrics.summarize``): mean ±
    sd of Dice, IoU, HD95 (pixels, or mm for volumes) and pooled Dice; plus per class the
    AUPR pooled over each run's held-out pixels (mean ± sd over folds) and their mean (mAUC)."""
    from LesionSegLib.metrics import summarize
    by_model: Dict[str, Dict[str, Any]] = {}
    for run in results["runs"].values():
        m = by_model.setdefault(run["model"], {"runs": [], "cases": []})
        m["runs"].append(run)
        m["cases"].extend(run["cases"])
    table = {}
    for name, m in by_model.items():
        per_class = summarize(m["cases"])
        classes = sorted((c for c in per_class if c != "mAUC"), key=int)
        row: Dict[str, Any] = {"folds": len(m["runs"]), "images": len(m["cases"]),
                               "train_minutes": sum(r["train_seconds"] for r in m["runs"]) / 60,
                               "epochs": m["runs"][0]["recipe_overrides"]["epochs"], "classes": {}}
        for c in classes:
            row["classes"][c] = dict(per_class[c], pooled_aupr=_mean_sd(
                run.get("pooled_aupr", {}).get(c) for run in m["runs"]))
        auprs = [row["classes"][c]["pooled_aupr"]["mean"] for c in classes]
        row["mAUC"] = float(np.nanmean(auprs)) if auprs else math.nan
        table[name] = row
    return table


def _fmt(stat: Dict[str, float], digits=3) -> str:
    return "–" if stat["n"] == 0 else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def write_table(out: Path) -> str:
    results = json.loads((out / "experiment.json").read_text())
    results["runs"] = {str(p.parent.relative_to(out)): json.loads(p.read_text())
                       for p in sorted(out.glob("*/fold*/result.json"))}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = summarise(results)
    order = sorted(table, key=lambda n: (n != "unet", n))
    lines = [f"### {results['experiment']}", "", results["description"] + ".", ""]
    multi = any(len(r["classes"]) > 1 for r in table.values())
    if multi:
        lines += ["| network | class | AUPR (all held-out pixels) | AUPR (mean ± sd over images) | Dice | "
                  "pooled Dice |", "|---|---|---:|---:|---:|---:|"]
        for n in order:
            for c, v in table[n]["classes"].items():
                lines.append(f"| {n} | {c} | {v['pooled_aupr']['mean']:.3f} | {_fmt(v['aupr'])} | {_fmt(v['dice'])} | "
                             f"{v['pooled_dice']:.3f} |")
            lines.append(f"| {n} | **mAUC** | **{table[n]['mAUC']:.3f}** | | | |")
    else:
        unit = "mm" if results["experiment"] == "stroke" else "px"
        lines += [f"| network | folds | images | epochs | train min | Dice | IoU | HD95 ({unit}) | pooled Dice | "
                  "AUPR (pooled) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in order:
            r = table[n]
            (c, v), = r["classes"].items()
            lines.append(f"| {n} | {r['folds']} | {r['images']} | {r['epochs']} | {r['train_minutes']:.1f} | "
                         f"{_fmt(v['dice'])} | {_fmt(v['iou'])} | {_fmt(v['hd95'], 1)} | {v['pooled_dice']:.3f} | "
                         f"{_fmt(v['pooled_aupr'])} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS) + ["table"])
    ap.add_argument("folder", nargs="?", help="for 'table': an experiment's output folder")
    ap.add_argument("--models", help="comma-separated networks (default: the experiment's)")
    ap.add_argument("--folds", type=int, help="cross-validation folds (default: the experiment's)")
    ap.add_argument("--epochs", type=int, help="epochs per run (default: the experiment's)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.experiment == "table":
        if not args.folder:
            ap.error("table needs the experiment's output folder")
        write_table(Path(args.folder))
        return 0
    run_experiment(args.experiment, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
