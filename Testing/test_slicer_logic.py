"""LesionSegLogic with slicer-core's real MRML and the real Predictor.

The network is a registered U-Net whose weights are set by hand so that its output is an
intensity threshold (Testing/helpers.py): the tests know exactly where the lesion
must be found, on any orientation, without training. Skipped without slicer-core."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import require_slicer_core  # noqa: E402

slicer = require_slicer_core()

import SimpleITK as sitk  # noqa: E402
from helpers import lesion_volume  # noqa: E402

from LesionSegLib import checkpoint, models  # noqa: E402
from LesionSegLib.slicer import bridge  # noqa: E402
from LesionSegLib.inference import CancelToken, Cancelled  # noqa: E402
from LesionSegLib.inference.predictor import Prediction  # noqa: E402
from LesionSegLib.slicer.logic import LesionSegError, LesionSegLogic  # noqa: E402

from helpers import THRESHOLD_PRESET as PRESET  # noqa: E402


def _dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _state(seg, vol):
    """Everything a user sees of a segmentation: ids, names, colours, tags, voxels."""
    out = {}
    for sid in bridge.segment_ids(seg):
        s = seg.GetSegmentation().GetSegment(sid)
        out[sid] = (s.GetName(), tuple(round(c, 6) for c in s.GetColor()), s.GetTerminology(),
                    bridge.segment_mask(seg, sid, vol).tobytes())
    return out


def _oblique_volume_node(scene, tmp_path, left_handed=False):
    """The synthetic oblique volume as a user gets it: a NIfTI file loaded by Slicer's
    reader. ``left_handed``: the file's direction has determinant −1 (as ISLES'22's);
    Slicer's reader then reverses the slice axis, so the lesion mask is loaded the same
    way to have it on the node's grid."""
    image, lesion = lesion_volume()
    if left_handed:
        d = np.array(image.GetDirection()).reshape(3, 3)
        d[:, 2] *= -1
        image.SetDirection(tuple(d.reshape(-1)))
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(image, str(path))
    vol = bridge.load_volume(scene, path)
    if left_handed:
        truth = sitk.GetImageFromArray(lesion.astype(np.uint8))
        truth.CopyInformation(image)
        sitk.WriteImage(truth, str(tmp_path / "truth.nii.gz"))
        lesion = bridge.volume_array(bridge.load_volume(scene, tmp_path / "truth.nii.gz", labelmap=True)) > 0
    return vol, image, lesion, path


