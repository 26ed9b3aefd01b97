"""Measure a shipped file's bf16-vs-fp32 agreement on its held-out test images and record
it in ``weights/manifest.json`` beside the file, where ``precision="auto"`` reads it
(:func:`LesionSegLib.inference.runtime.keep_masks`), and in the card's bf16 row.

    python scripts/record_bf16_agreement.py m2snet-breast-us [--images 8 | --all] [--threads 2]

For a release made where the agreement was not measured. The test cases come from the
file's own provenance (data folders, case rule, split), as ``scripts/tune_release_outputs.py``
finds its validation cases; the masks are the Predictor's with the file's threshold and
output rule. The release file itself is not touched (it is committed once), nor are the
card's other lines. On a CPU without native bf16 the bf16 runs emulated (about ten times
slower than fp32; the record says so).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from LesionSegLib import releases  # noqa: E402
from LesionSegLib.checkpoint import load  # noqa: E402
from LesionSegLib.fileio import atomic_write_text  # noqa: E402
from LesionSegLib.inference.agreement import describe  # noqa: E402
from LesionSegLib.training.release import (bf16_agreement_record, data_roots, split_pairs,  # noqa: E402
                                           write_manifest)
from release_weights import AGREEMENT_ROW, agreement_line  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="release file name without extension, e.g. m2snet-breast-us")
    ap.add_argument("--images", type=int, default=8, help="held-out images compared, spread evenly (default 8)")
    ap.add_argument("--all", action="store_true", help="compare on every held-out test image")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    folder = releases.release_dir()
    path = folder / f"{args.name}.pt"
    manifest = releases.release_manifest(folder)
    entry = next((f for f in manifest["files"] if f["file"] == path.name), None)
    if entry is None or not path.is_file():
        known = ", ".join(Path(f["file"]).stem for f in manifest["files"]) or "none"
        raise SystemExit(f"record_bf16_agreement: no release file {path.name} in {folder} (there: {known})")
    prov = load(path).provenance
    roots = data_roots(prov["data"])
    missing = [r for r in roots if not r.is_dir()]
    if missing:
        raise SystemExit(f"record_bf16_agreement: {path.name} was trained from {', '.join(map(str, roots))}; "
                         f"not on this machine: {', '.join(map(str, missing))}")
    test, _ = split_pairs(entry["model"], entry["preset"], prov["data"], prov["recipe"], "test")
    if not test:
        raise SystemExit(f"record_bf16_agreement: none of {path.name}'s test cases found in {', '.join(map(str, roots))}")
    record = bf16_agreement_record(str(path), test, None if args.all else args.images)
    print(f"{args.name}: bf16 ({record['bf16_compute']}, {record['cpu']}) against fp32: "
          f"{describe(record['bf16'])}", file=sys.stderr)
    entry["precision_agreement"] = record
    write_manifest(folder, manifest)
    card = folder / entry["card"]
    if card.is_file():  # only the card's bf16 row changes: its other lines may hold notes added since
        row = f"| {AGREEMENT_ROW} | {agreement_line(record)} |"
        text = re.sub(rf"^\| {re.escape(AGREEMENT_ROW)} \|.*$", lambda _: row, card.read_text(encoding="utf-8"),
                      count=1, flags=re.M)
        atomic_write_text(card, text if row in text else text.rstrip("\n") + "\n\n" + row + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
