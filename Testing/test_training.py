"""Recipes as data, schedules, the ``lesionseg train`` command, and the trainer's files,
callbacks, cancellation and errors on a tiny U-Net (CPU, real files)."""
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib import checkpoint
from LesionSegLib.cli import main as cli_main
from LesionSegLib.data import DataError
from LesionSegLib.training import RecipeError, TrainingError, load_recipe, train
from LesionSegLib.training.schedule import Schedule

from training_helpers import write_folder

TINY = {"epochs": 2, "batch_size": 2, "epoch_length": 4, "size": [32, 32], "val_fraction": 0.5,
        "model_config": {"base_width": 4, "depth": 3}, "checkpoint_every_steps": 0}


def make_folder(root: Path, n=4, size=40, grey=True):
    return write_folder(root, n, size, 1 if grey else 3, prefix="case")


# ------------------------------------------------------------------ recipes
def test_m2snet_recipe_is_the_released_one():
    r = load_recipe("m2snet", "polyp")
    assert r["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                              "weight_decay": 0.0005, "backbone_lr_mult": 1.0}
    assert r["schedule"]["name"] == "triangular" and r["batch_size"] == 16 and r["epochs"] == 50
    assert r["multiscale"]["sizes"] == [224, 256, 288, 320, 352] and r["size"] == [352, 352]
    assert r["augment"]["hflip"] == 0.5 and r["augment"]["rotate"] == 10.0
    assert load_recipe("m2snet", "covid-ct")["epochs"] == 200 and load_recipe("m2snet", "breast-us")["epochs"] == 100
    assert r["sources"]["schedule"].startswith("lr_e")


def test_recipes_of_the_other_networks():
    b = load_recipe("bsnet")
    assert (b["optimizer"]["name"], b["optimizer"]["lr"], b["batch_size"], b["epochs"]) == ("adam", 1e-4, 24, 100)
    assert b["multiscale"] == {"sizes": [256, 352, 448], "mode": "cycle"}
    assert b["grad_clip"] == {"kind": "value", "max": 0.5}
    m = load_recipe("msenet")
    assert m["schedule"] == {"name": "plateau", "factor": 0.2, "patience": 3, "monitor": "val_loss", "mode": "min"}
    assert m["early_stopping"]["patience"] == 5 and m["optimizer"]["lr"] == 1e-3 and m["size"] == [192, 192]
    assert load_recipe("unet", "stroke-dwi")["size"] == [112, 112]  # the preset's input size
    assert load_recipe("unet", "stroke-dwi")["augment"]["hflip"] == 0.0
    lseg = load_recipe("lseg")
    assert lseg["optimizer"]["param_groups"] == "lseg_caffe" and lseg["accumulate"] == 10
    assert load_recipe("mslkseg")["dyconv_temperature"] == {"start": 30.0, "end": 1.0, "epochs": 10}
    for name in ("msnet", "unet", "mslkseg"):
        assert load_recipe(name)["model"] == name


def test_overrides_reach_every_value_and_typos_are_errors():
    r = load_recipe("m2snet", "polyp", {"optimizer.momentum": 0.5, "lr": 0.01, "epochs": 3},
                    augment={"rotate": 0})
    assert r["optimizer"]["momentum"] == 0.5 and r["optimizer"]["lr"] == 0.01 and r["epochs"] == 3
    assert r["augment"] == {"hflip": 0.5, "vflip": 0.0, "rotate": 0, "scale": None}  # merged, not replaced
    assert r["optimizer"]["nesterov"] is True
    with pytest.raises(RecipeError, match="unknown recipe key 'epoch'"):
        load_recipe("m2snet", epoch=3)
    with pytest.raises(RecipeError, match="optimizer.name"):
        load_recipe("m2snet", **{"optimizer.name": "rmsprop"})
    with pytest.raises(RecipeError, match="epochs"):
        load_recipe("unet", epochs=0)
    # another optimiser or schedule replaces the section: SGD's momentum does not leak into Adam
    r = load_recipe("m2snet", optimizer={"name": "adam", "lr": 1e-4}, schedule={"name": "constant"})
    assert r["optimizer"] == {"name": "adam", "lr": 1e-4} and r["schedule"] == {"name": "constant"}
    assert load_recipe("m2snet", optimizer={"lr": 0.5})["optimizer"]["momentum"] == 0.9   # same kind: merged


def test_triangular_schedule_matches_the_m2snet_formula():
    E = 50
    s = Schedule({"name": "triangular"}, E)
    for e in range(E):
        assert math.isclose(s.factor(e), 1 - abs(2 * (e + 1) / (E + 1) - 1))
    peak = max(range(E), key=s.factor)
    assert peak in (24, 25) and math.isclose(s.factor(peak), 50 / 51)  # the middle of training


def test_step_cosine_and_keras_plateau_schedules():
    s = Schedule({"name": "step", "step_epochs": [50], "gamma": 0.1}, 100)
    assert s.factor(49) == 1.0 and math.isclose(s.factor(50), 0.1) and math.isclose(s.factor(99), 0.1)
    c = Schedule({"name": "cosine", "warmup_epochs": 2, "min_ratio": 0.01}, 12)
    assert c.factor(0) < c.factor(1) < c.factor(2) == 1.0 and math.isclose(c.factor(12), 0.01)
    p = Schedule({"name": "plateau", "factor": 0.2, "patience": 3}, 100)
    for v in (1.0, 0.9, 0.95, 0.95, 0.95):  # three epochs without improvement (Keras: wait >= patience)
        p.observe(v)
    assert math.isclose(p.factor(5), 0.2)
    p.observe(0.5)
    assert math.isclose(p.factor(6), 0.2) and p.bad_epochs == 0


# ------------------------------------------------------------------ command line
def test_cli_show_recipe_applies_overrides(capsys):
    assert cli_main(["train", "--model", "m2snet", "--preset", "covid-ct", "--show-recipe", "--epochs", "3",
                     "--lr", "0.01", "--batch-size", "4", "--set", "augment.rotate=5", "--set", "multiscale=null"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["epochs"], r["optimizer"]["lr"], r["batch_size"], r["augment"]["rotate"], r["multiscale"]) == \
        (3, 0.01, 4, 5, None)


def test_cli_reports_unusable_data_before_training(tmp_path, capsys):
    data = make_folder(tmp_path / "d", n=2)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40), np.uint8)), str(data / "masks" / "case1_1.png"))
    code = cli_main(["train", "--model", "unet", "--data", str(data), "--out", str(tmp_path / "out"), "--quiet",
                     "--set", "val_fraction=0"])
    err = capsys.readouterr().err
    assert code == 1 and "case1_1.png" in err and "40x30" in err
    assert not (tmp_path / "out" / "best.pt").exists()