@pytest.mark.parametrize("left_handed", [False, True], ids=["right-handed", "left-handed"])
def test_segment_oblique_volume_finds_lesion_with_card_metadata_and_round_trips(scene, logic, unet_checkpoint,
                                                                                 tmp_path, left_handed):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path, left_handed)
    seen = []
    seg = logic.segment(vol, model="unet", checkpoint=unet_checkpoint, preset=PRESET,
                        progress=lambda f, m: seen.append(f))
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    cls = models.preset("unet", PRESET)["classes"][0]
    ids = bridge.segment_ids(seg)
    assert len(ids) == 1
    segment = seg.GetSegmentation().GetSegment(ids[0])
    assert segment.GetName() == cls["name"] == "Stroke lesion"
    assert np.allclose(segment.GetColor(), np.array(cls["color"]) / 255.0)
    assert segment.GetTerminology() == bridge.terminology_entry(cls["terminology"])
    assert "SCT^52988006^Lesion" in segment.GetTerminology() and "SCT^12738006^Brain" in segment.GetTerminology()
    # the segment sits over the lesion, voxel for voxel on the volume's grid
    got = bridge.segment_mask(seg, ids[0], vol)
    assert _dice(got, lesion) > 0.9, _dice(got, lesion)
    # … and in space: same centroid in RAS
    m = bridge.ijk_to_ras(vol)
    def centroid(mask):
        k, j, i = np.nonzero(mask)
        return (m @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]
    assert np.linalg.norm(centroid(got) - centroid(lesion)) < 1.0
    # the segmentation's geometry is the volume's (oblique directions included)
    ref = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        seg.GetSegmentation().GetConversionParameter("Reference image geometry"), ref, False)
    import vtk
    mat = vtk.vtkMatrix4x4()
    ref.GetImageToWorldMatrix(mat)
    assert np.allclose([[mat.GetElement(r, c) for c in range(4)] for r in range(4)], m, atol=1e-5)
    assert seg.GetAttribute("LesionSeg.model") == "unet"
    # .seg.nrrd round trip: identical segment, and physically on the lesion of the original image
    path = bridge.save_segmentation(seg, tmp_path / "result.seg.nrrd")
    back = bridge.load_segmentation(scene, path)
    assert _state(back, vol) == _state(seg, vol)
    on_image = sitk.Resample(sitk.ReadImage(str(path)), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert _dice(sitk.GetArrayFromImage(on_image) > 0, lesion_volume()[1]) > 0.9   # the file's own grid


def test_rerun_replaces_its_own_segment_and_keeps_others(scene, logic, unet_checkpoint, tmp_path):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    bridge.prepare_segmentation(seg, vol)
    mine = bridge.add_class_segment(seg, {"value": 7, "name": "my drawing", "color": [0, 0, 255]})
    drawn = np.zeros(lesion.shape, bool)
    drawn[:2, :5, :5] = True
    bridge.set_segment_mask(seg, mine, drawn, vol)
    logic.segment(vol, seg, model="unet", checkpoint=unet_checkpoint, preset=PRESET)
    logic.segment(vol, seg, model="unet", checkpoint=unet_checkpoint, preset=PRESET, threshold=0.99)
    ids = bridge.segment_ids(seg)
    assert len(ids) == 2   # no duplicate on the second run
    assert np.array_equal(bridge.segment_mask(seg, mine, vol), drawn)
    lesion_id = [i for i in ids if i != mine][0]
    assert 0 < bridge.segment_mask(seg, lesion_id, vol).sum() <= lesion.sum()
    # segmentIds: write into a chosen segment, which keeps its name and colour
    target = bridge.add_class_segment(seg, {"value": 3, "name": "chosen", "color": [10, 20, 30]})
    logic.segment(vol, seg, model="unet", checkpoint=unet_checkpoint, preset=PRESET, segmentIds={1: target})
    assert seg.GetSegmentation().GetSegment(target).GetName() == "chosen"
    assert _dice(bridge.segment_mask(seg, target, vol), lesion) > 0.9


def test_cancel_leaves_segmentation_exactly_as_before(scene, logic, unet_checkpoint, tmp_path):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    seg = logic.segment(vol, model="unet", checkpoint=unet_checkpoint, preset=PRESET)
    before = _state(seg, vol)
    nodes = scene.GetNumberOfNodes()
    token = CancelToken()

    def cancel_midway(fraction, message):
        if fraction > 0.1:
            token.cancel()
    with pytest.raises(Cancelled):
        logic.segment(vol, seg, model="unet", checkpoint=unet_checkpoint, preset=PRESET, threshold=0.01,
                      progress=cancel_midway, cancel=token, probabilityVolume=True)
    assert _state(seg, vol) == before
    with pytest.raises(Cancelled):   # a new segmentation is not even created
        logic.segment(vol, None, model="unet", checkpoint=unet_checkpoint, preset=PRESET, cancel=token)
    assert scene.GetNumberOfNodes() == nodes


def test_failing_models_leave_segmentation_unchanged(scene, logic, unet_checkpoint, tmp_path):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    seg = logic.segment(vol, model="unet", checkpoint=unet_checkpoint, preset=PRESET)
    before = _state(seg, vol)
    nodes = scene.GetNumberOfNodes()
    # weights trained for 3-channel input, used with a 1-channel preset: the predictor refuses
    rgb = tmp_path / "unet-rgb.pt"
    checkpoint.save(rgb, models.create("unet", base_width=4, depth=2, in_channels=3),
                    config=models.config("unet", base_width=4, depth=2, in_channels=3), preset="polyp")
    with pytest.raises(Exception, match="channel"):
        logic.segment(vol, seg, model="unet", checkpoint=rgb, preset=PRESET)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(unet_checkpoint.read_bytes()[:300])
    with pytest.raises(Exception, match="corrupt.pt"):
        logic.segment(vol, seg, model="unet", checkpoint=corrupt, preset=PRESET)
    with pytest.raises(LesionSegError, match="no such checkpoint file"):
        logic.segment(vol, seg, model="unet", checkpoint=tmp_path / "missing.pt", preset=PRESET)
    assert _state(seg, vol) == before and scene.GetNumberOfNodes() == nodes


def test_write_failure_half_way_restores_the_segmentation(scene, logic, tmp_path, monkeypatch):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    keep = bridge.add_class_segment(seg, {"value": 9, "name": "kept", "color": [1, 2, 3]})
    bridge.set_segment_mask(seg, keep, lesion, vol)
    before = _state(seg, vol)
    classes = models.card("lseg")["classes"]
    masks = {c["value"]: np.roll(lesion, 3 * c["value"], axis=2) for c in classes}
    pred = Prediction(None, masks, None, classes, [])
    real = bridge.set_segment_mask
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)
    monkeypatch.setattr(bridge, "set_segment_mask", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.writePrediction(pred, vol, seg, model="lseg")
    assert _state(seg, vol) == before
    monkeypatch.setattr(bridge, "set_segment_mask", real)
    # and the same prediction, written for real: four overlapping named segments
    logic.writePrediction(pred, vol, seg, model="lseg", classes=["Haemorrhage (HE)", 4])
    names = [seg.GetSegmentation().GetSegment(i).GetName() for i in bridge.segment_ids(seg)]
    assert names == ["kept", "Haemorrhage (HE)", "Soft exudate (SE)"]
    logic.writePrediction(pred, vol, seg, model="lseg")
    for c in classes:
        sid = bridge.find_class_segment(seg, c, "lseg")
        assert np.array_equal(bridge.segment_mask(seg, sid, vol), masks[c["value"]])
    with pytest.raises(LesionSegError, match="unknown class"):
        logic.writePrediction(pred, vol, seg, model="lseg", classes=["Drusen"])
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(LesionSegError, match="no segment 'nope'"):
        logic.writePrediction(pred, vol, None, model="lseg", segmentIds={1: "nope"})
    assert scene.GetNumberOfNodes() == nodes   # no half-made segmentation left behind
    bad = Prediction(None, {**masks, 2: masks[2][:, :-1]}, None, classes, [])
    with pytest.raises(LesionSegError, match="shape"):
        logic.writePrediction(bad, vol, seg, model="lseg")


def test_editor_masking_applies_through_the_logic_and_undo_restores(scene, logic, unet_checkpoint, tmp_path):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    region = bridge.add_class_segment(seg, {"value": 5, "name": "Brain", "color": [200, 200, 200]})
    box = np.zeros(lesion.shape, bool)
    box[: lesion.shape[0] // 2 + 1] = True   # lower half of the slices only
    bridge.set_segment_mask(seg, region, box, vol)
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(seg)
    editor_node.SetAndObserveSourceVolumeNode(vol)
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor_node.SetMaskSegmentID(region)
    editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(editor_node)
    before = _state(seg, vol)
    logic.segment(vol, seg, model="unet", checkpoint=unet_checkpoint, preset=PRESET, editorLogic=editor)
    sid = bridge.find_class_segment(seg, models.preset("unet", PRESET)["classes"][0], "unet")
    got = bridge.segment_mask(seg, sid, vol)
    unmasked = logic.lastPrediction.masks[1]
    assert np.array_equal(got, unmasked & box)
    assert 0 < got.sum() < unmasked.sum()
    assert editor.CanUndo()
    editor.Undo()
    after_undo = _state(seg, vol)
    assert after_undo == before   # the segment the run added is gone again


def test_probability_volumes_share_the_volume_geometry(scene, logic, unet_checkpoint, tmp_path):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    seg = logic.segment(vol, model="unet", checkpoint=unet_checkpoint, preset=PRESET, probabilityVolume=True)
    (prob,) = logic.lastProbabilityVolumes
    assert np.allclose(bridge.ijk_to_ras(prob), bridge.ijk_to_ras(vol))
    p = bridge.volume_array(prob)
    assert p.dtype == np.float32 and p.min() >= 0.0 and p.max() <= 1.0
    mask = bridge.segment_mask(seg, bridge.segment_ids(seg)[0], vol)
    assert p[mask].min() > 0.5 and p[~mask].max() <= 0.5
    assert prob.GetName() == f"{vol.GetName()} Stroke lesion probability"


def test_no_weights_is_a_clear_error_and_installed_weights_are_found(scene, logic, unet_checkpoint, tmp_path):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    with pytest.raises(LesionSegError, match="no weights installed for U-Net"):
        logic.segment(vol, model="unet", preset=PRESET)
    with pytest.raises(LesionSegError, match="no preset 'polip'; available: .*polyp"):   # a typo, not "no weights"
        logic.segment(vol, model="unet", preset="polip")
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    entry = logic.importCheckpoint(unet_checkpoint)
    assert logic.resolveCheckpoint("unet", None, PRESET) == entry.path
    seg = logic.segment(vol, model="unet", preset=PRESET)          # newest installed weights
    assert seg.GetAttribute("LesionSeg.checkpoint") == entry.path
    seg2 = logic.segment(vol, model="unet", checkpoint=entry.id, preset=PRESET)   # by entry id
    assert _state(seg2, vol) == _state(seg, vol)


def test_segment_files_batch_with_failures_summary_and_no_overwrite(logic, unet_checkpoint, tmp_path):
    image, lesion = lesion_volume()
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(image, str(cases / "a.nii.gz"))
    # a left-handed direction (as the ISLES'22 files have): Slicer's reader flips such
    # volumes, the batch reads them with SimpleITK; either way the result must sit on the lesion
    left = sitk.Image(image)
    d = np.array(image.GetDirection()).reshape(3, 3)
    d[:, 2] *= -1
    left.SetDirection(tuple(d.reshape(-1)))
    sitk.WriteImage(left, str(cases / "b_left.nrrd"))
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(image[:, :, 5]), sitk.sitkUInt8), str(cases / "slice.png"))
    (cases / "broken.nrrd").write_text("NRRD0004\ngarbage")
    out = tmp_path / "out"
    summary = logic.segmentFiles([cases], out, model="unet", checkpoint=unet_checkpoint, preset=PRESET)
    assert [s["input"] for s in summary.succeeded] == [str(cases / n) for n in ("a.nii.gz", "b_left.nrrd",
                                                                                "slice.png")]
    assert [f["input"] for f in summary.failed] == [str(cases / "broken.nrrd")]
    assert "broken.nrrd" in summary.failed[0]["error"]
    data = json.loads((out / "lesionseg-summary.json").read_text())
    assert len(data["succeeded"]) == 3 and len(data["failed"]) == 1
    seg_left = sitk.ReadImage(str(out / "b_left.seg.nrrd"))
    assert _dice(sitk.GetArrayFromImage(sitk.Resample(seg_left, left, sitk.Transform(),
                                                      sitk.sitkNearestNeighbor, 0)) > 0, lesion) > 0.9
    assert (out / "slice.seg.nrrd").is_file()
    assert (out / "lesionseg-lesions.csv").read_text().count("a.nii.gz") >= 1
    # the .seg.nrrd is a Slicer segmentation on the input's grid, over the lesion
    seg = sitk.ReadImage(str(out / "a.seg.nrrd"))
    assert np.allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)
    assert _dice(sitk.GetArrayFromImage(sitk.Resample(seg, image, sitk.Transform(),
                                                      sitk.sitkNearestNeighbor, 0)) > 0, lesion) > 0.9
    assert "Stroke lesion" in (out / "a.seg.nrrd").read_bytes()[:4000].decode("latin-1")
    # second run: existing results are not overwritten unless asked
    again = logic.segmentFiles([cases / "a.nii.gz"], out, model="unet", checkpoint=unet_checkpoint, preset=PRESET)
    assert not again.succeeded and "exists" in again.failed[0]["error"]
    assert logic.segmentFiles([cases / "a.nii.gz"], out, model="unet", checkpoint=unet_checkpoint,
                              preset=PRESET, overwrite=True).ok
    # labelmap output with SimpleITK only, written next to the inputs without touching them
    before = (cases / "a.nii.gz").read_bytes()
    lab = logic.segmentFiles([cases / "a.nii.gz"], cases, model="unet", checkpoint=unet_checkpoint,
                             preset=PRESET, outputFormat="nii.gz")
    assert lab.ok and (cases / "a.nii.gz").read_bytes() == before
    labels = sitk.ReadImage(str(cases / "a_lesionseg.nii.gz"))
    assert _dice(sitk.GetArrayFromImage(labels) == 1, lesion) > 0.9
    (tmp_path / "empty").mkdir()
    with pytest.raises(LesionSegError, match="no image files"):
        logic.segmentFiles([tmp_path / "empty"], out, model="unet", checkpoint=unet_checkpoint)
    missing = logic.segmentFiles([tmp_path / "missing.nii.gz"], out, model="unet", checkpoint=unet_checkpoint)
    assert "no such file" in missing.failed[0]["error"]


