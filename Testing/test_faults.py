"""Faults while writing: kill -9, a full disk, two processes writing one folder, and the
temporary files a killed writer leaves. Nothing truncated or half-written may ever be at
a destination, the exit status must say when something failed, and LesionSeg removes
its own stale temporary files (``.NAME.XXXXXXXX.tmp…``) and nothing else."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib import checkpoint, models
from LesionSegLib.fileio import WriteError, atomic_write_text, clean_stale_temporaries, is_temporary_name
from LesionSegLib.inference.io import write_image
from helpers import threshold_unet

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def lesionseg(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "LesionSegLib", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def volume(seed=0, shape=(6, 40, 48), dtype=np.int16):
    rng = np.random.default_rng(seed)
    a = (100 + rng.integers(-3, 4, size=shape)).astype(dtype)
    a[1:3, 8:14, 20:28] = 400
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.8, 0.9, 2.5))
    return img, a > 200


def complete(path: Path) -> bool:
    """The file reads back whole: gzip stream intact, image readable."""
    if path.name.endswith(".gz"):
        with gzip.open(path) as f:
            while f.read(1 << 20):
                pass
    if path.suffix == ".csv":
        return path.read_text().endswith("\n")
    sitk.ReadImage(str(path))
    return True


def temporaries(folder: Path):
    return sorted(p.name for p in folder.iterdir() if is_temporary_name(p.name))


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "unet-threshold.pt"
    checkpoint.save(path, threshold_unet(), config=models.config("unet", base_width=4, depth=2), preset="stroke-dwi")
    return path


HOLD_WRITE = textwrap.dedent("""
    import sys, time
    import numpy as np, SimpleITK as sitk
    from LesionSegLib.fileio import atomic_path
    img = sitk.GetImageFromArray(np.full((4, 16, 16), 7, np.int16))
    with atomic_path(sys.argv[1], suffix=".tmp.nii.gz") as tmp:
        sitk.WriteImage(img, str(tmp), True)
        print("written", flush=True)
        time.sleep(120)
