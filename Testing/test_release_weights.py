"""Shipped weights: a run becomes a release file (fp16, manifest with SHA-256, held-out
metrics computed through the predictor); ``lesionseg predict --model M --preset P``
without a checkpoint finds them and says so; a damaged file is refused; a preset without
weights is a clear error; random weights only on request. The repository's own
``weights/`` is checked against its manifest, and one shipped network's held-out metric is
reproduced on real data (skipped when ../shared/data is absent)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib import checkpoint, releases, weights
from LesionSegLib.data import folder_pairs
from LesionSegLib.data.images import read_mask
from LesionSegLib.inference import Predictor
from LesionSegLib.training.release import evaluate_heldout, heldout_pairs, write_manifest, write_release

from conftest import SHARED_DATA
from helpers import shifted_threshold_unet

ROOT = Path(__file__).resolve().parents[1]


def lesionseg(*args, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "LesionSegLib", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=240)


def _squares(root: Path, n: int = 3):
    """Grey images with one bright square each and its 0/255 mask."""
    for i in range(n):
        img = np.full((48, 64), 40, np.uint8)
        m = np.zeros_like(img)
        img[10 + i:22 + i, 20:36] = 250
        m[10 + i:22 + i, 20:36] = 255
        for sub, arr in (("images", img), ("masks", m)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / sub / f"case{i}_1.png"))
    return root


@pytest.fixture
def release(tmp_path):
    """A release folder with one U-Net file whose network thresholds the image, and an
    empty user cache (so that only shipped weights can be found)."""
    data = _squares(tmp_path / "data")
    run_ck = checkpoint.save(tmp_path / "run" / "best.pt", shifted_threshold_unet(dy=0, dx=0), preset="covid-ct")
    pairs = heldout_pairs(folder_pairs(data), {"val": [], "test": ["case1", "case2"]})
    assert [p.case for p in pairs] == ["case1", "case2"]
    heldout = evaluate_heldout(Predictor(str(run_ck), device="cpu"), pairs)
    entry = write_release(run_ck, tmp_path / "weights", name="unet-covid-ct", heldout=heldout,
                          info={"data": "squares", "budget": "none"})
    env = {releases.RELEASE_ENV_VAR: str(tmp_path / "weights"), weights.ENV_VAR: str(tmp_path / "cache")}
    return tmp_path, data, entry, heldout, env


def test_release_file_is_fp16_with_manifest_and_heldout_metrics(release):
    tmp, _, entry, heldout, _ = release
    assert heldout.summary["images"] == 2 and heldout.summary["dice"] == pytest.approx(1.0)
    manifest = json.loads((tmp / "weights" / "manifest.json").read_text())
    (f,) = manifest["files"]
    path = tmp / "weights" / f["file"]
    assert f["sha256"] == weights.sha256_file(path) and f["size"] == path.stat().st_size
    assert f["model"] == "unet" and f["preset"] == "covid-ct" and f["metrics"]["heldout"]["dice"] == 1.0
    import torch
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    floats = [v for v in raw["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert raw["provenance"]["heldout"]["dice"] == 1.0


def test_a_baseline_is_scored_on_the_runs_own_test_cases_and_kept_across_releases(release):
    """evaluate_run reads the split from the run's data.json; add_baseline records the
    result beside the release, and a new release of the same file keeps it."""
    from LesionSegLib.training import train
    from LesionSegLib.training.release import add_baseline, evaluate_run
    tmp, _, entry, heldout, _ = release
    data = _squares(tmp / "data5", n=5)
    split = tmp / "split.json"
    split.write_text(json.dumps({"val": ["case3"], "test": ["case1", "case2"]}))
    result = train("unet", data, tmp / "baseline-run", preset="covid-ct", device="cpu",
                   recipe_overrides={"epochs": 1, "batch_size": 2, "size": [32, 32], "split": str(split),
                                     "model_config": {"base_width": 4, "depth": 2}})
    run = evaluate_run(result.out_dir)
    assert sorted(p.case for p in run.pairs) == ["case1", "case2"] and run.heldout.summary["images"] == 2
    add_baseline(tmp / "weights", entry["file"], {"model": "unet", "heldout": run.heldout.summary})
    write_release(tmp / "run" / "best.pt", tmp / "weights", name="unet-covid-ct", heldout=heldout,
                  info={"data": "squares", "budget": "again"})
    (f,) = json.loads((tmp / "weights" / "manifest.json").read_text())["files"]
    kept = f["baseline"]["heldout"]
    assert f["training"]["budget"] == "again"
    assert kept["images"] == 2 and kept["dice"] == pytest.approx(run.heldout.summary["dice"])
    with pytest.raises(ValueError, match="not in"):
        add_baseline(tmp / "weights", "other.pt", {})


def test_predict_without_checkpoint_uses_the_shipped_weights_and_says_so(release):
    tmp, data, entry, _, env = release
    out = tmp / "out"
    r = lesionseg("predict", "--model", "unet", "--preset", "covid-ct", "--no-csv", data / "images", "-o", out,
                  env=env)
    assert r.returncode == 0, r.stderr
    assert "using the shipped weights" in r.stderr and "unet-covid-ct.pt" in r.stderr
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case1_1_label.png")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "masks" / "case1_1.png"))) > 0
    assert np.array_equal(lab > 0, ref)


def test_an_output_rule_chosen_after_release_applies_to_the_shipped_bytes(release, monkeypatch):
    """A seed threshold set beside a shipped file in its manifest entry (the file itself is
    never rewritten) is used by ``lesionseg predict`` and the Predictor for that file and
    for a byte-identical copy elsewhere (downloaded, imported, moved), not for other
    weights; only output rules are taken from the manifest."""
    tmp, data, entry, _, env = release
    folder = tmp / "weights"
    manifest = releases.release_manifest(folder)
    manifest["files"][0]["outputs"] = {"seed_threshold": 0.95, "activation": "softmax"}
    write_manifest(folder, manifest)
    img = np.full((48, 64), 40, np.uint8)
    img[10:22, 4:20] = 250      # probability ≈ 1 under the thresholding network
    img[26:40, 30:50] = 200     # ≈ 0.8: above the threshold, below the seed threshold
    sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp / "two.png"))

    def labels(*extra):
        out = tmp / f"out{len(extra)}"
        r = lesionseg("predict", "--model", "unet", "--preset", "covid-ct", "--no-csv", *extra, tmp / "two.png",
                      "-o", out, env=env)
        assert r.returncode == 0, r.stderr
        assert ("keeping only lesions with a pixel at probability ≥ 0.95" in r.stderr) == (not extra)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "two_label.png")))
    ruled = labels()
    assert ruled[15, 10] > 0 and ruled[30, 40] == 0
    every = labels("--seed-threshold", "0")
    assert every[15, 10] > 0 and every[30, 40] > 0
    r = lesionseg("predict", "--model", "unet", "--preset", "covid-ct", "--seed-threshold", "1.5", tmp / "two.png",
                  "-o", tmp / "bad", env=env)
    assert r.returncode == 2 and "--seed-threshold" in r.stderr and not (tmp / "bad").exists()
    r = lesionseg("predict", "--model", "unet", "--preset", "covid-ct", "--seed-threshold", "0.3", tmp / "two.png",
                  "-o", tmp / "bad", env=env)
    assert r.returncode == 2 and "seed threshold 0.3 must be above the threshold 0.5" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp / "bad").exists()

    monkeypatch.setenv(releases.RELEASE_ENV_VAR, str(folder))
    monkeypatch.setenv(weights.ENV_VAR, env[weights.ENV_VAR])
    shipped = Predictor(str(folder / entry["file"]), device="cpu")
    assert shipped.seed_threshold == 0.95 and shipped.outputs.activation == "sigmoid"
    assert shipped.predict_image(img).info["seed_threshold"] == 0.95
    # a threshold above the seed threshold makes the rule moot: every region reaches it
    assert shipped.predict_image(img, threshold=0.97).info["seed_threshold"] is None
    shipped_bytes = (folder / entry["file"]).read_bytes()
    copy = tmp / "elsewhere.pt"
    copy.write_bytes(shipped_bytes)
    assert Predictor(str(copy), device="cpu").seed_threshold == 0.95
    imported = weights.import_checkpoint(copy, name="my-copy")
    assert Predictor(imported.path, device="cpu").seed_threshold == 0.95
    # other bytes of the same size (fine-tuned weights, say) are not the release
    altered = bytearray(shipped_bytes)
    altered[-1] ^= 1
    other = tmp / "other.pt"
    other.write_bytes(bytes(altered))
    assert releases.shipped_entry(other) is None and releases.shipped_entry(copy)["file"] == entry["file"]


def test_bf16_agreement_recorded_after_release_decides_auto_and_keeps_the_card(tmp_path, monkeypatch):
    """scripts/record_bf16_agreement.py: a release made without the bf16 record gets it
    later from its own held-out test cases (found through the file's provenance), in the
    manifest beside the untouched file; the card's bf16 row is replaced and its other lines
    kept; the Predictor's ``auto`` then reads the record for those bytes."""
    from LesionSegLib.inference.runtime import cpu_features
    from LesionSegLib.training import train
    from LesionSegLib.training.release import evaluate_run
    tmp = tmp_path
    data = _squares(tmp / "data5", n=5)
    split = tmp / "split.json"
    split.write_text(json.dumps({"val": ["case3"], "test": ["case1", "case2", "case4"]}))
    result = train("unet", data, tmp / "run5", preset="covid-ct", device="cpu",
                   recipe_overrides={"epochs": 1, "batch_size": 2, "size": [32, 32], "split": str(split),
                                     "model_config": {"base_width": 4, "depth": 2}})
    folder = tmp / "release5"
    entry = write_release(Path(result.out_dir) / "best.pt", folder, name="unet-squares",
                          heldout=evaluate_run(result.out_dir).heldout, info={"data": "squares", "budget": "1 epoch"})
    card = folder / entry["card"]
    card.write_text("# card\n\n| CPU bf16 (`precision=auto`) | not measured |\n| budget | 1 epoch |\n\n- a note\n")
    sha = entry["sha256"]

    def record(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "record_bf16_agreement.py"), *args],
                              capture_output=True, text=True, timeout=240,
                              env=dict(os.environ, OMP_NUM_THREADS="1", **{releases.RELEASE_ENV_VAR: str(folder)}))
    r = record("unet-squarez")
    assert r.returncode != 0 and "no release file unet-squarez.pt" in r.stderr and "unet-squares" in r.stderr
    r = record("unet-squares", "--all")
    assert r.returncode == 0, r.stderr
    (f,) = releases.release_manifest(folder)["files"]
    rec = f["precision_agreement"]
    assert rec["bf16"]["images"] == 3 and rec["images"] == "held-out test images"
    assert rec["bf16_compute"] == ("native" if cpu_features()["native_bf16"] else "emulated")
    assert 0.0 <= rec["bf16"]["dice"] <= 1.0 and rec["bf16"]["agrees"] == (
        rec["bf16"]["dice"] >= 0.99 and rec["bf16"]["count_mismatches"] == 0)
    assert f["sha256"] == sha == weights.sha256_file(folder / "unet-squares.pt")  # the file is not rewritten
    text = card.read_text()
    assert "not measured" not in text and f"on 3 held-out images ({rec['bf16_compute']} bf16" in text
    assert text.startswith("# card\n") and "| budget | 1 epoch |" in text and text.endswith("- a note\n")
    # auto follows the record for these bytes, on a CPU with native bf16 (simulated)
    import torch
    from LesionSegLib.inference import runtime
    monkeypatch.setenv(releases.RELEASE_ENV_VAR, str(folder))
    monkeypatch.setattr(runtime, "cpu_autocast_dtype", lambda features=None: torch.bfloat16)
    shipped = folder / "unet-squares.pt"
    assert Predictor(str(shipped), device="cpu").precision == ("bf16" if rec["bf16"]["agrees"] else "fp32")
    for dice, chosen in ((0.5, "fp32"), (0.999, "bf16")):
        manifest = releases.release_manifest(folder)
        manifest["files"][0]["precision_agreement"]["bf16"].update(dice=dice, min_dice=dice, count_mismatches=0)
        write_manifest(folder, manifest)
        assert Predictor(str(shipped), device="cpu").precision == chosen