def test_segment_files_cancel_stops_and_reports(logic, unet_checkpoint, tmp_path):
    image, lesion = lesion_volume()
    for name in ("a", "b", "c"):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    token = CancelToken()

    def progress(fraction, message):
        if fraction > 0.4:
            token.cancel()
    summary = logic.segmentFiles([tmp_path], tmp_path / "out", model="unet", checkpoint=unet_checkpoint,
                                 preset=PRESET, outputFormat="nii.gz", progress=progress, cancel=token)
    assert summary.cancelled and not summary.ok
    assert len(summary.succeeded) + len(summary.cancelled) == 3 and not summary.failed
    done = {s["output"] for s in summary.succeeded}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == sorted(
        __import__("pathlib").Path(o).name for o in done)


def test_training_cases_from_scene_nodes(scene, logic, tmp_path):
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
    bridge.prepare_segmentation(seg, vol)
    sid = bridge.add_class_segment(seg, {"value": 1, "name": "lesion I drew", "color": [255, 0, 0]})
    bridge.set_segment_mask(seg, sid, lesion, vol)
    (case,) = logic.trainingCases([(vol, seg)], "msenet", "isles-dwi")
    assert case["case"] == vol.GetName()
    # image and label carry the volume's full geometry (the trainer orients them itself)
    for img in (case["image"], case["label"]):
        assert np.allclose(img.GetDirection(), image.GetDirection(), atol=1e-6)
        assert np.allclose(img.GetSpacing(), image.GetSpacing(), atol=1e-6)
        assert np.allclose(img.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(case["image"]), sitk.GetArrayFromImage(image))
    assert np.array_equal(sitk.GetArrayFromImage(case["label"]) == 1, lesion)
    # the trainer's own reader accepts it and orients image and label together
    from LesionSegLib.data.volumes import memory_case
    vc = memory_case(case, 0)
    assert vc.image.shape == vc.label.shape and int(vc.label.sum()) == int(lesion.sum())
    with pytest.raises(LesionSegError, match="pair 0"):
        logic.trainingCases([(vol,)], "msenet")
    with pytest.raises(LesionSegError, match="no such image file"):
        logic.trainingCases([(tmp_path / "x.nii.gz", tmp_path / "y.nii.gz")], "msenet")


