"""Readers and splits of the release data sets on real files: per-class mask files as
multi-label channels (IDRiD), case tables with a header (CVC-ClinicDB's sequences.csv),
several folders trained as one set (Kvasir + ClinicDB), fixed split files with held-out
test cases, random tiles cut from the image at its resolution of use, and the shared data
itself (skipped when ../shared/data is absent)."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LesionSegLib import models
from LesionSegLib.data import DataError, folder_pairs
from LesionSegLib.data.dataset import SegmentationDataset
from LesionSegLib.data.sources import FolderSource, target_spec
from LesionSegLib.data.folders import class_mask_pairs, has_class_masks
from LesionSegLib.data.splits import explicit_split
from LesionSegLib.training.data_prep import class_suffixes, prepare_data

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, arr: np.ndarray, rgb: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=rgb), str(path))
    return path


def _fundus_folder(root: Path, n: int = 3, h: int = 60, w: int = 90) -> Path:
    """IDRiD-like: RGB images and one 0/255 file per class (EX, HE, MA, SE, plus OD),
    with an MA inside the exudate (overlapping classes) and an all-zero SE file."""
    yy, xx = np.mgrid[:h, :w]
    for i in range(1, n + 1):
        ex = (yy - 20) ** 2 + (xx - 30) ** 2 <= 64
        he = (yy - 40) ** 2 + (xx - 60) ** 2 <= 25
        ma = (yy - 20) ** 2 + (xx - 30) ** 2 <= 4  # inside the exudate
        od = (yy - 30) ** 2 + (xx - 80) ** 2 <= 36
        img = np.stack([60 + 120 * ex, 40 + 60 * he, 30 + 0 * xx], -1).astype(np.uint8)
        _png(root / "images" / f"IDRiD_{i:02d}.png", img, rgb=True)
        for name, m in (("EX", ex), ("HE", he), ("MA", ma), ("SE", np.zeros_like(ex)), ("OD", od)):
            _png(root / "masks" / f"IDRiD_{i:02d}_{name}.png", (m * 255).astype(np.uint8))
    return root


def _lseg_spec():
    p = models.preset("lseg", "fundus-dr")
    return p, target_spec("lseg", p)


def test_class_suffixes_come_from_the_preset_class_names():
    _, spec = _lseg_spec()
    assert class_suffixes(spec) == ("EX", "HE", "MA", "SE")


def test_per_class_mask_files_become_overlapping_channels(tmp_path):
    root = _fundus_folder(tmp_path / "fundus")
    preset, spec = _lseg_spec()
    assert has_class_masks(root, class_suffixes(spec)) and not has_class_masks(root, ("XX",))
    pairs = class_mask_pairs(root, class_suffixes(spec), case_regex="^(.*)$")
    assert [p.case for p in pairs] == ["IDRiD_01", "IDRiD_02", "IDRiD_03"]
    assert [m.name for m in pairs[0].mask] == ["IDRiD_01_EX.png", "IDRiD_01_HE.png", "IDRiD_01_MA.png",
                                              "IDRiD_01_SE.png"]  # OD is not a lesion channel
    src = FolderSource(pairs, preset["input"], spec)
    src.check()
    _, lab, _, _ = src.load(0)
    assert lab.shape == (4, 60, 90) and lab.dtype == np.uint8
    # the MA pixels stay MA although they lie inside the exudate
    assert lab[2].sum() == 13 and (lab[0][lab[2] > 0] == 1).all() and lab[3].sum() == 0
    sample = SegmentationDataset(src, spec, (48, 64), None, "nearest")[0]
    assert sample["mask"].shape == (4, 48, 64)
    assert (sample["mask"][2] * sample["mask"][0]).sum() > 0  # overlap survives the resize


def test_a_missing_class_file_is_named(tmp_path):
    root = _fundus_folder(tmp_path / "fundus", n=2)
    (root / "masks" / "IDRiD_02_HE.png").unlink()
    with pytest.raises(DataError, match="IDRiD_02_HE"):
        class_mask_pairs(root, ("EX", "HE", "MA", "SE"))


def test_tiles_are_random_windows_at_the_resolution_of_use(tmp_path):
    """A tile of 16x16 network pixels from an image used at 30x45 (half of 60x90) covers
    32x32 image pixels; tiles differ between augmentation seeds, always stay inside the
    image, and validation (no seed) gets the whole image at the resolution of use."""
    root = _fundus_folder(tmp_path / "fundus", n=1)
    preset, spec = _lseg_spec()
    src = FolderSource(class_mask_pairs(root, class_suffixes(spec)), preset["input"], spec)
    src.check()
    ds = SegmentationDataset(src, spec, (16, 16), {"hflip": 0.0}, "nearest", fit="tile", crop_from=(30, 45))
    tiles = [ds[(0, seed, (16, 16))] for seed in range(12)]
    assert all(t["image"].shape == (3, 16, 16) for t in tiles)
    # a tile is a window of the image: no zero padding from outside (the image has no 0
    # after normalisation only inside; check the mask-derived channel sums vary instead)
    ex_area = [float(t["mask"][0].sum()) for t in tiles]
    assert len(set(ex_area)) > 1
    whole = ds[0]
    assert whole["image"].shape == (3, 30, 45)
    assert float(whole["mask"][0].sum()) == pytest.approx(float(disc_area(30, 45)), rel=0.35)
    with pytest.raises(ValueError, match="crop_from"):
        SegmentationDataset(src, spec, (16, 16), None, "nearest", fit="tile")


def disc_area(h, w):
    # the exudate disc (radius 8 at full 60x90) at half resolution: radius 4
    return np.pi * 16


def test_tile_centre_offsets_are_inside_the_image():
    from LesionSegLib.data.dataset import warp
    x = torch.arange(20 * 30, dtype=torch.float32).reshape(1, 20, 30)
    # a 10x10 window moved to the top-left corner shows the top-left pixels, exactly
    out = warp(x, (10, 10), field_hw=(10, 10), centre=(-5.0, -10.0), mode="nearest")
    assert torch.equal(out[0], x[0, :10, :10])


def test_case_table_with_a_header_picks_the_sequence_column(tmp_path):
    for i in range(1, 7):
        m = np.zeros((32, 32), np.uint8)
        m[8:16, 8:16] = 255
        _png(tmp_path / "clinic" / "images" / f"{i}.png", (m // 2 + 40).astype(np.uint8))
        _png(tmp_path / "clinic" / "masks" / f"{i}.png", m)
    (tmp_path / "clinic" / "sequences.csv").write_text(
        "file,frame,sequence\n" + "".join(f"{i}.png,{i},{1 + (i > 3)}\n" for i in range(1, 7)))
    pairs = folder_pairs(tmp_path / "clinic")
    assert [p.case for p in pairs] == ["1", "1", "1", "2", "2", "2"]


def _two_folders(tmp_path):
    from training_helpers import write_folder
    a = write_folder(tmp_path / "kvasir", 4, 32, 3, prefix="k")
    b = write_folder(tmp_path / "clinic", 4, 32, 3, prefix="c")
    return a, b


def test_several_folders_train_as_one_set_with_prefixed_cases_and_a_fixed_split(tmp_path):
    a, b = _two_folders(tmp_path)
    preset = models.preset("m2snet", "polyp")
    spec = target_spec("m2snet", preset)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"val": ["kvasir/k1"], "test": ["clinic/c2", "clinic/c3"]}))
    recipe = {"split": str(split), "case_regex": None, "number_block": 10, "slices": {}}
    prepared = prepare_data([str(a), str(b)], "m2snet", preset, preset["input"], spec, recipe, 0)
    d = prepared.description
    assert d["val_cases"] == ["kvasir/k1"]
    assert d["split"]["held_out_test_cases"] == ["clinic/c2", "clinic/c3"]
    assert "clinic/c2" not in d["train_cases"] and "clinic/c3" not in d["train_cases"]
    assert d["train_items"] == 5 and d["val_items"] == 1
    assert isinstance(d["root"], list) and len(d["root"]) == 2


def test_a_split_naming_an_unknown_case_is_refused(tmp_path):
    a, _ = _two_folders(tmp_path)
    items = folder_pairs(a)
    with pytest.raises(DataError, match="does not have: nope"):
        explicit_split(items, {"val": ["nope"]})
    with pytest.raises(DataError, match="both val and test"):
        explicit_split(items, {"val": [items[0].case], "test": [items[0].case]})
    with pytest.raises(DataError, match="'val' list"):
        explicit_split(items, {"test": []})


def test_lseg_trains_on_per_class_files_with_tiles_and_validates_per_channel(tmp_path):
    """End to end through the trainer: per-class files, tiles, a fixed split; the
    validation Dice is the per-channel Dice (overlaps allowed) and the checkpoint's card
    records the resolution of use, not the tile size."""
    from LesionSegLib.checkpoint import load
    from LesionSegLib.training import train
    root = _fundus_folder(tmp_path / "fundus", n=3, h=64, w=96)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"val": ["IDRiD_02"], "test": ["IDRiD_03"]}))
    result = train("lseg", root, tmp_path / "run", recipe_overrides={
        "case_regex": "^(.*)$", "split": str(split), "size": [32, 32], "tile_from": [48, 64], "epochs": 1,
        "epoch_length": 2, "batch_size": 1, "accumulate": 1, "checkpoint_every_steps": 0,
        "optimizer": {"name": "adam", "lr": 1e-4}, "schedule": {"name": "constant"}})
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["val_cases"] == ["IDRiD_02"] and data["train_cases"] == ["IDRiD_01"]
    assert "one mask file per class" in data["case_rule"]
    assert 0.0 <= result.history[-1]["val_dice"] <= 1.0
    ck = load(result.best_checkpoint)
    assert ck.card["preset"]["input"]["size"] == [48, 64]


# ------------------------------------------------------------------ the shared data sets
IDRID = SHARED_DATA / "fundus-idrid20"
CLINIC = SHARED_DATA / "polyp-clinicdb"
KVASIR = SHARED_DATA / "polyp-kvasir256"


@pytest.mark.skipif(not CLINIC.is_dir(), reason="../shared/data/polyp-clinicdb absent")
def test_real_clinicdb_cases_are_its_video_sequences():
    pairs = folder_pairs(CLINIC)
    cases = {p.case for p in pairs}
    assert len(pairs) == 531 and len(cases) == 25
    by_case = {}
    for p in pairs:
        by_case.setdefault(p.case, []).append(p)
    assert max(len(v) for v in by_case.values()) <= 26


@pytest.mark.skipif(not (CLINIC.is_dir() and KVASIR.is_dir()), reason="../shared/data polyp sets absent")
def test_release_polyp_split_holds_out_whole_sequences():
    split = json.loads((ROOT / "weights" / "splits" / "polyp.json").read_text())
    pairs = ([p.case for p in folder_pairs(KVASIR)] and
             [f"polyp-kvasir256/{p.case}" for p in folder_pairs(KVASIR)]
             + [f"polyp-clinicdb/{p.case}" for p in folder_pairs(CLINIC)])
    assert set(split["val"]) <= set(pairs) and set(split["test"]) <= set(pairs)
    assert not set(split["val"]) & set(split["test"])
    assert sum(c.startswith("polyp-clinicdb/") for c in split["test"]) == 4


@pytest.mark.skipif(not IDRID.is_dir(), reason="../shared/data/fundus-idrid20 absent")
def test_real_idrid_reads_four_lesion_channels():
    _, spec = _lseg_spec()
    pairs = class_mask_pairs(IDRID, class_suffixes(spec), case_regex="^(.*)$")
    assert len(pairs) == 15
    table = {r.split(",")[0].split(".")[0]: r.split(",") for r in (IDRID / "lesions.csv").read_text().split()[1:]}
    # SE present in 4 images (lesions.csv), its all-zero files read as empty channels
    from LesionSegLib.data.images import read_mask
    p = next(p for p in pairs if p.key == "IDRiD_03")
    se = read_mask(p.mask[3])
    assert int(se.sum()) == int(table["IDRiD_03"][4])