def test_a_damaged_shipped_file_is_refused(release):
    tmp, data, entry, _, env = release
    path = tmp / "weights" / entry["file"]
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    r = lesionseg("predict", "--model", "unet", "--preset", "covid-ct", data / "images", "-o", tmp / "out", env=env)
    assert r.returncode == 1 and "damaged or was replaced" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp / "out").exists()


def test_no_weights_for_a_preset_is_a_clear_error_and_random_weights_are_explicit(release):
    tmp, data, _, _, env = release
    r = lesionseg("predict", "--model", "unet", "--preset", "polyp", data / "images", "-o", tmp / "out", env=env)
    assert r.returncode == 1
    assert "no weights for U-Net (polyp)" in r.stderr and "ships U-Net weights for: covid-ct" in r.stderr
    assert "--random-weights" in r.stderr and not (tmp / "out").exists()
    # a preset the network does not have is named as the mistake, with the ones it has
    r = lesionseg("predict", "--model", "unet", "--preset", "polip", data / "images", "-o", tmp / "out", env=env)
    assert r.returncode == 1 and "no preset 'polip'" in r.stderr and "polyp" in r.stderr
    assert "no weights" not in r.stderr and not (tmp / "out").exists()
    # explicit random weights even where shipped ones exist
    r = lesionseg("predict", "--model", "unet", "--preset", "covid-ct", "--random-weights", "--no-csv",
                  data / "images", "-o", tmp / "out", env=env)
    assert r.returncode == 0 and "random weights" in r.stderr and "shipped" not in r.stderr