def test_model_card_text_names_classes_and_reconstructed_parts():
    from LesionSegLib.slicer.cardhtml import model_card_html
    html = model_card_html("lseg")
    for name in ("Hard exudate (EX)", "Haemorrhage (HE)", "Microaneurysm (MA)", "Soft exudate (SE)"):
        assert name.replace("(", "(") in html
    assert "Reconstructed" in html and "L-Seg" in html
    assert LesionSegLogic.models() == ["msenet", "m2snet", "lseg", "bsnet", "mslkseg"]
    assert "unet" in LesionSegLogic.models(all=True)


def test_rgb_photograph_goes_through_predict_image_on_its_own_grid(scene, logic, tmp_path):
    """A colonoscopy-like RGB image loaded as a one-slice vector volume."""
    from LesionSegLib.inference import Predictor
    rng = np.random.default_rng(1)
    rgb = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    rgb[10:25, 30:45] = (250, 120, 60)
    png = tmp_path / "frame.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(png))
    vol = bridge.load_volume(scene, png)
    assert bridge.volume_array(vol).shape == (1, 40, 56, 3)
    path = tmp_path / "unet-rgb.pt"
    net = models.create("unet", base_width=4, depth=2, in_channels=3)
    checkpoint.save(path, net, config=models.config("unet", base_width=4, depth=2, in_channels=3), preset="polyp")
    seg = logic.segment(vol, model="unet", checkpoint=path, preset="polyp", threshold=0.5)
    (sid,) = bridge.segment_ids(seg)
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "Polyp"
    # the same network on the same pixels, directly: identical mask (no flip, no transpose)
    direct = Predictor(str(path), preset="polyp").predict_image(bridge.volume_array(vol)[0], threshold=0.5)
    assert np.array_equal(bridge.segment_mask(seg, sid, vol)[0], direct.masks[1])


