#!/usr/bin/env python3
"""Train a release network on a lent GPU (the ``device`` tool of this project's machines)
within that tool's limits, and bring the run back: docs/training.md, "On a lent GPU".

The limits decide the shape: a call sends at most 64 MiB (this checkout's release files
alone are 158 MB), the GPU image has no SimpleITK (a 52.8 MB wheel) and a call returns at
most 8 files of 16 MiB. So:

here      python scripts/gpu_kit.py wheels                  # .gpu/whl: SimpleITK, platformdirs (cp312)
          python scripts/gpu_kit.py pack polyp              # .gpu/data: training + validation cases only
          python scripts/gpu_kit.py hold                    # the .pt files out of the checkout
device    call 1, carry [".gpu/whl"]:   bash scripts/gpu_train.sh install
          call 2 at once (the machine stays warm 30 s), carry [".gpu/data"]:
                                        bash scripts/gpu_train.sh polyp 420
          call 3 at once:               bash scripts/gpu_train.sh fetch unet-polyp
here      python scripts/gpu_kit.py restore                 # the .pt files back, SHA-256 checked
          python scripts/gpu_kit.py unpack FILES_AT2 FILES_AT3 runs/gpu-polyp   # run folders

``unpack`` gives one run folder per network (best.pt, log.csv, recipe.json, data.json,
curves.png) with the data paths pointing at ../shared/data again, ready for
``scripts/release_weights.py`` and ``scripts/evaluate_baseline.py``.

What is changed on the way, and why (say so in the card of a release made this way): the
held-out test cases never travel; ClinicDB's PNG frames travel as JPEG (quality 95) to fit,
as Kvasir's images already are; masks travel unchanged.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KIT = ROOT / ".gpu"
HOLD = ROOT.parent / ".lesionseg-gpu-hold"
SHARED = ROOT.parent / "shared" / "data"
#: what a device call may send (the tool's limit), less a margin for what git does not list
TREE_LIMIT = 64 * 2 ** 20 - 2 * 2 ** 20

#: per task: the data folders (under ../shared/data), the preset, the split file, the case
#: rule of the release runs, and the folders whose PNG images travel as JPEG. (breast-us
#: trains from random weights there: the polyp release its CPU run started from cannot
#: travel beside the data.)
TASKS = {
    "polyp": {"model": "m2snet", "preset": "polyp", "folders": ["polyp-clinicdb", "polyp-kvasir256"],
              "split": "weights/splits/polyp.json", "case_regex": None, "jpeg": ["polyp-clinicdb"]},
    "breast-us": {"model": "m2snet", "preset": "breast-us", "folders": ["breast-busi"],
                  "split": "weights/splits/busi.json", "case_regex": "^(.*)$", "jpeg": ["breast-busi"]},
}
WHEELS = ["SimpleITK", "platformdirs"]


def _tree_bytes() -> int:
    """Bytes a device call would send now: tracked files that exist, untracked ones git
    does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode().split("\0")
    return sum((ROOT / p).stat().st_size for p in out if p and (ROOT / p).is_file())


def _dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- here, before
def wheels(args) -> int:
    dest = KIT / "whl"
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for n in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", n)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *WHEELS],
                   check=True)
    print(f"{dest}: {_dir_bytes(dest) / 1e6:.1f} MB")
    return 0


def pack(args) -> int:
    """The task's training and validation pairs, in the folder layout the trainer reads,
    with a split file that lists no test case (those stay here)."""
    from LesionSegLib import models
    from LesionSegLib.data.images import read_image
    from LesionSegLib.data.sources import target_spec
    from LesionSegLib.training.data_prep import folder_items
    task = TASKS[args.task]
    data = Path(args.data)
    split = json.loads((ROOT / task["split"]).read_text(encoding="utf-8"))
    test = set(split.get("test") or [])
    out = KIT / "data"
    if out.exists():
        shutil.rmtree(out)
    spec = target_spec(task["model"], models.preset(task["model"], task["preset"]))
    roots = [data / f for f in task["folders"]]
    items = folder_items(roots, spec, {"case_regex": task["case_regex"]}, {})
    kept = [it for it in items if it.case not in test]
    import SimpleITK as sitk
    for root in roots:
        (out / root.name / "images").mkdir(parents=True)
        (out / root.name / "masks").mkdir(parents=True)
        for table in ("sequences.csv", "cases.csv", "labels.csv"):
            if (root / table).is_file():
                shutil.copy2(root / table, out / root.name / table)
    for it in kept:
        image, mask = Path(it.image), Path(it.mask)
        folder = out / image.parent.parent.name
        if image.parent.parent.name in task["jpeg"] and image.suffix.lower() == ".png":
            arr = read_image(image)
            img = sitk.GetImageFromArray(arr, isVector=arr.ndim == 3)
            sitk.WriteImage(img, str(folder / "images" / (image.stem + ".jpg")), True, 95)
        else:
            shutil.copy2(image, folder / "images" / image.name)
        shutil.copy2(mask, folder / "masks" / mask.name)
    kit_split = {k: v for k, v in split.items() if k != "test"}
    kit_split["note"] = "gpu_kit: the test cases stayed on the CPU machine"
    (out / "split.json").write_text(json.dumps(kit_split, indent=1), encoding="utf-8")
    (out / "task.json").write_text(json.dumps({"task": args.task, **task, "pairs": len(kept),
                                               "test_pairs_left_here": len(items) - len(kept)}, indent=1))
    size = _dir_bytes(out)
    print(f"{out}: {len(kept)} pairs ({len(items) - len(kept)} test pairs stay here), {size / 1e6:.1f} MB")
    return 0


