"""The ``lesionseg`` command line, run as a real subprocess."""
import json
import subprocess
import sys

import torch

from LesionSegLib import checkpoint, models

from conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, "-m", "LesionSegLib", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_list_prints_every_model_with_task_input_and_parameters():
    r = run("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in models.list_models():
        c = models.card(name)
        row = next(line for line in lines if line.startswith(name + " "))
        assert c["display_name"] in row
        assert f"{c['parameters']['trainable'] / 1e6:.2f} M" in row
        assert f"{c['input']['channels']}ch" in row
        assert c["default_preset"] in row
    r = run("list", "--json")
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == set(models.list_models())
    assert next(r for r in rows if r["name"] == "m2snet")["params"] == 27692585


def test_card_and_unknown_model():
    r = run("card", "BSNet")
    assert r.returncode == 0 and json.loads(r.stdout)["outputs"]["inference"] == "lateral_map_2"
    r = run("card", "nonet")
    assert r.returncode == 1
    assert "unknown model 'nonet'; available:" in r.stderr and "m2snet" in r.stderr


def test_inspect_reports_checkpoint_and_refuses_bad_file(tmp_path):
    path = checkpoint.save(tmp_path / "ck.pt", models.create("msnet"), provenance={"training_data": "demo set"})
    r = run("inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "lesionseg weights of msnet (27.69 M trainable parameters)" in r.stdout
    assert "training_data: demo set" in r.stdout
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    r = run("inspect", str(bad))
    assert r.returncode == 1 and "not a LesionSeg checkpoint and not a known official file" in r.stderr


def test_registry_and_cards_do_not_import_torch():
    code = ("import sys; from LesionSegLib import models; "
            "[models.card(n) for n in models.list_models()]; models.preset('m2snet', 'polyp'); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