def test_batch_seg_nrrd_without_mrml_reads_back_the_same_in_slicer(scene, logic, unet_checkpoint, tmp_path,
                                                                   monkeypatch):
    """Without slicer-core the batch writes .seg.nrrd with LesionSegLib.slicer.segnrrd; Slicer's
    reader must see the same segment, name, colour, terminology and voxels as the MRML path."""
    image, lesion = lesion_volume()
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    with_mrml = logic.segmentFiles([tmp_path / "a.nii.gz"], tmp_path / "mrml", model="unet",
                                   checkpoint=unet_checkpoint, preset=PRESET)

    def no_slicer():
        raise ImportError("No module named 'slicer'")
    monkeypatch.setattr(bridge, "new_scene", no_slicer)
    without = logic.segmentFiles([tmp_path / "a.nii.gz"], tmp_path / "plain", model="unet",
                                 checkpoint=unet_checkpoint, preset=PRESET)
    assert with_mrml.ok and without.ok
    vol = bridge.load_volume(scene, tmp_path / "a.nii.gz")
    a = bridge.load_segmentation(scene, tmp_path / "mrml" / "a.seg.nrrd")
    b = bridge.load_segmentation(scene, tmp_path / "plain" / "a.seg.nrrd")
    (sa,), (sb,) = bridge.segment_ids(a), bridge.segment_ids(b)
    seg_a, seg_b = a.GetSegmentation().GetSegment(sa), b.GetSegmentation().GetSegment(sb)
    assert seg_a.GetName() == seg_b.GetName() == "Stroke lesion"
    assert np.allclose(seg_a.GetColor(), seg_b.GetColor())
    assert seg_a.GetTerminology() == seg_b.GetTerminology()
    assert np.array_equal(bridge.segment_mask(a, sa, vol), bridge.segment_mask(b, sb, vol))
    assert _dice(bridge.segment_mask(b, sb, vol), lesion) > 0.9