""")


def _start_holding_writer(dest: Path):
    p = subprocess.Popen([sys.executable, "-c", HOLD_WRITE, str(dest)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "written"
    return p


def test_kill_9_during_a_write_keeps_the_previous_file_and_the_next_write_cleans_up(tmp_path):
    dest = tmp_path / "case_label.nii.gz"
    old, _ = volume()
    write_image(old, dest)
    before = dest.read_bytes()
    writer = _start_holding_writer(dest)
    stale = temporaries(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".case_label.nii.gz.")
    # while the writer lives, its temporary file is not stale: nobody removes it
    assert clean_stale_temporaries(tmp_path) == 0 and temporaries(tmp_path) == stale
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert dest.read_bytes() == before                       # the previous file, untouched
    assert temporaries(tmp_path) == stale                    # what kill -9 leaves behind …
    other, _ = volume(1)
    write_image(other, tmp_path / "other_label.nii.gz")      # … goes with the next write in that folder
    assert temporaries(tmp_path) == []
    assert dest.read_bytes() == before and complete(tmp_path / "other_label.nii.gz")


def test_kill_9_of_a_real_predict_run_leaves_only_whole_files_and_a_rerun_finishes(network, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    truths = {}
    for i in range(6):
        img, truth = volume(i, shape=(8, 64, 64))
        sitk.WriteImage(img, str(inputs / f"case{i}.nii.gz"), True)
        truths[f"case{i}"] = truth
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "LesionSegLib", "predict", "--checkpoint", str(network), "--mode",
                          "native", "--probabilities", "--quiet", str(inputs), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and p.poll() is None:
        if out.is_dir() and any(n.startswith("case2") for n in os.listdir(out)):
            break
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    visible = [q for q in out.iterdir() if not q.name.startswith(".")]
    assert visible, "the run was killed before it wrote anything"
    for q in visible:
        assert complete(q), q
    r = lesionseg("predict", "--checkpoint", network, "--mode", "native", "--probabilities", "--quiet", inputs,
                  "-o", out)
    assert r.returncode == 0, r.stderr
    assert temporaries(out) == []
    for stem, truth in truths.items():
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_label.nii.gz"))) > 0, truth)


def test_two_processes_writing_the_same_folder_leave_whole_correct_files(network, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    truths = {}
    for i in range(3):
        img, truth = volume(10 + i, shape=(6, 48, 48))
        sitk.WriteImage(img, str(inputs / f"scan{i}.nrrd"), True)
        truths[f"scan{i}"] = truth
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "LesionSegLib", "predict", "--checkpoint", str(network), "--mode", "native",
           "--probabilities", "--quiet", str(inputs), "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for stdout, stderr, code in results:
        assert code == 0, stderr
    assert temporaries(out) == []
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"scan{i}_{kind}" for i in range(3) for kind in ("label.nrrd", "prob.nrrd", "lesions.csv")]
                           + ["lesionseg-lesions.csv", "lesionseg-summary.json"])
    summary = json.loads((out / "lesionseg-summary.json").read_text())   # whole: one of the two runs' own
    assert sorted(Path(s["input"]).name for s in summary["succeeded"]) == [f"scan{i}.nrrd" for i in range(3)]
    for stem, truth in truths.items():
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_label.nrrd"))) > 0, truth)
        assert all(complete(out / f"{stem}_{k}") for k in ("prob.nrrd", "lesions.csv"))


def test_stale_clean_up_removes_only_its_own_temporary_files(network, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    own = [".case_label.nii.gz.abcd1234.tmp.nii.gz", ".weights.pt.zz99yy_8.tmp", ".x.csv.k2j4h5g6.tmp"]
    others = [".case.tmp", "notes.tmp", ".x.ABCDEFGH.tmp", ".hidden", "case.abcd1234.tmp", ".a.abcd123.tmp",
              ".b.abcd12345.tmpx.nii"]
    for name in own + others:
        (out / name).write_text("left over")
    (out / ".dir.abcdefgh.tmp").mkdir()                      # a folder with the pattern's name
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (out / ".link.abcdefgh.tmp").symlink_to(target)          # a link with the pattern's name
    img, _ = volume()
    sitk.WriteImage(img, str(tmp_path / "case.nii.gz"), True)
    from LesionSegLib import cli
    assert cli.main(["predict", "--checkpoint", str(network), "--mode", "native", "--quiet",
                     str(tmp_path / "case.nii.gz"), "-o", str(out)]) == 0
    left = {p.name for p in out.iterdir()}
    assert not left & set(own)
    assert set(others) | {".dir.abcdefgh.tmp", ".link.abcdefgh.tmp"} <= left
    assert target.read_text() == "keep me"


# --------------------------------------------------------------------------- full disk
@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs (skipped where mounting is not allowed), filled so that small files
    fit and large ones do not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip() or r.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def noise_image(shape=(16, 96, 96), seed=0):
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.random(shape, dtype=np.float32))
    img.SetSpacing((0.5, 0.5, 1.0))
    return img


@pytest.mark.parametrize("name", ["probabilities.nii.gz", "probabilities.nii", "probabilities.nrrd",
                                  "probabilities.mha", "slice.png"])
def test_a_full_disk_never_installs_a_truncated_image(small_disk, name):
    dest = small_disk / name
    small = noise_image((1, 8, 8)) if not name.endswith(".png") else sitk.GetImageFromArray(np.eye(8, dtype=np.uint8))
    write_image(small, dest)
    before = dest.read_bytes()
    _fill(small_disk, 64 * 1024)
    big = noise_image() if not name.endswith(".png") else sitk.GetImageFromArray(
        np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8))
    with pytest.raises(WriteError) as e:
        write_image(big, dest)
    assert str(dest) in str(e.value) and ".tmp" not in str(e.value)
    assert dest.read_bytes() == before                       # the previous file, whole
    assert temporaries(small_disk) == []


def test_a_full_disk_never_installs_a_truncated_table(small_disk):
    _fill(small_disk, 16 * 1024)
    with pytest.raises(WriteError) as e:
        atomic_write_text(small_disk / "lesions.csv", "x,y\n" * 100_000)
    assert "no space left" in str(e.value) and "lesions.csv" in str(e.value)
    assert not (small_disk / "lesions.csv").exists() and temporaries(small_disk) == []


def test_predict_on_a_full_disk_fails_and_leaves_only_whole_files(network, small_disk, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        rng = np.random.default_rng(i)
        a = (100 + rng.normal(0, 30, (12, 96, 96))).astype(np.float32)   # noisy probabilities: incompressible
        img = sitk.GetImageFromArray(a)
        sitk.WriteImage(img, str(inputs / f"noisy{i}.nrrd"))
    out = small_disk / "out"
    out.mkdir()
    _fill(small_disk, 300 * 1024)
    r = lesionseg("predict", "--checkpoint", network, "--mode", "native", "--probabilities", "--quiet",
                  inputs, "-o", out)
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "noisy" in ln]
    assert errors and all(("no space left" in ln or "incomplete" in ln) and ".tmp" not in ln for ln in errors)
    assert "Traceback" not in r.stderr
    for q in out.iterdir():
        assert not q.name.startswith("."), q
        assert complete(q), q
