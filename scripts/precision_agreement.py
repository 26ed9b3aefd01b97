#!/usr/bin/env python
"""Do bf16 and int8 give the same lesions as fp32? For each trained network and a folder
of its real images, segment the images with the Predictor on the CPU in fp32 and in each
lower precision and report Dice of the masks and lesion counts
(:func:`LesionSegLib.inference.quantization.agreement`); the table of docs/performance.md.

    .venv/bin/python scripts/precision_agreement.py \\
        demo/model/msenet-demo-isles-dwi.pt=../shared/data/isles22-strokecase0009 \\
        /work/runs/m2snet-polyp/best.pt=../shared/data/polyp-kvasir256 [--json out.json]

Each argument is CHECKPOINT=DATA: DATA is an image/mask folder (its images) or a folder of
volumes (label volumes are left out). Of its files, sorted by name, every 4th (at most
``--images``) is segmented for the comparison and the others (at most 32) calibrate int8,
so int8 is not judged on its own calibration images. A folder with a single volume (the
ISLES case) serves both, which the output says. int8 graphs go to a temporary cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def split_files(data: Path, n_eval: int):
    from LesionSegLib.data.images import is_image_file
    from LesionSegLib.data.volumes import _is_label_name, is_volume_file, volume_stem
    root = data
    try:
        from LesionSegLib.data.folders import detect_layout
        root = detect_layout(data).images
    except Exception:  # noqa: BLE001 - a plain folder
        pass
    files = sorted(p for p in root.iterdir() if p.is_file() and (
        is_image_file(p) or (is_volume_file(p) and not _is_label_name(volume_stem(p)))))
    if "isles" in data.name.lower():  # the ISLES case: the DWI is what MSE-Net's preset reads
        files = [p for p in files if "dwi" in p.name.lower()] or files
    if len(files) == 1:
        return files, files, True
    ev = files[3::4][:n_eval]
    cal = [p for p in files if p not in ev]
    return ev, cal, False


def read(path: Path):
    from LesionSegLib.data.images import is_image_file, read_image
    if is_image_file(path):
        return read_image(path)
    import SimpleITK as sitk
    return sitk.ReadImage(str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="CHECKPOINT=DATA")
    ap.add_argument("--precisions", default="bf16,int8")
    ap.add_argument("--images", type=int, default=24, help="images compared per network (default 24)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the reports here")
    args = ap.parse_args(argv)
    import torch
    from LesionSegLib.checkpoint import load
    from LesionSegLib.inference import agreement as q
    from LesionSegLib.inference import runtime
    torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    feats = runtime.cpu_features()
    print(f"CPU: {runtime.cpu_name()}; " + ", ".join(f"{k} {v}" for k, v in feats.items()), file=sys.stderr)
    results = []
    for pair in args.pairs:
        ck_path, data = pair.split("=", 1)
        ev, cal, same = split_files(Path(data), args.images)
        ck = load(ck_path)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            rep = q.agreement(ck, [read(p) for p in ev], precisions, calibration=[str(p) for p in cal], cache=cache)
        results.append({"checkpoint": ck_path, "model": ck.name, "data": data, "evaluated": len(ev),
                        "calibration": len(cal), "calibrated_on_evaluated": same, "report": rep,
                        "seconds": time.perf_counter() - t0})
        print(f"{ck.name} ({ck_path}) on {data}: " + "; ".join(
            f"{p} {q.describe(rep[p])}" for p in precisions), file=sys.stderr)
    print("| network | checkpoint | images | precision | Dice vs fp32 | worst image | lesion count differs | "
          "agrees (≥ 0.99, same counts) | time vs fp32 |")
    print("|---|---|---:|---|---:|---:|---:|---|---:|")
    for r in results:
        for p in precisions:
            x = r["report"][p]
            bf16_note = " (emulated)" if p == "bf16" and not feats["native_bf16"] else ""
            print(f"| {r['model']} | {Path(r['checkpoint']).name} | {x['images']}"
                  f"{' (= calibration)' if r['calibrated_on_evaluated'] and p == 'int8' else ''} | {p}{bf16_note} | "
                  f"{x['dice']:.4f} | {x['min_dice']:.4f} | {x['count_mismatches']} of {x['images']} | "
                  f"{'yes' if x['agrees'] else 'no'} | {r['report']['fp32']['seconds'] / x['seconds']:.2f}× |")
    if args.json:
        from LesionSegLib.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps({"cpu": runtime.cpu_name(), "features": feats, "results": results},
                                                indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