def _editor(scene, seg, vol):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node.SetAndObserveSegmentationNode(seg)
    node.SetAndObserveSourceVolumeNode(vol)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(node)
    return node, editor


def test_lseg_overlapping_classes_keep_every_voxel_with_the_default_overwrite_mode(scene, logic, tmp_path):
    """Written through the editor as the L-Seg effect writes them, with the editor's
    default settings (overwrite "all segments"): each class keeps all its voxels, the
    overwrite still applies to the user's own segments, and masking still restricts."""
    vol, image, lesion, _ = _oblique_volume_node(scene, tmp_path)
    classes = models.card("lseg")["classes"]
    masks = {c["value"]: np.roll(lesion, 2 * c["value"], axis=2) for c in classes}   # shifted copies: overlapping
    union = np.logical_or.reduce(list(masks.values()))
    assert (masks[1] & masks[2]).sum() > 100
    pred = Prediction(None, masks, None, classes, [])

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    user = bridge.add_class_segment(seg, {"value": 9, "name": "my drawing", "color": [0, 0, 255]})
    drawing = np.zeros(lesion.shape, bool)
    drawing[:, :, : lesion.shape[2] * 3 // 4] = True          # covers part of the classes
    bridge.set_segment_mask(seg, user, drawing, vol)
    node, editor = _editor(scene, seg, vol)
    assert node.GetOverwriteMode() == slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments   # the default
    before = _state(seg, vol)
    editor.SaveStateForUndo()
    logic.writePrediction(pred, vol, seg, model="lseg", editorLogic=editor)
    for c in classes:
        sid = bridge.find_class_segment(seg, c, "lseg")
        got = bridge.segment_mask(seg, sid, vol)
        assert got.sum() == masks[c["value"]].sum() and np.array_equal(got, masks[c["value"]]), c["name"]
    # the user's overwrite setting still applies to their own segment
    assert np.array_equal(bridge.segment_mask(seg, user, vol), drawing & ~union)
    editor.Undo()
    assert _state(seg, vol) == before

    # masking against another segment: editable area inside the user's segment
    seg2 = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s2")
    bridge.prepare_segmentation(seg2, vol)
    region = bridge.add_class_segment(seg2, {"value": 9, "name": "region", "color": [0, 0, 255]})
    bridge.set_segment_mask(seg2, region, drawing, vol)
    node2, editor2 = _editor(scene, seg2, vol)
    node2.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node2.SetMaskSegmentID(region)
    logic.writePrediction(pred, vol, seg2, model="lseg", editorLogic=editor2)
    for c in classes:
        got = bridge.segment_mask(seg2, bridge.find_class_segment(seg2, c, "lseg"), vol)
        assert np.array_equal(got, masks[c["value"]] & drawing), c["name"]


def test_cli_and_slicer_batches_write_the_same_lesion_table_and_summary(logic, unet_checkpoint, tmp_path):
    """``lesionseg predict`` and the module's batch run one batch function: the same
    inputs (a folder, earlier results in it skipped) give the same lesion rows and the
    same succeeded/failed inputs."""
    import csv
    import subprocess
    import sys
    from pathlib import Path
    image, _ = lesion_volume()
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(image, str(cases / "a.nii.gz"))
    sitk.WriteImage(image[:, :, :6], str(cases / "b.nrrd"))
    (cases / "broken.nrrd").write_text("NRRD0004\ngarbage")
    sitk.WriteImage(sitk.Cast(image > 500, sitk.sitkUInt8), str(cases / "old_lesionseg.nii.gz"))  # an earlier result
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "LesionSegLib", "predict", str(cases), "-o", str(tmp_path / "cli"),
                        "--checkpoint", str(unet_checkpoint), "--preset", PRESET, "--quiet"],
                       capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                       timeout=240)
    assert r.returncode == 1 and "broken.nrrd" in r.stderr
    summary = logic.segmentFiles([cases], tmp_path / "slicer", model="unet", checkpoint=unet_checkpoint,
                                 preset=PRESET, outputFormat="nii.gz")

    def rows(folder):
        with open(folder / "lesionseg-lesions.csv", newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]

    def outcome(folder):
        data = json.loads((folder / "lesionseg-summary.json").read_text())
        return ([s["input"] for s in data["succeeded"]], [f["input"] for f in data["failed"]])

    assert outcome(tmp_path / "cli") == outcome(tmp_path / "slicer") == (
        [str(cases / "a.nii.gz"), str(cases / "b.nrrd")], [str(cases / "broken.nrrd")])
    assert [s["input"] for s in summary.succeeded] == [str(cases / "a.nii.gz"), str(cases / "b.nrrd")]
    cli_rows, slicer_rows = rows(tmp_path / "cli"), rows(tmp_path / "slicer")
    assert cli_rows and {r["file"] for r in cli_rows} == {str(cases / "a.nii.gz"), str(cases / "b.nrrd")}
    key = ("file", "class", "lesion", "voxels")
    assert [tuple(r[k] for k in key) for r in cli_rows] == [tuple(r[k] for k in key) for r in slicer_rows]