def test_installed_weights_take_precedence_over_shipped_ones(release, monkeypatch):
    tmp, _, _, _, env = release
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert weights.find("unet", "covid-ct").kind == "release"
    own = checkpoint.save(tmp / "mine.pt", shifted_threshold_unet(dy=0, dx=0), preset="covid-ct")
    weights.import_checkpoint(own)
    assert weights.find("unet", "covid-ct").kind != "release"


# ------------------------------------------------------------------ the repository's weights/
MANIFEST = ROOT / "weights" / "manifest.json"


def test_repository_release_files_match_their_manifest_and_cards():
    manifest = releases.release_manifest(ROOT / "weights")
    total = 0
    for f in manifest["files"]:
        path = ROOT / "weights" / f["file"]
        assert path.is_file(), f"{f['file']} listed in the manifest but missing"
        assert weights.sha256_file(path) == f["sha256"] and path.stat().st_size == f["size"]
        assert (ROOT / "weights" / f["card"]).is_file()
        total += f["size"]
    assert total <= 150e6, f"shipped weights are {total / 1e6:.1f} MB (limit 150 MB)"


def _release_entry(name):
    for f in releases.release_manifest(ROOT / "weights")["files"]:
        if f["file"] == f"{name}.pt" and (ROOT / "weights" / f["file"]).is_file():
            return f
    pytest.skip(f"weights/{name}.pt is not in this checkout")


