"""``lesionseg demo``: segment a real stroke MRI with the shipped demo weights, then a
real fundus photograph with L-Seg's shipped weights (:mod:`.fundus`).

The main job of LesionSeg, end to end, on data that ships with the repository
(``demo/``): a real DWI volume (ISLES'22, CC BY-SA 4.0, oblique direction) goes through
the Predictor; the label map (input geometry), a Slicer ``.seg.nrrd``, the lesion table
and an overlay PNG are written, and the result is compared with the expert mask.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List

import numpy as np

from .fundus import DEFAULT_CASE, run_fundus

REPO_DEMO = Path(__file__).resolve().parents[3] / "demo"
VOLUME = "data/isles22-sub-strokecase0009-dwi.nii.gz"
REFERENCE = "data/isles22-sub-strokecase0009-lesion.nii.gz"
MODEL = "model/msenet-demo-isles-dwi.pt"


def register(sub) -> None:
    p = sub.add_parser("demo", help="segment the shipped stroke MRI with the demo weights")
    p.add_argument("--demo-dir", default=str(REPO_DEMO), help="folder with data/ and model/ (default: the repository's demo/)")
    p.add_argument("-o", "--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--device", default="auto")
    p.add_argument("--fundus", type=Path, default=None,
                   help="IDRiD folder for the fundus part (default: ../shared/data/fundus-idrid20 beside the repository)")
    p.add_argument("--fundus-case", default=DEFAULT_CASE, help=f"IDRiD image of the fundus part (default: {DEFAULT_CASE})")
    p.add_argument("--no-fundus", action="store_true", help="only the stroke MRI")
    p.set_defaults(func=run)


def _contour(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_png(path, image, predicted: np.ndarray, reference=None, zoom: int = 4) -> List[int]:
    """Axial slices shown in LPS display order (anterior up, patient's left on the right,
    as radiologists read), grey DWI with the prediction in red and the expert outline in
    green, side by side: the slice with the largest expert lesion area (when there is a
    reference) and the slice with the largest predicted area (when it is another one), so
    that both misses and false positives are seen. Returns the LPS slice indices."""
    import SimpleITK as sitk
    from ...training.plot import write_png

    def to_lps(arr):
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.CopyInformation(image)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))

    vol = to_lps(sitk.GetArrayFromImage(image))
    pred = to_lps(predicted) > 0.5
    ref = to_lps(reference) > 0.5 if reference is not None else None
    slices = []
    if ref is not None and ref.any():
        slices.append(int(np.argmax(ref.sum(axis=(1, 2)))))
    if pred.any():
        z = int(np.argmax(pred.sum(axis=(1, 2))))
        if z not in slices:
            slices.append(z)
    if not slices:
        slices.append(vol.shape[0] // 2)
    panels = []
    for z in slices:
        lo, hi = np.percentile(vol[z], (1, 99.5))
        grey = (np.clip((vol[z] - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        rgb[pred[z]] = 0.45 * rgb[pred[z]] + 0.55 * np.array([255, 40, 40])
        rgb = np.kron(rgb, np.ones((zoom, zoom, 1)))
        if ref is not None:
            outline = _contour(np.kron(ref[z], np.ones((zoom, zoom), bool)).astype(bool))
            rgb[outline] = (40, 255, 40)
        panels.append(rgb)
        panels.append(np.full((rgb.shape[0], 2 * zoom, 3), 255.0))  # white gap between panels
    write_png(path, np.concatenate(panels[:-1], axis=1).clip(0, 255).astype(np.uint8))
    return slices


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    from ... import checkpoint
    from ...inference import Predictor
    from ...inference.io import lesions_csv, write_image, write_text
    from ...metrics import dice_iou
    from ...slicer.segnrrd import write_seg_nrrd

    demo, out = Path(args.demo_dir), Path(args.out)
    for rel in (VOLUME, MODEL):
        if not (demo / rel).is_file():
            print(f"lesionseg demo: error: {demo / rel} is missing (run from a LesionSeg checkout, or pass --demo-dir)")
            return 1
    out.mkdir(parents=True, exist_ok=True)
    _, card, prov = checkpoint.read_metadata(demo / MODEL)
    image = sitk.ReadImage(str(demo / VOLUME))
    print(f"Input   {demo / VOLUME}: DWI, {image.GetSize()} voxels of "
          f"{' × '.join(f'{s:g}' for s in image.GetSpacing())} mm, oblique direction")
    print(f"Weights {demo / MODEL}: {card.get('display_name', 'MSE-Net')} ({prov.get('purpose', '')})")
    print(f"        trained on: {prov.get('training_data', 'see the checkpoint provenance')}")

    t0 = time.perf_counter()
    predictor = Predictor(str(demo / MODEL), device=args.device)
    last = [-1]

    def progress(fraction, message):
        pct = int(fraction * 100)
        if pct // 20 != last[0] // 20 or fraction >= 1.0:
            print(f"  {pct:3d}%  {message}", flush=True)
            last[0] = pct

    pred = predictor.predict_volume(image, progress=progress)
    seconds = time.perf_counter() - t0
    cls = pred.classes[0]
    mask = pred.masks[int(cls["value"])]

    labels_path = write_image(pred.labels, out / "dwi-lesion-labels.nii.gz")
    seg_path = write_seg_nrrd(out / "dwi-lesions.seg.nrrd", pred.masks, image, pred.classes,
                              model=predictor.card.get("name"))
    csv_path = write_text(lesions_csv(pred.lesions, VOLUME.split("/")[-1], pred.classes), out / "dwi-lesions.csv")

    reference = None
    summary = {"input": str(demo / VOLUME), "weights": str(demo / MODEL), "device": predictor.device,
               "seconds": round(seconds, 2), "lesions": len(pred.lesions),
               "lesion_volume_ml": round(float(sum(r["volume_mm3"] for r in pred.lesions)) / 1000, 3)}
    if (demo / REFERENCE).is_file():
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(demo / REFERENCE))) > 0
        dice, iou = dice_iou(mask[None], reference[None], spatial_dims=3)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        summary.update({"dice_vs_expert": round(float(np.asarray(dice).reshape(-1)[0]), 4),
                        "iou_vs_expert": round(float(np.asarray(iou).reshape(-1)[0]), 4),
                        "expert_volume_ml": round(float(reference.sum()) * voxel_ml, 3)})
    summary["overlay_slices_lps"] = overlay_png(out / "overlay.png", image, mask, reference)
    write_text(json.dumps(summary, indent=2), out / "summary.json")

    print(f"\nSegmented in {seconds:.1f} s on {predictor.device}: {summary['lesions']} lesion(s), "
          f"{summary['lesion_volume_ml']} ml in total.")
    if reference is not None:
        print(f"Against the expert mask (never shown to the network): Dice {summary['dice_vs_expert']:.3f}, "
              f"IoU {summary['iou_vs_expert']:.3f}; expert lesion volume {summary['expert_volume_ml']} ml.")
        print("  Dice is the overlap 2|A∩B|/(|A|+|B|): 1 is perfect agreement, 0 none.")
    print("\nOutputs (open in 3D Slicer with the input volume):")
    for label, p in (("label map (input geometry)", labels_path), ("segmentation", seg_path),
                     ("lesion table (one row per lesion, LPS mm)", csv_path),
                     ("overlay, red = prediction, green = expert outline", out / "overlay.png"),
                     ("summary", out / "summary.json")):
        print(f"  {label:52s} {p}")
    panels = summary["overlay_slices_lps"]
    if reference is not None:
        print(f"  overlay panels: axial slice {panels[0]} (largest expert lesion)"
              + (f", slice {panels[1]} (largest predicted lesion)" if len(panels) > 1 else "")
              + "; slice numbers count from the patient's feet (LPS)")
    print("\nThese demo weights come from training on synthetic lesions pasted into the lesion-free "
          "slices of this same scan (scripts/make_demo_model.py; see the provenance printed above). They "
          "show the pipeline on real anatomy; they are not a clinical model.")
    if not args.no_fundus:
        run_fundus(args.fundus, args.fundus_case, out, args.device)
    return 0
