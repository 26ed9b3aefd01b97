#!/usr/bin/env python3
"""Train the weights that ``make demo`` ships: MSE-Net on synthetic stroke lesions.

What this does, and why (the demo says the same to its user):

* There is one real stroke case here (ISLES'22 sub-strokecase0009, DWI, CC BY-SA 4.0).
  Training on it and showing the result on it would prove nothing, so the network never
  sees that case's lesion: it is trained on *synthetic* lesions — bright, blurred
  ellipsoids, with DWI contrast like acute infarcts — pasted into the two slabs of the
  scan that hold no real lesion (the slices below and above it).
* The demo then segments the whole real volume and reports Dice against the real
  lesion, which the network has never seen. It is a functional demonstration of the
  pipeline on real anatomy, not a clinical model.

Usage (CPU, a few minutes)::

    python scripts/make_demo_model.py --data ../shared/data/isles22-strokecase0009 --out demo/model
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the demo network: MSE-Net with halved widths, so the checkpoint stays well under 20 MB
DEMO_CONFIG = {"widths": [16, 32, 64, 128], "asff_channels": 64}
DWI = "sub-strokecase0009_ses-0001_dwi.nii.gz"
MASK = "sub-strokecase0009_ses-0001_msk.nii.gz"


def _brain(volume: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk
    m = volume > np.percentile(volume[volume > 0], 40)
    img = sitk.GetImageFromArray(m.astype(np.uint8))
    img = sitk.BinaryErode(sitk.BinaryMorphologicalClosing(img, [2, 2, 1]), [3, 3, 1])
    return sitk.GetArrayFromImage(img).astype(bool)


def synthetic_case(slab: np.ndarray, rng: np.random.Generator, spacing=(2.0, 2.0, 2.0)):
    """Paste 1–3 synthetic infarct-like lesions into a lesion-free slab (z, y, x)."""
    brain = _brain(slab)
    vol = slab.astype(np.float32).copy()
    label = np.zeros(slab.shape, np.uint8)
    candidates = np.argwhere(brain)
    if len(candidates) == 0:
        return vol, label
    z, y, x = np.meshgrid(*(np.arange(n) for n in slab.shape), indexing="ij")
    for _ in range(rng.integers(1, 4)):
        cz, cy, cx = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(2.5, 9.0, 3)                       # mm
        radii[0] = min(radii[0], 6.0)
        r = np.sqrt(((z - cz) * spacing[2] / radii[0]) ** 2 + ((y - cy) * spacing[1] / radii[1]) ** 2
                    + ((x - cx) * spacing[0] / radii[2]) ** 2)
        # smooth edge; restricted to brain tissue as infarcts are
        profile = 1.0 / (1.0 + np.exp((r - 1.0) / 0.15)) * brain
        gain = rng.uniform(0.6, 1.3)                            # lesion ≈ 1.6–2.3 × tissue
        texture = rng.normal(1.0, 0.12, slab.shape).astype(np.float32)
        local = np.maximum(vol, np.percentile(slab[brain], 50))
        vol = vol + profile * gain * local * texture
        label[(profile > 0.5)] = 1
    return vol, label


def main(argv=None) -> int:
    import SimpleITK as sitk
    from LesionSegLib import checkpoint
    from LesionSegLib.training import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isles22-strokecase0009"))
    ap.add_argument("--out", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--cases", type=int, default=24, help="synthetic cases per slab")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--epoch-length", type=int, default=320, help="slices per epoch")
    ap.add_argument("--time-limit", type=float, default=2400, help="stop training after this many seconds")
    ap.add_argument("--size", type=int, default=112,
                    help="training (and so inference) slice size; 112 is the DWI's native matrix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data = Path(args.data)
    dwi = sitk.ReadImage(str(data / DWI))
    vol = sitk.GetArrayFromImage(dwi).astype(np.float32)
    real = sitk.GetArrayFromImage(sitk.ReadImage(str(data / MASK))) > 0
    lesion_z = np.flatnonzero(real.any(axis=(1, 2)))
    below, above = vol[:lesion_z.min() - 1], vol[lesion_z.max() + 2:]   # one-slice margin
    print(f"real lesion on slices {lesion_z.min()}–{lesion_z.max()}; training slabs: "
          f"{below.shape[0]} slices below, {above.shape[0]} above (the real lesion is never seen)")

    rng = np.random.default_rng(args.seed)
    spacing = dwi.GetSpacing()
    cases = []
    for i in range(args.cases):
        for slab_name, slab in (("below", below), ("above", above)):
            image, label = synthetic_case(slab, rng, spacing)
            cases.append({"image": image, "label": label, "spacing": spacing, "case": f"synthetic-{slab_name}-{i:02d}"})

    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="lesionseg-demo-train-"))
    try:
        result = train("msenet", cases, work / "run", preset="isles-dwi",
                       recipe_overrides={"epochs": args.epochs, "model_config": DEMO_CONFIG,
                                         "epoch_length": args.epoch_length, "early_stopping": None,
                                         "size": [args.size, args.size],
                                         "checkpoint_every_steps": 0, "time_limit_s": args.time_limit},
                       seed=args.seed, verbose=True)
        ck = checkpoint.load(result.best_checkpoint)
        prov = dict(ck.provenance)
        prov.update({
            "training_data": (f"{len(cases)} synthetic cases: infarct-like DWI hyperintensities pasted into the "
                              "lesion-free slabs of ISLES'22 sub-strokecase0009 (CC BY-SA 4.0; ISLES'22 challenge, "
                              "Hernandez Petzsche et al., Sci Data 2022). The real lesion was never shown."),
            "purpose": "make demo: functional demonstration on real anatomy, not a clinical model",
            "script": "scripts/make_demo_model.py",
            "seed": args.seed,
        })
        out.mkdir(parents=True, exist_ok=True)
        path = checkpoint.save(out / "msenet-demo-isles-dwi.pt", ck.model, config=ck.config,
                               card=ck.card, provenance=prov)
        (out / "training-history.json").write_text(json.dumps(result.history, indent=1, default=str))
        for extra in ("curves.png", "log.csv"):
            src = Path(result.best_checkpoint).parent / extra
            if src.exists():
                shutil.copy(src, out / extra)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