def _bright_and_dim_lesion(scene, tmp_path):
    rng = np.random.default_rng(0)
    arr = 10 + rng.normal(0, 1, (12, 40, 40)).astype(np.float32)
    arr[3:7, 5:12, 5:12] = 100     # bright lesion
    arr[3:7, 22:32, 22:32] = 38    # dim lesion
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(tmp_path / "two.nrrd"))
    return bridge.load_volume(scene, tmp_path / "two.nrrd")


def test_seed_threshold_through_the_console_logic(scene, logic, unet_checkpoint, tmp_path):
    """``segment(seedThreshold=…)``: a dim lesion (probability ≈ 0.8) is dropped at 0.95 and
    kept by default (these weights carry no rule); a seed threshold at or below the
    threshold is refused with the segmentation and the scene unchanged."""
    vol = _bright_and_dim_lesion(scene, tmp_path)
    probs = logic.predict(logic.inputImage(vol), model="unet", checkpoint=unet_checkpoint, preset=PRESET,
                          probabilities=True).probabilities[0]
    assert probs[5, 8, 8] > 0.99 and 0.5 < probs[5, 27, 27] < 0.9      # the premise

    def lesion_mask(**kw):
        seg = logic.segment(vol, model="unet", checkpoint=unet_checkpoint, preset=PRESET, **kw)
        return seg, bridge.segment_mask(seg, bridge.segment_ids(seg)[0], vol)
    seg, ruled = lesion_mask(seedThreshold=0.95)
    assert ruled[5, 8, 8] and not ruled[5, 20:34, 20:34].any()
    assert seg.GetAttribute("LesionSeg.seed threshold") == "0.95"
    plain, every = lesion_mask()
    assert every[5, 8, 8] and every[5, 27, 27] and plain.GetAttribute("LesionSeg.seed threshold") == "none"
    before, nodes = _state(seg, vol), scene.GetNumberOfNodes()
    with pytest.raises(LesionSegError, match="seed threshold 0.3 must be above the threshold 0.5"):
        logic.segment(vol, seg, model="unet", checkpoint=unet_checkpoint, preset=PRESET, seedThreshold=0.3)
    assert _state(seg, vol) == before and scene.GetNumberOfNodes() == nodes


