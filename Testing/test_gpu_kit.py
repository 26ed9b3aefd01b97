"""scripts/gpu_kit.py unpack: runs that come back from a lent GPU in parts become run
folders here, refused when a part is missing."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "scripts" / "gpu_kit.py"


def _device_output(tmp_path: Path, name: str, payload: bytes) -> Path:
    """What gpu_train.sh leaves under $OUT for one run: the run folder as a tar in parts
    (split -b, numbered suffixes) and the tar's SHA-256."""
    run = tmp_path / "device" / "runs" / name
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(payload)
    (run / "log.csv").write_text("epoch,val_dice\n0,0.5\n")
    (run / "data.json").write_text(json.dumps({
        "kind": "folder", "root": [".gpu/data/polyp-clinicdb", ".gpu/data/polyp-kvasir256"],
        "split": {"kind": "explicit", "source": ".gpu/data/split.json", "held_out_test_cases": []}}))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    tar = tmp_path / f"{name}.tar"
    with tarfile.open(tar, "w") as t:
        t.add(run, arcname=name)
    (out / f"{name}.tar.sha256").write_text(hashlib.sha256(tar.read_bytes()).hexdigest() + "\n")
    subprocess.run(["split", "-b", "4000", "-d", "-a", "1", str(tar), str(out / f"{name}.tar.part")], check=True)
    return out


def test_parts_from_the_device_become_a_run_folder_with_local_paths(tmp_path):
    payload = bytes(range(256)) * 40   # 10 kB: the tar comes in several parts
    out = _device_output(tmp_path, "m2snet-polyp", payload)
    assert len(list(out.glob("m2snet-polyp.tar.part*"))) >= 3
    dest, data = tmp_path / "runs", tmp_path / "data"
    r = subprocess.run([sys.executable, str(KIT), "unpack", str(out), str(dest), "--data", str(data)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = dest / "m2snet-polyp"
    assert (run / "best.pt").read_bytes() == payload
    record = json.loads((run / "data.json").read_text())
    assert record["root"] == [str(data.resolve() / "polyp-clinicdb"), str(data.resolve() / "polyp-kvasir256")]
    split = ROOT / "weights" / "splits" / "polyp.json"
    assert record["split"]["source"] == split.as_posix()
    # the test cases the device never saw are the ones the split holds back here
    assert record["split"]["held_out_test_cases"] == json.loads(split.read_text())["test"]


def test_a_missing_part_is_refused(tmp_path):
    out = _device_output(tmp_path, "unet-polyp", bytes(range(256)) * 40)
    (out / "unet-polyp.tar.part1").unlink()
    r = subprocess.run([sys.executable, str(KIT), "unpack", str(out), str(tmp_path / "runs")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "SHA-256" in r.stderr
    assert not (tmp_path / "runs" / "unet-polyp").exists()
