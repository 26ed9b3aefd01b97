"""``lesionseg demo`` end to end on the shipped ISLES'22 DWI, as a real subprocess, with
a hand-set threshold U-Net standing in for the demo weights."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib import checkpoint

from conftest import ROOT, SHARED_DATA
from helpers import threshold_unet

DATA = ROOT / "demo" / "data"


def test_demo_writes_files_in_the_input_geometry_and_reports_dice(tmp_path):
    demo = tmp_path / "demo"
    (demo / "model").mkdir(parents=True)
    (demo / "data").symlink_to(DATA, target_is_directory=True)
    net = threshold_unet(z_threshold=2.0)
    checkpoint.save(demo / "model" / "msenet-demo-isles-dwi.pt", net,
                    config={"in_channels": 1, "num_classes": 1, "base_width": 4, "depth": 2},
                    preset="stroke-dwi", provenance={"purpose": "test stand-in"})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "LesionSegLib", "demo", "--demo-dir", str(demo), "-o", str(out),
                        "--no-fundus"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "Dice" in r.stdout and 0.0 <= summary["dice_vs_expert"] <= 1.0
    dwi = sitk.ReadImage(str(DATA / "isles22-sub-strokecase0009-dwi.nii.gz"))
    labels = sitk.ReadImage(str(out / "dwi-lesion-labels.nii.gz"))
    assert labels.GetSize() == dwi.GetSize()
    assert np.allclose(labels.GetDirection(), dwi.GetDirection()) and np.allclose(labels.GetOrigin(), dwi.GetOrigin())
    rows = list(csv.DictReader((out / "dwi-lesions.csv").open()))
    assert len(rows) == summary["lesions"]
    assert (out / "dwi-lesions.seg.nrrd").stat().st_size > 0
    check_overlay(out, summary)


def check_overlay(out, summary):
    """First panel: the slice of largest expert area (LPS order), with the green outline."""
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "overlay.png")))
    ref = sitk.DICOMOrient(sitk.ReadImage(str(DATA / "isles22-sub-strokecase0009-lesion.nii.gz")), "LPS")
    ref = sitk.GetArrayFromImage(ref) > 0
    panels = summary["overlay_slices_lps"]
    assert panels[0] == int(np.argmax(ref.sum(axis=(1, 2)))) and len(panels) == len(set(panels)) <= 2
    width = ref.shape[2] * 4
    assert png.shape[:2] == (ref.shape[1] * 4, len(panels) * width + (len(panels) - 1) * 8)
    green = (png[..., 0] == 40) & (png[..., 1] == 255) & (png[..., 2] == 40)
    assert green[:, :width].sum() > 20


def test_shipped_demo_weights_find_the_real_lesion(tmp_path):
    """The weights in demo/model (trained on synthetic lesions only) against the expert
    mask they never saw: the numbers docs/results.md and demo/README.md quote."""
    model = ROOT / "demo" / "model" / "msenet-demo-isles-dwi.pt"
    if not model.is_file():
        pytest.skip("no demo weights in this checkout")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "LesionSegLib", "demo", "-o", str(out), "--device", "cpu",
                        "--no-fundus"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice_vs_expert"] > 0.15, summary
    assert "synthetic lesions" in r.stdout and "never shown" in r.stdout
    check_overlay(out, summary)
    red = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "overlay.png")))
    width = sitk.ReadImage(str(DATA / "isles22-sub-strokecase0009-lesion.nii.gz")).GetSize()[0] * 4
    assert ((red[..., 0] > red[..., 1] + 60)[:, :width]).sum() > 100   # prediction on the expert's slice


def test_demo_without_weights_says_what_is_missing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "LesionSegLib", "demo", "--demo-dir", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "is missing" in r.stdout


IDRID = SHARED_DATA / "fundus-idrid20"


def test_demo_fundus_part_reproduces_the_lseg_card_on_its_held_out_photograph(tmp_path):
    """The real fundus case of ``make demo``: L-Seg's shipped weights on IDRiD_11 (a test
    case of weights/splits/idrid.json) give the per-class Dice of their card's held-out
    table, the overlay has both panels, and the expert's lesions are drawn in the left one."""
    card = ROOT / "weights" / "lseg-fundus-dr.heldout.json"
    if not card.is_file() or not (ROOT / "weights" / "lseg-fundus-dr.pt").is_file():
        pytest.skip("no shipped L-Seg fundus-dr weights in this checkout")
    if not IDRID.is_dir():
        pytest.skip("../shared/data/fundus-idrid20 absent")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "LesionSegLib", "demo", "-o", str(out), "--device", "cpu",
                        "--fundus", str(IDRID)], cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "fundus-summary.json").read_text())
    rows = {row["class"]: row for row in json.loads(card.read_text()) if row["case"] == "IDRiD_11"}
    assert len(rows) == 4
    for name, row in rows.items():
        cls = name[name.rfind("(") + 1: name.rfind(")")]
        assert summary["classes"][cls]["dice"] == pytest.approx(row["dice"], abs=1e-3), cls
    # floors well below what the shipped weights give (EX 0.64, mean AUPR over EX, HE, MA 0.43)
    assert summary["classes"]["EX"]["dice"] >= 0.5 and summary["mean_aupr"] >= 0.3
    assert summary["classes"]["SE"]["expert_pixels"] == 0 and summary["classes"]["SE"]["aupr"] is None
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fundus-overlay.png")))
    assert png.shape == (2848 // 4, 2 * (4288 // 4) + 8, 3)
    yellow = (png[..., 0] > 200) & (png[..., 1] > 160) & (png[..., 2] < 90)
    assert yellow[:, :4288 // 4].sum() > 200 and yellow[:, 4288 // 4 + 8:].sum() > 200


def test_demo_fundus_part_says_why_it_is_skipped(tmp_path, monkeypatch, capsys):
    from LesionSegLib import releases
    from LesionSegLib.commands.demo.fundus import run_fundus
    monkeypatch.setenv(releases.RELEASE_ENV_VAR, str(tmp_path / "no-weights"))
    assert run_fundus(IDRID, "IDRiD_11", tmp_path / "out", "cpu") is None
    assert "no shipped L-Seg fundus-dr weights" in capsys.readouterr().out
    if not (ROOT / "weights" / "lseg-fundus-dr.pt").is_file():
        return
    monkeypatch.setenv(releases.RELEASE_ENV_VAR, str(ROOT / "weights"))
    assert run_fundus(tmp_path / "nowhere", "IDRiD_11", tmp_path / "out", "cpu") is None
    text = capsys.readouterr().out
    assert "is not on this machine" in text and "--fundus" in text and not (tmp_path / "out").exists()
