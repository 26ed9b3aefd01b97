"""``lesionseg predict`` as a user runs it: a real subprocess on a folder of real files
(NIfTI, NRRD, PNG, JPEG), some of them bad; results in the inputs' formats and
geometry, lesion tables, and one line per failed file while the others are done."""
import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LesionSegLib import checkpoint
from helpers import rotation, shifted_threshold_unet

ROOT = Path(__file__).resolve().parents[1]


def lesionseg(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "LesionSegLib", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=240)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def make_inputs(folder: Path):
    folder.mkdir()
    vol = np.full((5, 40, 48), -850, np.int16)
    vol[1:3, 10:18, 20:30] = 200        # 2 × 8 × 10 voxels
    vol[4, 30:33, 5:8] = 300            # 1 × 3 × 3 voxels
    nii = sitk.GetImageFromArray(vol)
    nii.SetSpacing((0.75, 0.8, 2.5))
    nii.SetOrigin((120.0, -90.5, 33.0))
    nii.SetDirection(tuple((rotation((0.3, 1, 0.2), 12) @ np.diag([-1.0, -1.0, 1.0])).ravel()))
    sitk.WriteImage(nii, str(folder / "case1.nii.gz"))
    coronal = sitk.PermuteAxes(nii, (0, 2, 1))          # same content stored as coronal slices
    sitk.WriteImage(coronal, str(folder / "case2.nrrd"))
    png = np.full((64, 80), 40, np.uint8)
    png[20:30, 40:60] = 250
    sitk.WriteImage(sitk.GetImageFromArray(png), str(folder / "slice.png"))
    rgb = np.zeros((32, 32, 3), np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(folder / "photo.jpg"))
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    (folder / "notes.txt").write_text("ignored: not an image")
    return vol, nii, coronal, png


def test_predict_folder_with_bad_files(tmp_path):
    ck = checkpoint.save(tmp_path / "threshold.pt", shifted_threshold_unet(dy=0, dx=0), preset="covid-ct")
    inputs = tmp_path / "in"
    vol, nii, coronal, png = make_inputs(inputs)
    before = digest(inputs)
    out = tmp_path / "out"
    r = lesionseg("predict", "--checkpoint", ck, "--mode", "native", "--probabilities", "--batch-size", "2",
                  inputs, tmp_path / "missing.nii.gz", "-o", out)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("lesionseg predict: ") and ": " in line[19:]]
    by_file = {Path(line.split(": ")[1]).name: line for line in errors}
    assert "convert it to grey" in by_file["photo.jpg"]
    assert "cannot read" in by_file["broken.nii.gz"]
    assert "no such file" in by_file["missing.nii.gz"]
    assert "3 of 6 input(s) failed" in r.stderr
    assert digest(inputs) == before                          # inputs untouched

    # NIfTI: same grid, lesion voxels where the bright voxels are
    lab = sitk.ReadImage(str(out / "case1_label.nii.gz"))
    assert lab.GetSize() == nii.GetSize() and np.allclose(lab.GetSpacing(), nii.GetSpacing())
    assert np.allclose(lab.GetOrigin(), nii.GetOrigin()) and np.allclose(lab.GetDirection(), nii.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(lab), (vol > 0).astype(np.uint8))
    prob = sitk.ReadImage(str(out / "case1_prob.nii.gz"))
    assert prob.GetPixelID() == sitk.sitkFloat32 and sitk.GetArrayFromImage(prob)[vol > 0].min() > 0.99
    # NRRD stored coronally: the labels follow its own grid
    lab2 = sitk.ReadImage(str(out / "case2_label.nrrd"))
    assert lab2.GetSize() == coronal.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(lab2), (sitk.GetArrayFromImage(coronal) > 0).astype(np.uint8))
    # PNG: label values, probability as 8-bit
    lab_png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "slice_label.png")))
    assert np.array_equal(lab_png, (png > 128).astype(np.uint8))
    assert sitk.ReadImage(str(out / "slice_prob.png")).GetPixelID() == sitk.sitkUInt8

    with open(out / "case1_lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["voxels"]) for r in rows] == [160, 9]
    assert abs(float(rows[0]["volume_mm3"]) - 160 * 0.75 * 0.8 * 2.5) < 1e-3
    # MSE-Net's stroke size levels are its own: a CT infection U-Net leaves the column empty
    assert rows[0]["class_name"] == "Lung infection" and rows[0]["size_level"] == ""
    centre = nii.TransformContinuousIndexToPhysicalPoint((24.5, 13.5, 1.5))
    assert np.allclose([float(rows[0][k]) for k in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")],
                       centre, atol=1e-3)
    assert "case1.nii.gz ->" in r.stdout and "2 lesions" in r.stdout
    assert not list(out.glob(".*"))                          # no temporary files left behind


def test_predict_with_the_onnxruntime_backend_and_an_onnx_file(tmp_path):
    """--backend onnxruntime gives the torch labels; an exported .onnx file runs as well."""
    import pytest
    pytest.importorskip("onnxruntime")
    ck = checkpoint.save(tmp_path / "threshold.pt", shifted_threshold_unet(dy=0, dx=0), preset="covid-ct")
    inputs = tmp_path / "in"
    vol, *_ = make_inputs(inputs)
    r = lesionseg("predict", "--checkpoint", ck, "--backend", "onnxruntime", "--no-csv", "--quiet",
                  inputs / "case1.nii.gz", "-o", tmp_path / "ort")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ort" / "case1_label.nii.gz"))),
                          (vol > 0).astype(np.uint8))
    onnx = tmp_path / "threshold.onnx"
    r = lesionseg("export-onnx", "--checkpoint", ck, "--dynamic-batch", "-o", onnx)
    assert r.returncode == 0, r.stderr
    r = lesionseg("predict", "--checkpoint", onnx, "--no-csv", "--quiet", inputs / "case1.nii.gz",
                  "-o", tmp_path / "file")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "file" / "case1_label.nii.gz"))),
                          (vol > 0).astype(np.uint8))


def test_predict_refuses_to_run_without_a_network_and_reports_bad_arguments(tmp_path):
    r = lesionseg("predict", tmp_path, "-o", tmp_path / "out")
    assert r.returncode == 2 and "--checkpoint" in r.stderr
    r = lesionseg("predict", "--checkpoint", tmp_path / "nothing.pt", tmp_path, "-o", tmp_path / "out")
    assert r.returncode == 1 and "no such checkpoint file" in r.stderr


def test_terminal_progress_draws_a_bar_on_a_terminal_and_nothing_on_a_pipe():
    """``lesionseg predict``'s bar (tqdm): redrawn in place on a terminal, silent on a pipe or
    log file, where the one line per finished file is what the user reads."""
    import io
    from LesionSegLib.jobs import TerminalProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        bar = TerminalProgress(True, stream)
        bar.start("[1/2] case.nii.gz")
        for k in range(5):
            bar(k / 4, f"slice {k}")
        bar.end()
        bar.end()  # twice is harmless
    assert pipe.getvalue() == ""
    drawn = tty.getvalue()
    assert "[1/2] case.nii.gz" in drawn and "100.0%" in drawn and "slice 4" in drawn and "\r" in drawn
    quiet = Terminal()
    bar = TerminalProgress(False, quiet)
    bar.start("x")
    bar(0.5, "half")
    bar.end()
    assert quiet.getvalue() == ""