# ------------------------------------------------------------------ trainer
def test_training_run_writes_checkpoints_logs_and_curves(tmp_path):
    data = make_folder(tmp_path / "d")
    calls = []
    r = train("unet", data, tmp_path / "run", recipe_overrides=TINY, seed=1,
              progress=lambda e, s, n, m: calls.append((e, s, n, dict(m))))
    out = tmp_path / "run"
    for f in ("best.pt", "last.pt", "training_state.pt", "log.csv", "curves.png", "recipe.json", "data.json"):
        assert (out / f).is_file(), f
    assert r.best_checkpoint == str(out / "best.pt") and len(r.history) == 2
    ck = checkpoint.load(r.best_checkpoint)
    assert ck.name == "unet" and ck.config["base_width"] == 4
    # trained at 32x32 (not the card's size): the predictor must resize to what was trained
    assert ck.card["preset"]["input"]["size"] == [32, 32]
    prov = ck.provenance
    assert prov["recipe"]["epochs"] == 2 and prov["data"]["layout"] == "images/masks"
    assert 0.0 <= prov["metrics"]["val_dice"] <= 1.0 and "val_iou" in prov["metrics"]
    assert set(prov["data"]["train_cases"]).isdisjoint(prov["data"]["val_cases"])
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r_["epoch"]) for r_ in rows] == [0, 1] and float(rows[1]["train_loss"]) > 0
    png = sitk.ReadImage(str(out / "curves.png"))
    assert png.GetNumberOfComponentsPerPixel() in (3, 4) and png.GetSize()[0] > 300
    steps = [c for c in calls if "val_dice" not in c[3]]
    assert [(e, s, n) for e, s, n, _ in steps] == [(0, 1, 2), (0, 2, 2), (1, 1, 2), (1, 2, 2)]
    assert all(math.isfinite(m["loss"]) and m["lr"] == 1e-3 for *_, m in steps)
    ends = [c for c in calls if "val_dice" in c[3]]
    assert [e for e, *_ in ends] == [0, 1] and ends[-1][3]["epochs"] == 2
    with pytest.raises(TrainingError, match="already holds a training run"):  # never overwritten
        train("unet", data, out, recipe_overrides=TINY)