#: shipped weights checked against their card: (release, network, preset, data folder of a held-out row, floor)
REPRODUCED = [
    ("m2snet-polyp", "m2snet", "polyp", lambda row: row["case"].split("/")[0], 0.4),  # card: 0.563 over 177 images
    ("m2snet-breast-us", "m2snet", "breast-us", lambda row: "breast-busi", 0.4),
]


@pytest.mark.parametrize("name, model, preset, folder_of, floor", REPRODUCED, ids=[r[0] for r in REPRODUCED])
def test_shipped_weights_reproduce_their_card_through_lesionseg_predict(tmp_path, name, model, preset, folder_of,
                                                                        floor):
    """``lesionseg predict --model M --preset P`` without a checkpoint, on every 20th held-out
    image of the card that has a lesion and every 5th without one: the same per-image Dice as
    weights/<name>.heldout.json (the release's output rule included), and a mean above a
    floor on the lesion images."""
    _release_entry(name)
    rows = json.loads((ROOT / "weights" / f"{name}.heldout.json").read_text())
    rows = [r for r in rows if r["reference_pixels"] > 0][::20] + [r for r in rows if not r["reference_pixels"]][::5]
    folders = {folder_of(r) for r in rows}
    if not all((SHARED_DATA / f).is_dir() for f in folders):
        pytest.skip(f"../shared/data {', '.join(sorted(folders))} absent")
    images, masks = [], {}
    for r in rows:
        pair = next(p for p in folder_pairs(SHARED_DATA / folder_of(r)) if p.image.name == r["image"])
        images.append(pair.image)
        masks[pair.image.stem] = read_mask(pair.mask) > 0  # the reader the card's scores used
    out = tmp_path / "out"
    r = lesionseg("predict", "--model", model, "--preset", preset, "--device", "cpu", "--precision", "fp32",
                  *images, "-o", out, env={weights.ENV_VAR: str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{name}.pt" in r.stdout + r.stderr
    dices = []
    for row in rows:
        stem = Path(row["image"]).stem
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_label.png"))) > 0
        gt = masks[stem]
        dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum()) if gt.any() or pred.any() else 1.0
        assert dice == pytest.approx(row["dice"], abs=0.01), (row["image"], dice, row["dice"])
        if gt.any():
            dices.append(dice)
    assert np.mean(dices) >= floor, dices
