"""``lesionseg evaluate`` as a real subprocess on real files (NIfTI, PNG, palette PNG, JPEG)."""
import csv
import json
import math
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib import metrics

from conftest import ROOT, SHARED_DATA


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "LesionSegLib", "evaluate", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def write(arr, path, spacing=None, origin=None, rgb=False):
    img = sitk.GetImageFromArray(arr, isVector=rgb)
    if spacing:
        img.SetSpacing(spacing)
    if origin:
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_palette_png(path, indices, palette):
    """A minimal 8-bit palette PNG (colour type 3), written by hand."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    h, w = indices.shape
    raw = b"".join(b"\x00" + indices[y].astype(np.uint8).tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
           + chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel())) + chunk(b"IDAT", zlib.compress(raw))
           + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def test_nifti_files_anisotropic_known_distances_csv_and_summary(tmp_path):
    gt = np.zeros((6, 8, 8), np.uint8)
    pred = np.zeros((6, 8, 8), np.uint8)
    gt[1, 3, 3] = 1
    pred[3, 4, 3] = 1                          # dz 2 × 3 mm, dy 1 × 1.5 mm → √(36 + 2.25) mm
    gt[4, 6, 6] = 2                            # class 2 only in the reference
    spacing = (0.5, 1.5, 3.0)
    g = write(gt, tmp_path / "case.nii.gz", spacing)
    p = write(pred, tmp_path / "pred.nii.gz", spacing)
    out = tmp_path / "out" / "metrics.csv"
    r = run(p, g, "--csv", out, "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    rows = {row["class"]: row for row in read_csv(out)}
    assert set(rows) == {"1", "2"}
    d = math.hypot(6.0, 1.5)
    assert float(rows["1"]["hd95"]) == pytest.approx(d, rel=1e-6)
    assert float(rows["1"]["assd"]) == pytest.approx(d, rel=1e-6)
    assert float(rows["1"]["dice"]) == 0.0 and rows["1"]["lesion_fn"] == "1" and rows["1"]["lesion_fp"] == "1"
    assert float(rows["1"]["reference_volume_mm3"]) == pytest.approx(0.5 * 1.5 * 3.0)
    assert rows["2"]["hd95"] == "nan" and rows["2"]["sensitivity"] == "0"
    assert "Dice" in r.stdout and "HD95 mm" in r.stdout and "class 2" in r.stdout
    summary = json.loads((tmp_path / "m.json").read_text())["summary"]
    assert summary["1"]["hd95"]["mean"] == pytest.approx(d, rel=1e-6)
    assert summary["2"]["hd95"]["n"] == 0 and summary["2"]["hd95"]["mean"] is None


def test_geometry_mismatch_is_a_clear_error_naming_both(tmp_path):
    a = write(np.ones((4, 5, 6), np.uint8), tmp_path / "a.nii.gz", (1.0, 1.0, 1.0))
    b = write(np.ones((4, 5, 6), np.uint8), tmp_path / "b.nii.gz", (1.0, 1.0, 2.5))
    r = run(a, b, "--csv", tmp_path / "x.csv")
    assert r.returncode == 1
    assert "geometry mismatch (spacing)" in r.stderr
    assert "a.nii.gz" in r.stderr and "b.nii.gz" in r.stderr
    assert "spacing (1, 1, 1)" in r.stderr and "spacing (1, 1, 2.5)" in r.stderr
    assert not (tmp_path / "x.csv").exists()


def test_png_folders_with_an_unmatched_file(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    expected = {}
    rng = np.random.default_rng(0)
    for i in range(3):
        gt = np.zeros((20, 24), np.uint8)
        gt[4:12, 5:15] = 255                   # masks saved black/white
        pred = np.zeros((20, 24), np.uint8)
        pred[4 + i:12, 5:15 + i] = 1           # predictions saved as label 1
        write(gt, gt_dir / f"slice{i}.png")
        write(pred, pred_dir / f"slice{i}.png")
        expected[f"slice{i}"] = metrics.evaluate_case(pred, (gt > 0).astype(np.uint8))["classes"][1]
    write(rng.integers(0, 2, (20, 24)).astype(np.uint8), pred_dir / "extra.png")   # no reference
    (gt_dir / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "m.csv"
    r = run(pred_dir, gt_dir, "--csv", out)
    assert r.returncode == 1
    assert "extra.png" in r.stderr and "no match in GT" in r.stderr
    rows = read_csv(out)
    assert sorted(row["case"] for row in rows) == ["slice0", "slice1", "slice2"]
    for row in rows:
        e = expected[row["case"]]
        for key in ("dice", "iou", "sensitivity", "precision", "hd95", "assd"):
            assert float(row[key]) == pytest.approx(e[key], rel=1e-6), (row["case"], key)
    assert float(next(r for r in rows if r["case"] == "slice0")["dice"]) == 1.0
    assert "3 case(s) evaluated" in r.stdout


def test_probabilities_give_aupr_and_mauc(tmp_path):
    gt = np.zeros((2, 10, 10), np.uint8)
    gt[:, 2:5, 2:5] = 1
    gt[:, 6:9, 6:9] = 2
    rng = np.random.default_rng(1)
    prob = rng.random((2, 2, 10, 10)).astype(np.float32)     # (C, z, y, x)
    g = write(gt, tmp_path / "c.nii.gz", (0.8, 0.8, 2.0))
    p = write(gt, tmp_path / "p.nii.gz", (0.8, 0.8, 2.0))
    np.save(tmp_path / "prob.npy", prob)
    r = run(p, g, "--prob", tmp_path / "prob.npy", "--csv", tmp_path / "m.csv")
    assert r.returncode == 0, r.stderr
    rows = {row["class"]: row for row in read_csv(tmp_path / "m.csv")}
    a1, a2 = metrics.aupr(prob[0], gt == 1), metrics.aupr(prob[1], gt == 2)
    assert float(rows["1"]["aupr"]) == pytest.approx(a1)
    assert float(rows["2"]["aupr"]) == pytest.approx(a2)
    assert f"mAUC (mean pooled AUPR over 2 class(es)): {(a1 + a2) / 2:.4f}" in r.stdout


def test_palette_png_jpeg_and_rgb_labels(tmp_path):
    idx = np.zeros((8, 8), np.uint8)
    idx[1:4, 1:4] = 1
    idx[5:7, 5:7] = 2
    palette = [(0, 0, 0), (128, 0, 0), (0, 128, 0)] + [(0, 0, 0)] * 253   # VOC-style, zero-padded
    gt = write_palette_png(tmp_path / "gt.png", idx, palette)
    assert sitk.ReadImage(str(gt)).GetNumberOfComponentsPerPixel() == 3    # ITK expands the palette
    pred = write(idx, tmp_path / "pred.png")
    r = run(pred, gt, "--csv", tmp_path / "m.csv")
    assert r.returncode == 0, r.stderr
    rows = {row["class"]: row for row in read_csv(tmp_path / "m.csv")}
    assert set(rows) == {"1", "2"} and float(rows["1"]["dice"]) == 1.0 and float(rows["2"]["dice"]) == 1.0
    # a JPEG 0/255 mask is lossy: binarised at 128 it matches the exact mask
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:24] = 255
    write(mask, tmp_path / "m.jpg")
    write((mask > 0).astype(np.uint8), tmp_path / "exact.png")
    assert len(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.jpg"))))) > 2
    r = run(tmp_path / "m.jpg", tmp_path / "exact.png", "--csv", tmp_path / "j.csv")
    assert r.returncode == 0, r.stderr
    assert float(read_csv(tmp_path / "j.csv")[0]["dice"]) == pytest.approx(1.0)
    # a real colour image is refused with the file named
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    write(colour, tmp_path / "photo.png", rgb=True)
    r = run(tmp_path / "photo.png", pred)
    assert r.returncode == 1 and "photo.png: a colour image" in r.stderr


def test_bad_arguments(tmp_path):
    a = write(np.ones((4, 4), np.uint8), tmp_path / "a.png")
    (tmp_path / "d").mkdir()
    r = run(a, tmp_path / "d")
    assert r.returncode == 1 and "both be files or both be folders" in r.stderr
    r = run(a, tmp_path / "missing.png")
    assert r.returncode == 2 and "missing.png does not exist" in r.stderr
    r = run(a, a, "--csv", a)
    assert r.returncode == 2 and "would overwrite an input" in r.stderr


@pytest.mark.skipif(not (SHARED_DATA / "isles22-strokecase0009").is_dir(), reason="shared data absent")
def test_real_stroke_mask_against_itself_shifted(tmp_path):
    src = SHARED_DATA / "isles22-strokecase0009" / "sub-strokecase0009_ses-0001_msk.nii.gz"
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img)
    shifted = sitk.GetImageFromArray(np.roll(arr, 1, axis=2))   # one voxel (2 mm) along x
    shifted.CopyInformation(img)
    sitk.WriteImage(shifted, str(tmp_path / "pred.nii.gz"))
    r = run(tmp_path / "pred.nii.gz", src, "--csv", tmp_path / "m.csv")
    assert r.returncode == 0, r.stderr
    row = read_csv(tmp_path / "m.csv")[0]
    assert 0 < float(row["dice"]) < 1
    assert float(row["hausdorff"]) == pytest.approx(2.0)           # every voxel moved by 2 mm
    assert 0 < float(row["assd"]) <= 2.0 + 1e-6