def test_cancel_saves_a_resumable_state_and_resume_finishes_the_run(tmp_path):
    from LesionSegLib.inference import CancelToken, Cancelled
    data = make_folder(tmp_path / "d")
    token = CancelToken()

    def progress(epoch, step, total, metrics):
        if epoch == 1 and step == 1:
            token.cancel()
    with pytest.raises(Cancelled) as e:
        train("unet", data, tmp_path / "run", recipe_overrides=TINY, progress=progress, cancel=token)
    assert e.value.result.last_checkpoint is not None and len(e.value.result.history) == 1
    state = checkpoint._read(tmp_path / "run" / "training_state.pt")["training_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    r = train("unet", data, tmp_path / "run", resume=True, recipe_overrides={"epochs": 3})
    assert [h["epoch"] for h in r.history] == [0, 1, 2]
    with pytest.raises(TrainingError, match="nothing to resume"):
        train("unet", data, tmp_path / "elsewhere", resume=True)


def test_unusable_data_fails_before_any_file_is_written(tmp_path):
    data = make_folder(tmp_path / "d", n=2)
    for p in (data / "masks").iterdir():
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40), np.uint8)), str(p))
    with pytest.raises(DataError, match="masks are empty"):
        train("unet", data, tmp_path / "run", recipe_overrides={**TINY, "val_fraction": 0})
    assert not (tmp_path / "run").exists()
    with pytest.raises(RecipeError, match="multiples of 32"):
        train("bsnet", data, tmp_path / "run", recipe_overrides={"size": [100, 100]})


def test_curve_png_without_matplotlib(tmp_path, monkeypatch):
    from LesionSegLib.training.plot import plot_curves
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: the numpy raster is drawn
    hist = [{"epoch": i, "train_loss": 1 / (i + 1), "val_loss": 1.2 / (i + 1), "val_dice": i / 5, "val_iou": i / 6}
            for i in range(5)]
    path = plot_curves(hist, tmp_path / "c.png")
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert img.shape == (360, 900, 3)
    for colour in ((31, 119, 180), (44, 160, 44)):  # train loss and Dice lines are drawn
        assert (img == colour).all(-1).sum() > 50


def _sitk_case(seed, shape=(8, 40, 36)):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[3:6, 10:20, 12:22] = 1
    img[lab > 0] += 80
    im, lb = sitk.GetImageFromArray(img), sitk.GetImageFromArray(lab)
    for x in (im, lb):
        x.SetSpacing((1.5, 1.5, 3.0))
        x.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # stored RAS-like: canonicalised to LPS
    return im, lb


