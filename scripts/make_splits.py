"""Write the fixed train / validation / test split of the polyp release weights
(``weights/splits/polyp.json``) from the data in ../shared/data.

Cases never straddle two parts: CVC-ClinicDB is split by video sequence, Kvasir-SEG by
image. The ``test`` cases are never trained on nor used for model selection; the release
cards report metrics on them. Re-running this script reproduces the file byte for byte.
(``weights/splits/idrid.json`` is written by hand: 15 images, two for validation, three
for test, listed in the file.)

    python scripts/make_splits.py [--data ../shared/data] [--out weights/splits]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from LesionSegLib.data.folders import folder_pairs

SEED = 20261201


def pick(cases, n, rng):
    order = sorted(cases)
    return sorted(order[i] for i in rng.permutation(len(order))[:n])


def polyp(data: Path) -> dict:
    rng = np.random.default_rng(SEED)
    clinic = sorted({p.case for p in folder_pairs(data / "polyp-clinicdb")}, key=int)
    kvasir = sorted({p.case for p in folder_pairs(data / "polyp-kvasir256")})
    c_test = pick(clinic, 4, rng)
    c_val = pick([c for c in clinic if c not in c_test], 3, rng)
    k_test = pick(kvasir, 90, rng)
    k_val = pick([c for c in kvasir if c not in k_test], 90, rng)
    return {"dataset": "polyp-clinicdb (by video sequence) + polyp-kvasir256 (by image), trained as one set",
            "case_rule": "ClinicDB: sequences.csv; Kvasir: one image = one case; ids prefixed by folder name",
            "val": [f"polyp-clinicdb/{c}" for c in c_val] + [f"polyp-kvasir256/{c}" for c in k_val],
            "test": [f"polyp-clinicdb/{c}" for c in c_test] + [f"polyp-kvasir256/{c}" for c in k_test]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "weights" / "splits")
    ap.add_argument("what", nargs="*", default=["polyp"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.what:
        split = {"polyp": polyp}[name](args.data)
        (args.out / f"{name}.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(split['val'])} validation, {len(split['test'])} test cases")


if __name__ == "__main__":
    main()
