"""Bad input and faults through ``LesionSegLogic`` with slicer-core's real MRML: a clear
error every time, the user's segmentation exactly as it was after any failure, and
batch outputs that are whole or absent. Skipped without slicer-core."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from helpers import require_slicer_core  # noqa: E402

slicer = require_slicer_core()

import SimpleITK as sitk  # noqa: E402
from helpers import lesion_volume  # noqa: E402

from LesionSegLib.slicer import bridge  # noqa: E402
from LesionSegLib.fileio import is_temporary_name  # noqa: E402

from helpers import THRESHOLD_PRESET as PRESET  # noqa: E402


def _state(seg, vol):
    out = {}
    for sid in bridge.segment_ids(seg):
        s = seg.GetSegmentation().GetSegment(sid)
        out[sid] = (s.GetName(), tuple(round(c, 6) for c in s.GetColor()), s.GetTerminology(),
                    bridge.segment_mask(seg, sid, vol).tobytes())
    return out


def _volume_node(scene, image, name="vol"):
    return bridge.sitk_to_volume(image, scene, name)


@pytest.fixture()
def user_work(scene, logic, unet_checkpoint):
    """A volume with a user's segmentation: the network's lesion plus a hand-drawn segment."""
    image, lesion = lesion_volume()
    vol = _volume_node(scene, image)
    seg = logic.segment(vol, model="unet", checkpoint=unet_checkpoint, preset=PRESET)
    mine = bridge.add_class_segment(seg, {"value": 7, "name": "my drawing", "color": [0, 0, 255]})
    drawn = np.zeros(lesion.shape, bool)
    drawn[:2, :5, :5] = True
    bridge.set_segment_mask(seg, mine, drawn, vol)
    return vol, seg, image, lesion


def test_one_nan_voxel_no_longer_empties_the_users_lesion(scene, logic, unet_checkpoint, user_work):
    vol, seg, image, lesion = user_work
    before = _state(seg, vol)
    arr = sitk.GetArrayFromImage(image)
    arr[0, 0, 0] = np.nan
    nan_image = sitk.GetImageFromArray(arr)
    nan_image.CopyInformation(image)
    nan_vol = _volume_node(scene, nan_image, "with NaN")
    messages = []
    logic.log = messages.append
    logic.segment(nan_vol, seg, model="unet", checkpoint=unet_checkpoint, preset=PRESET)
    # the same lesion as without the NaN voxel: every segment exactly as before
    assert _state(seg, vol) == before
    assert any("1 voxel(s) of the input are NaN or infinite" in m for m in messages)


@pytest.mark.parametrize("kind", ["nan threshold", "threshold 1", "negative threshold", "nan size", "all NaN",
                                  "zero spacing", "negative spacing", "no image data", "4-channel preset"])
def test_bad_input_is_one_clear_error_and_the_segmentation_is_unchanged(scene, logic, unet_checkpoint,
                                                                        user_work, tmp_path, kind):
    vol, seg, image, lesion = user_work
    before = _state(seg, vol)
    nodes = scene.GetNumberOfNodes()
    target, kwargs, text = vol, {}, None
    if kind == "nan threshold":
        kwargs, text = {"threshold": float("nan")}, "threshold must be a finite number"
    elif kind == "threshold 1":
        kwargs, text = {"threshold": 1.0}, r"threshold must be in \(0, 1\)"
    elif kind == "negative threshold":
        kwargs, text = {"threshold": -0.5}, r"threshold must be in \(0, 1\)"
    elif kind == "nan size":
        kwargs, text = {"minLesionSizeMm3": float("nan")}, "minimum lesion size must be a finite number"
    elif kind == "all NaN":
        blank = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(image).shape, np.nan, np.float32))
        blank.CopyInformation(image)
        target, text = _volume_node(scene, blank, "blank"), "no finite values"
    elif kind in ("zero spacing", "negative spacing"):
        target = _volume_node(scene, image, "bad spacing")
        target.SetSpacing(0.9, 0.0 if kind == "zero spacing" else -1.1, 3.0)
        text = r"spacing \(0.9, (0|-1.1), 3\).*positive"
    elif kind == "no image data":
        target, text = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), "holds no image data"
    elif kind == "4-channel preset":
        kwargs, text = {"preset": "polyp"}, "channel"
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(Exception, match=text) as e:
        logic.segment(target, seg, model="unet", checkpoint=unet_checkpoint, **{"preset": PRESET, **kwargs})
    msg = str(e.value)
    assert "\n" not in msg.strip() and "[[" not in msg and "weights_only" not in msg
    assert _state(seg, vol) == before and scene.GetNumberOfNodes() == nodes


def test_batch_refuses_cut_short_files_and_name_clashes_and_writes_only_whole_files(logic, unet_checkpoint,
                                                                                     tmp_path):
    image, lesion = lesion_volume()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    sitk.WriteImage(image, str(a / "case.nii.gz"), True)
    sitk.WriteImage(image, str(b / "case.nii.gz"), True)
    sitk.WriteImage(image, str(a / "cut.nii.gz"), True)
    data = (a / "cut.nii.gz").read_bytes()
    (a / "cut.nii.gz").write_bytes(data[: len(data) * 3 // 4])
    arr = sitk.GetArrayFromImage(image)
    arr[2, 3, 4] = np.inf
    inf = sitk.GetImageFromArray(arr)
    inf.CopyInformation(image)
    sitk.WriteImage(inf, str(a / "inf.nrrd"))
    out = tmp_path / "out"
    summary = logic.segmentFiles([a / "case.nii.gz", b / "case.nii.gz", a / "cut.nii.gz", a / "inf.nrrd"], out,
                                 model="unet", checkpoint=unet_checkpoint, preset=PRESET, outputFormat="nii.gz")
    failed = {f["input"]: f["error"] for f in summary.failed}
    assert set(failed) == {str(b / "case.nii.gz"), str(a / "cut.nii.gz")}
    assert "would have the same name" in failed[str(b / "case.nii.gz")]
    assert "cut short" in failed[str(a / "cut.nii.gz")]
    assert not (out / "cut_lesionseg.nii.gz").exists()
    assert [s["input"] for s in summary.succeeded] == [str(a / "case.nii.gz"), str(a / "inf.nrrd")]
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "inf_lesionseg.nii.gz"))) > 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_lesionseg.nii.gz"))) > 0
    expected[2, 3, 4] = True            # +Inf is the brightest voxel; nothing else changes
    assert np.array_equal(got, expected)
    assert json.loads((out / "lesionseg-summary.json").read_text())["failed"]
    assert not [p.name for p in out.iterdir() if is_temporary_name(p.name)]


def test_batch_on_a_full_disk_records_failures_and_leaves_no_truncated_file(logic, unet_checkpoint, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rng = np.random.default_rng(0)
        # 10 % of the voxels, at random, are lesion: a label map that does not compress
        noisy = np.where(rng.random((12, 128, 128)) < 0.1, 1000.0, 100.0).astype(np.float32)
        image = sitk.GetImageFromArray(noisy)
        sitk.WriteImage(image, str(tmp_path / "noisy.nrrd"))
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 4 * 1024))
        summary = logic.segmentFiles([tmp_path / "noisy.nrrd"], disk / "out", model="unet",
                                     checkpoint=unet_checkpoint, preset=PRESET, outputFormat="nrrd")
        assert summary.failed and "no space left" in summary.failed[0]["error"]
        for p in (disk / "out").iterdir():
            assert not is_temporary_name(p.name)
            if p.suffix == ".nrrd":
                sitk.ReadImage(str(p))
    except OSError as e:    # the summary itself may not fit: then it says so, and nothing is half-written
        assert "no space left" in str(e)
        assert not [p for p in (disk / "out").iterdir() if is_temporary_name(p.name)]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
