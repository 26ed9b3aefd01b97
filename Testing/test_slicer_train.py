"""LesionSegLogic.train with scene nodes, driving the real trainer (tiny U-Net, a few
steps), and its cancellation. Skipped without slicer-core."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import require_slicer_core  # noqa: E402

slicer = require_slicer_core()

from helpers import lesion_volume  # noqa: E402

from LesionSegLib import checkpoint  # noqa: E402
from LesionSegLib.slicer import bridge  # noqa: E402
from LesionSegLib.inference import CancelToken, Cancelled  # noqa: E402
from LesionSegLib.slicer.logic import LesionSegLogic  # noqa: E402

TINY = {"batch_size": 4, "size": [32, 32], "epoch_length": 2, "num_workers": 0,
        "model_config": {"base_width": 4, "depth": 2}}


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONSEG_CACHE", str(tmp_path / "cache"))
    scene = bridge.new_scene()
    pairs = []
    for i in range(3):
        image, lesion = lesion_volume(seed=i, size_xyz=(48, 40, 6))
        vol = bridge.sitk_to_volume(image, scene, f"case{i}")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"truth{i}")
        bridge.prepare_segmentation(seg, vol)
        sid = bridge.add_class_segment(seg, {"value": 1, "name": "Stroke lesion", "color": [255, 0, 0]})
        bridge.set_segment_mask(seg, sid, lesion, vol)
        pairs.append((vol, seg))
    yield LesionSegLogic(scene=scene), pairs
    scene.Clear(1)


def test_train_from_scene_pairs_installs_weights_that_segment(setup, tmp_path):
    logic, pairs = setup
    seen = []
    result = logic.train(pairs, tmp_path / "run", model="unet", preset="stroke-dwi", epochs=1, device="cpu",
                         recipeOverrides=TINY, progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0
    ck = checkpoint.load(result.best_checkpoint)
    assert ck.name == "unet" and ck.provenance["data"]["kind"] == "memory"
    assert sorted(ck.provenance["data"]["train_cases"] + ck.provenance["data"]["val_cases"]) == \
        ["case0", "case1", "case2"]
    (entry,) = logic.installedWeights("unet")
    assert entry.preset == "stroke-dwi" and entry.id.startswith("unet/unet-stroke-dwi-")
    # the installed weights are what segment() now uses by default
    seg = logic.segment(pairs[0][0], model="unet", preset="stroke-dwi")
    assert seg.GetAttribute("LesionSeg.checkpoint") == entry.path
    assert bridge.segment_ids(seg)


def test_train_cancel_raises_and_installs_nothing(setup, tmp_path):
    logic, pairs = setup
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        logic.train(pairs, tmp_path / "run", model="unet", preset="stroke-dwi", epochs=1, device="cpu",
                    recipeOverrides=TINY, cancel=token)
    assert logic.installedWeights() == []


def test_train_reports_segments_that_do_not_match_the_classes(setup, tmp_path):
    logic, pairs = setup
    vol, seg = pairs[0]
    seg.GetSegmentation().GetNthSegment(0).SetName("something else")
    extra = bridge.add_class_segment(seg, {"value": 2, "name": "other", "color": [0, 0, 255]})
    bridge.set_segment_mask(seg, extra, np.zeros(bridge.volume_array(vol).shape, bool), vol)
    with pytest.raises(ValueError, match="no segment for class 'Stroke lesion'"):
        logic.train([(vol, seg)], tmp_path / "run", model="unet", preset="stroke-dwi", epochs=1,
                    recipeOverrides=TINY)
    with pytest.raises(ValueError, match="no training pairs"):
        logic.train([], tmp_path / "run", model="unet")