def test_seed_threshold_of_the_effect_panel_goes_through_the_worker(scene, logic, unet_checkpoint, tmp_path):
    """The effect's parameters as stored on a segment editor node: with the card's
    threshold off, the user's threshold and seed threshold reach the worker process (the
    dim lesion dropped, as in the console); a seed threshold at or below the threshold is
    refused before a worker starts, the segmentation unchanged."""
    vol = _bright_and_dim_lesion(scene, tmp_path)
    editor = slicer.vtkMRMLSegmentEditorNode()

    def effect_options(**params):
        for key, value in {**LesionSegLogic.effectParameterDefaults("unet"), **params}.items():
            editor.SetAttribute(f"LesionSeg.{key}", value)
        options = LesionSegLogic.effectOptions("unet", lambda k: editor.GetAttribute(f"LesionSeg.{k}"))
        options.pop("classes")
        return {**options, "checkpoint": unet_checkpoint, "preset": PRESET, "device": "cpu"}

    def worker_mask(options, seg=None):
        run = logic.startSegmentJob(vol, seg, **options)
        assert run.job.wait(120) and run.job.error is None, run.job.error
        seg = logic.finishSegmentJob(run)
        return seg, bridge.segment_mask(seg, bridge.segment_ids(seg)[0], vol)

    ruled_options = effect_options(UseCardThreshold="0", Threshold="0.5", SeedThreshold="0.95")
    assert ruled_options["threshold"] == 0.5 and ruled_options["seedThreshold"] == 0.95
    seg, ruled = worker_mask(ruled_options)
    assert ruled[5, 8, 8] and not ruled[5, 20:34, 20:34].any()
    assert seg.GetAttribute("LesionSeg.seed threshold") == "0.95"
    _, every = worker_mask(effect_options(UseCardThreshold="0", Threshold="0.5", SeedThreshold="0"))
    assert every[5, 8, 8] and every[5, 27, 27]
    # the seed threshold only counts with the user's own threshold: the card's comes with the weights' rules
    assert effect_options(UseCardThreshold="1", SeedThreshold="0.95")["seedThreshold"] is None
    before, nodes = _state(seg, vol), scene.GetNumberOfNodes()
    with pytest.raises(LesionSegError, match="seed threshold 0.3 must be above the threshold 0.5"):
        logic.startSegmentJob(vol, seg, **effect_options(UseCardThreshold="0", Threshold="0.5", SeedThreshold="0.3"))
    assert _state(seg, vol) == before and scene.GetNumberOfNodes() == nodes