def hold(args) -> int:
    """Move the tracked .pt files out of the checkout, so that a device call can send it."""
    HOLD.mkdir(exist_ok=True)
    moved = []
    for rel in subprocess.run(["git", "ls-files", "*.pt"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.split():
        src = ROOT / rel
        if src.is_file():
            dst = HOLD / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            moved.append(rel)
    tree = _tree_bytes()
    print(f"held {len(moved)} file(s) in {HOLD}; the tree sends {tree / 2 ** 20:.1f} MiB plus what a call carries "
          f"(.gpu/whl {_dir_bytes(KIT / 'whl') / 2 ** 20:.1f} MiB, .gpu/data {_dir_bytes(KIT / 'data') / 2 ** 20:.1f} "
          f"MiB; 64 MiB a call). Put them back with: python scripts/gpu_kit.py restore")
    return 0


def restore(args) -> int:
    """Bring the held .pt files back and check every release file against the manifest."""
    if HOLD.is_dir():
        for src in sorted(p for p in HOLD.rglob("*.pt")):
            dst = ROOT / src.relative_to(HOLD)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
    missing = subprocess.run(["git", "ls-files", "--deleted"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split()
    if missing:
        print(f"still missing from the checkout: {', '.join(missing)}", file=sys.stderr)
        return 1
    from LesionSegLib.releases import release_manifest
    from LesionSegLib.weights import sha256_file
    for entry in release_manifest(ROOT / "weights")["files"]:
        path = ROOT / "weights" / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            print(f"{path}: SHA-256 differs from the manifest", file=sys.stderr)
            return 1
    print("release files back and matching the manifest")
    return 0


# ----------------------------------------------------------------------------- here, after
def unpack(args) -> int:
    """Join the parts device calls returned (``<run>.tar.part*``, from one or more
    folders) and unpack the runs, their data paths pointing at the data here again."""
    from LesionSegLib.training.release import data_roots
    from LesionSegLib.weights import sha256_file
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    groups = {}
    for src in map(Path, args.files_at):
        for part in sorted(src.rglob("*.tar.part*")):
            groups.setdefault(part.name.split(".tar.part")[0], []).append(part)
    if not groups:
        print(f"{', '.join(args.files_at)}: no <run>.tar.part* files", file=sys.stderr)
        return 1
    for name, parts in sorted(groups.items()):
        joined = dest / f"{name}.tar"
        with open(joined, "wb") as f:
            for part in sorted(parts, key=lambda p: int(p.name.rsplit("part", 1)[1])):
                f.write(part.read_bytes())
        sums = next((p for src in map(Path, args.files_at) for p in src.rglob(f"{name}.tar.sha256")), None)
        if sums is None or sums.read_text().split()[0] != sha256_file(joined):
            print(f"{joined}: SHA-256 missing or different from the device's (a part lost?)", file=sys.stderr)
            return 1
        with tarfile.open(joined) as tar:
            tar.extractall(dest, filter="data")
        joined.unlink()
    data = Path(args.data).resolve()
    split_file = ROOT / TASKS[args.task]["split"]
    test_cases = json.loads(split_file.read_text(encoding="utf-8")).get("test", [])
    for record in dest.glob("*/data.json"):
        d = json.loads(record.read_text(encoding="utf-8"))
        here = [str(data / r.name) for r in data_roots(d)]
        d["root"] = here if isinstance(d["root"], list) else here[0]
        d.setdefault("split", {})["source"] = split_file.as_posix()
        if "held_out_test_cases" in d["split"]:  # the kit's copy listed none: they stayed here
            d["split"]["held_out_test_cases"] = test_cases
        d["gpu_kit"] = "trained on a lent GPU from .gpu/data (scripts/gpu_kit.py); paths rewritten to this machine"
        record.write_text(json.dumps(d, indent=1), encoding="utf-8")
    for src in map(Path, args.files_at):
        for extra in src.rglob("*"):
            if extra.is_file() and ".tar." not in extra.name:
                shutil.copy2(extra, dest / extra.name)
    print(f"runs in {dest}: {', '.join(sorted(p.parent.name for p in dest.glob('*/best.pt')))}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    sub.add_parser("wheels", help="download the wheels the GPU image lacks into .gpu/whl").set_defaults(fn=wheels)
    p = sub.add_parser("pack", help="the task's training and validation data into .gpu/data")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--data", default=str(SHARED))
    p.set_defaults(fn=pack)
    sub.add_parser("hold", help="move the tracked .pt files out of the checkout").set_defaults(fn=hold)
    sub.add_parser("restore", help="bring them back, checked against the manifest").set_defaults(fn=restore)
    p = sub.add_parser("unpack", help="join the returned parts into run folders")
    p.add_argument("files_at", nargs="+", help="the folders the device calls' files landed in")
    p.add_argument("dest")
    p.add_argument("--task", choices=sorted(TASKS), default="polyp")
    p.add_argument("--data", default=str(SHARED))
    p.set_defaults(fn=unpack)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