def test_volumes_in_memory_with_25d_context_train_and_predict(tmp_path):
    from LesionSegLib.inference import Predictor
    cases = [{"image": im, "label": lb, "case": f"pat{i}"} for i, (im, lb) in enumerate(_sitk_case(s) for s in range(3))]
    r = train("unet", cases, tmp_path / "run", preset="stroke-dwi",
              recipe_overrides={**TINY, "val_fraction": 0.34, "slices": {"context": 1}})
    ck = checkpoint.load(r.best_checkpoint)
    assert ck.config["in_channels"] == 3
    assert ck.card["preset"]["input"]["slice_context"]["k"] == 1 and ck.card["preset"]["input"]["channels"] == 1
    data = ck.provenance["data"]
    assert data["kind"] == "memory" and len(data["val_cases"]) == 1 and data["slices"]["context"] == 1
    assert 0 <= r.history[-1]["val_dice"] <= 1
    pred = Predictor(r.best_checkpoint, device="cpu").predict_volume(cases[0]["image"])
    assert pred.labels.GetSize() == cases[0]["image"].GetSize()


def test_validation_dice_matches_the_metrics_module():
    import torch
    from LesionSegLib.metrics import dice_iou
    from LesionSegLib.training.validate import counts, dice_iou_from_counts
    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.integers(0, 3, (4, 16, 16)))
    gt = torch.from_numpy(rng.integers(0, 3, (4, 16, 16)))
    gt[1] = 0
    pred[1] = 0  # both empty: 1 by convention
    c = counts(pred, gt, 2)
    cls = torch.arange(1, 3)[None, :, None, None]
    d, u = dice_iou(pred[:, None] == cls, gt[:, None] == cls)
    for i in range(4):
        di, ui = dice_iou_from_counts(c[i].numpy())
        assert math.isclose(di, float(d[i].mean())) and math.isclose(ui, float(u[i].mean()))


def test_pretrained_backbone_and_checkpoint_initialise_the_network(tmp_path):
    import torch
    from LesionSegLib import models
    from LesionSegLib.checkpoint import build_backbone
    from LesionSegLib.training.model_setup import load_pretrained
    vgg = build_backbone("vgg16")
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")          # an ImageNet-style backbone file
    lseg = models.create("lseg")
    load_pretrained(lseg, "lseg", tmp_path / "vgg16.pth")
    assert all(torch.equal(v, lseg.vgg.state_dict()[k]) for k, v in vgg.state_dict().items())
    src = models.create("unet", base_width=4, depth=3)
    checkpoint.save(tmp_path / "u.pt", src, config=models.config("unet", base_width=4, depth=3))
    dst = models.create("unet", base_width=4, depth=3)
    load_pretrained(dst, "unet", tmp_path / "u.pt")                # fine-tuning from a checkpoint
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    with pytest.raises(TrainingError, match="no such file"):
        load_pretrained(dst, "unet", tmp_path / "missing.pt")


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-semiseg" / "multiclass-train").is_dir(),
                    reason="shared multi-class COVID data not present")
def test_multiclass_unet_on_the_real_palette_masks(tmp_path):
    from conftest import SHARED_DATA
    from LesionSegLib.inference import Predictor
    data = SHARED_DATA / "covid-semiseg" / "multiclass-train"
    r = train("unet", data, tmp_path / "run", preset="covid-ct",
              recipe_overrides={**TINY, "epochs": 1, "val_fraction": 0.2, "model_config": {"num_classes": 3, "base_width": 4,
                                                                                          "depth": 3}})
    ck = checkpoint.load(r.best_checkpoint)
    pre = ck.card["preset"]
    assert pre["outputs"]["activation"] == "softmax" and pre["outputs"]["channels"] == 3
    assert [c["value"] for c in pre["classes"]] == [1, 2]
    assert ck.provenance["data"]["layout"] == "Imgs/GT" and ck.provenance["data"]["case_rule"].startswith("running numbers")
    p = Predictor(r.best_checkpoint, device="cpu")  # the card is coherent for inference
    assert len(p.classes) == 2
