"""MRML bridge with slicer-core's real MRML: geometry, segments, terminology, masking,
undo, files. Skipped when slicer-core is not installed (pip install slicer-core)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import require_slicer_core  # noqa: E402

slicer = require_slicer_core()

import SimpleITK as sitk  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402
from helpers import lesion_volume  # noqa: E402

from LesionSegLib.slicer import bridge  # noqa: E402
from LesionSegLib import models  # noqa: E402

ISLES = SHARED_DATA / "isles22-strokecase0009"


@pytest.fixture()
def scene():
    s = bridge.new_scene()
    yield s
    s.Clear(1)


def _expected_ijk_to_ras(image):
    return bridge.sitk_geometry_to_ijk_to_ras(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def test_oblique_volume_file_round_trip_through_slicer_reader(scene, tmp_path):
    image, _ = lesion_volume()
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(image, str(path))
    node = bridge.load_volume(scene, path)
    # Slicer's own reader and our LPS→RAS conversion agree on the matrix …
    assert np.allclose(bridge.ijk_to_ras(node), _expected_ijk_to_ras(image), atol=1e-5)
    # … and the node comes back to SimpleITK with the same geometry and voxels
    back = bridge.volume_to_sitk(node)
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-5)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_sitk_to_volume_is_exact_and_vector_volumes_keep_components(scene):
    image, _ = lesion_volume()
    node = bridge.sitk_to_volume(image, scene, "v")
    assert np.abs(bridge.ijk_to_ras(node) - _expected_ijk_to_ras(image)).max() < 1e-12
    rgb = sitk.Compose([sitk.Cast(image, sitk.sitkUInt8)] * 3)
    vnode = bridge.sitk_to_volume(rgb, scene, "rgb")
    assert vnode.IsA("vtkMRMLVectorVolumeNode")
    assert bridge.volume_array(vnode).shape == (10, 48, 64, 3)
    assert bridge.volume_to_sitk(vnode).GetNumberOfComponentsPerPixel() == 3


def test_image_extent_not_starting_at_zero_is_folded_into_origin(scene):
    import vtk
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "shifted")
    img = vtk.vtkImageData()
    img.SetExtent(2, 5, 0, 3, 1, 2)
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(img)
    node.SetSpacing(2.0, 3.0, 4.0)
    node.SetOrigin(10.0, 20.0, 30.0)
    out = bridge.volume_to_sitk(node)
    # first voxel at IJK (2,0,1) → RAS (14, 20, 34) → LPS (-14, -20, 34)
    assert np.allclose(out.GetOrigin(), (-14.0, -20.0, 34.0))


@pytest.mark.parametrize("name", models.list_models())
def test_card_terminology_strings_parse_in_slicer(name):
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    card = models.card(name)
    classes = list(card["classes"]) + [c for p in card["presets"].values() for c in p.get("classes", [])]
    for cls in classes:
        entry = bridge.terminology_entry(cls["terminology"])
        parsed = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(entry, parsed), entry
        t = cls["terminology"]
        assert parsed.GetCategoryObject().GetCodeValue() == t["category"][1]
        assert parsed.GetTypeObject().GetCodeValue() == t["type"][1]
        assert parsed.GetTypeObject().GetCodeMeaning() == t["type"][2]
        if t.get("anatomic_region"):
            assert parsed.GetRegionObject().GetCodeValue() == t["anatomic_region"][1]
        assert logic.SerializeTerminologyEntry(parsed) == entry
        assert bridge.parse_terminology_entry(entry)["type"] == list(t["type"])


def _lseg_masks(shape):
    masks = {}
    for v in range(1, 5):
        m = np.zeros(shape, bool)
        m[2:7, 5 + 4 * v: 20 + 4 * v, 10:30] = True   # the four classes overlap pairwise
        masks[v] = m
    return masks


def test_overlapping_multiclass_segments_save_and_reload_identically(scene, tmp_path):
    image, _ = lesion_volume()
    vol = bridge.sitk_to_volume(image, scene, "fundus-like")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lseg")
    bridge.prepare_segmentation(seg, vol)
    classes = models.card("lseg")["classes"]
    masks = _lseg_masks(bridge.volume_array(vol).shape)
    ids = bridge.class_segments(seg, classes, model="lseg")
    for cls in classes:
        bridge.set_segment_mask(seg, ids[cls["value"]], masks[cls["value"]], vol)
    for cls in classes:   # overlaps are kept exactly (Slicer puts segments on separate layers)
        assert np.array_equal(bridge.segment_mask(seg, ids[cls["value"]], vol), masks[cls["value"]])
    path = bridge.save_segmentation(seg, tmp_path / "out.seg.nrrd")
    back = bridge.load_segmentation(scene, path)
    assert bridge.segment_ids(back) == bridge.segment_ids(seg)
    for cls in classes:
        sid = ids[cls["value"]]
        segment = back.GetSegmentation().GetSegment(sid)
        assert segment.GetName() == cls["name"]
        assert np.allclose(segment.GetColor(), np.array(cls["color"]) / 255.0)
        assert segment.GetTerminology() == bridge.terminology_entry(cls["terminology"])
        assert bridge._get_tag(segment, bridge.CLASS_TAG) == f"lseg:{cls['value']}"
        assert np.array_equal(bridge.segment_mask(back, sid, vol), masks[cls["value"]])
    # a later run of the same model finds its own segments again instead of adding new ones
    assert bridge.class_segments(back, classes, model="lseg") == ids
    # the file is a standard Slicer segmentation that SimpleITK can read, on the volume's grid
    ref = sitk.ReadImage(str(path))
    assert np.allclose(ref.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.allclose(ref.GetSpacing(), image.GetSpacing(), atol=1e-6)


def test_save_segmentation_is_atomic_and_reports_failure(scene, tmp_path):
    image, _ = lesion_volume()
    vol = bridge.sitk_to_volume(image, scene, "v")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    bridge.add_class_segment(seg, models.card("unet")["classes"][0])
    target = tmp_path / "keep.seg.nrrd"
    target.write_bytes(b"user's file")
    bad_dir = tmp_path / "not-a-dir"
    bad_dir.write_text("x")
    with pytest.raises(OSError):
        bridge.save_segmentation(seg, bad_dir / "x.seg.nrrd")
    bridge.save_segmentation(seg, target)
    assert target.read_bytes() != b"user's file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _editor(scene, seg, vol):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node.SetAndObserveSegmentationNode(seg)
    node.SetAndObserveSourceVolumeNode(vol)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(node)
    return logic, node


def _with_editor_setup(scene):
    image, lesion = lesion_volume()
    vol = bridge.sitk_to_volume(image, scene, "v")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    cls = models.card("unet")["classes"][0]
    region = bridge.add_class_segment(seg, {"value": 9, "name": "Region", "color": [0, 128, 255]})
    target = bridge.add_class_segment(seg, cls, model="unet")
    box = np.zeros(lesion.shape, bool)
    box[:, :, : lesion.shape[2] * 3 // 4] = True   # covers only part of the lesion
    bridge.set_segment_mask(seg, region, box, vol)
    logic, node = _editor(scene, seg, vol)
    return vol, seg, lesion, box, region, target, logic, node


def test_editor_mask_inside_segment_restricts_and_undo_restores(scene):
    vol, seg, lesion, box, region, target, logic, node = _with_editor_setup(scene)
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node.SetMaskSegmentID(region)
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    assert logic.SaveStateForUndo()
    bridge.modify_segment_with_editor(logic, seg, target, lesion, vol)
    written = bridge.segment_mask(seg, target, vol)
    assert np.array_equal(written, lesion & box)
    assert 0 < written.sum() < lesion.sum()
    assert np.array_equal(bridge.segment_mask(seg, region, vol), box)   # the mask segment is untouched
    assert logic.CanUndo()
    logic.Undo()
    assert not bridge.segment_mask(seg, target, vol).any()


def test_editor_intensity_range_mask_restricts(scene):
    vol, seg, lesion, box, region, target, logic, node = _with_editor_setup(scene)
    arr = bridge.volume_array(vol)
    node.SetSourceVolumeIntensityMask(True)
    node.SetSourceVolumeIntensityMaskRange(0.0, 400.0)   # half of the lesion's voxels are above
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    bridge.modify_segment_with_editor(logic, seg, target, lesion, vol)
    written = bridge.segment_mask(seg, target, vol)
    assert np.array_equal(written, lesion & (arr <= 400.0))
    assert 0 < written.sum() < lesion.sum()


def test_editor_overwrite_mode_removes_written_voxels_from_other_segments(scene):
    vol, seg, lesion, box, region, target, logic, node = _with_editor_setup(scene)
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    bridge.modify_segment_with_editor(logic, seg, target, lesion, vol)
    assert np.array_equal(bridge.segment_mask(seg, target, vol), lesion)
    assert np.array_equal(bridge.segment_mask(seg, region, vol), box & ~lesion)


def test_labels_for_training_by_segment_name(scene):
    image, lesion = lesion_volume()
    vol = bridge.sitk_to_volume(image, scene, "v")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    classes = models.card("lseg")["classes"]
    masks = _lseg_masks(lesion.shape)
    for cls in classes[:2]:
        sid = bridge.add_class_segment(seg, {**cls, "name": cls["name"].upper()})   # names match case-insensitively
        bridge.set_segment_mask(seg, sid, masks[cls["value"]], vol)
    labels = bridge.labels_from_segmentation(seg, vol, classes[:2])
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(labels == 2, masks[2])
    with pytest.raises(bridge.BridgeError, match="Microaneurysm"):
        bridge.labels_from_segmentation(seg, vol, classes)
    # one class and one segment: that segment, whatever its name
    one = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "one")
    bridge.prepare_segmentation(one, vol)
    sid = bridge.add_class_segment(one, {"value": 1, "name": "my drawing", "color": [1, 2, 3]})
    bridge.set_segment_mask(one, sid, lesion, vol)
    assert np.array_equal(bridge.labels_from_segmentation(one, vol, models.card("msenet")["classes"]), lesion)


def test_transformed_volume_segmentation_follows_transform(scene):
    image, lesion = lesion_volume()
    vol = bridge.sitk_to_volume(image, scene, "v")
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    import vtk
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 25.0)
    m.SetElement(1, 2, 0.2)
    tnode.SetMatrixTransformToParent(m)
    vol.SetAndObserveTransformNodeID(tnode.GetID())
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    assert seg.GetParentTransformNode() is tnode
    sid = bridge.add_class_segment(seg, models.card("unet")["classes"][0])
    bridge.set_segment_mask(seg, sid, lesion, vol)
    assert np.array_equal(bridge.segment_mask(seg, sid, vol), lesion)
    # a segmentation under no transform still receives the mask at the right place
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "untransformed")
    other.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid2 = bridge.add_class_segment(other, models.card("unet")["classes"][0])
    bridge.set_segment_mask(other, sid2, lesion, vol)
    got = bridge.segment_mask(other, sid2, vol)
    assert abs(int(got.sum()) - int(lesion.sum())) <= 0.02 * lesion.sum()
    assert (got & lesion).sum() >= 0.97 * lesion.sum()


def test_mask_shape_mismatch_names_the_volume(scene):
    image, lesion = lesion_volume()
    vol = bridge.sitk_to_volume(image, scene, "My volume")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    bridge.prepare_segmentation(seg, vol)
    sid = bridge.add_class_segment(seg, models.card("unet")["classes"][0])
    with pytest.raises(bridge.BridgeError, match="My volume"):
        bridge.set_segment_mask(seg, sid, lesion[:, :-1], vol)


def test_unreadable_files_are_named(scene, tmp_path):
    bad = tmp_path / "broken.nrrd"
    bad.write_text("not an image")
    with pytest.raises(bridge.BridgeError, match="broken.nrrd"):
        bridge.load_volume(scene, bad)
    with pytest.raises(bridge.BridgeError, match="no such file"):
        bridge.load_segmentation(scene, tmp_path / "missing.seg.nrrd")


@pytest.mark.skipif(not ISLES.exists(), reason="ISLES'22 case not present in ../shared/data")
def test_isles22_case_loads_and_round_trips(scene, tmp_path):
    files = sorted(p for p in ISLES.rglob("*.nii*"))
    dwi = next((p for p in files if "dwi" in p.name.lower()), None)
    mask = next((p for p in files if "msk" in p.name.lower() or "mask" in p.name.lower() or "label" in p.name.lower()), None)
    if dwi is None or mask is None:
        pytest.skip(f"ISLES'22 DWI or mask not found among {[p.name for p in files]}")
    vol = bridge.load_volume(scene, dwi)
    ref = sitk.ReadImage(str(dwi))
    back = bridge.volume_to_sitk(vol)
    assert back.GetSize() == ref.GetSize()
    # this file's direction is left-handed; Slicer's reader reverses the slice axis to make
    # it right-handed, so compare in physical space: resampled onto the file's grid
    # (nearest neighbour on coinciding voxel centres) the voxels are identical
    on_ref = sitk.Resample(back, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    assert np.array_equal(sitk.GetArrayFromImage(on_ref), sitk.GetArrayFromImage(ref))
    truth_img = sitk.ReadImage(str(mask))
    label_node = bridge.load_volume(scene, mask, labelmap=True)
    truth = bridge.volume_array(label_node) > 0    # the mask on the node's grid
    assert truth.sum() == int((sitk.GetArrayFromImage(truth_img) > 0).sum()) > 0
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "isles")
    bridge.prepare_segmentation(seg, vol)
    cls = models.preset("msenet", "isles-dwi")["classes"][0]
    sid = bridge.add_class_segment(seg, cls, model="msenet")
    bridge.set_segment_mask(seg, sid, truth, vol)
    path = bridge.save_segmentation(seg, tmp_path / "isles.seg.nrrd")
    back_seg = bridge.load_segmentation(scene, path)
    assert np.array_equal(bridge.segment_mask(back_seg, sid, vol), truth)
    assert back_seg.GetSegmentation().GetSegment(sid).GetName() == cls["name"]
    assert bridge.parse_terminology_entry(back_seg.GetSegmentation().GetSegment(sid).GetTerminology())["type"][1] \
        == "55641003"
    # the saved segmentation sits exactly on the expert mask in physical space
    saved = sitk.ReadImage(str(path))
    saved_on_ref = sitk.Resample(saved, truth_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayFromImage(saved_on_ref) > 0, sitk.GetArrayFromImage(truth_img) > 0)


def test_segmentation_with_another_geometry_reads_back_and_editor_writes_stay_inside_it(scene):
    """A user's segmentation drawn on a crop of the volume: its segments read back on
    the full volume's grid (training from it works), and an editor write of a mask
    that reaches beyond the segmentation's geometry lands only inside it."""
    image, lesion = lesion_volume()
    vol = bridge.sitk_to_volume(image, scene, "v")
    crop_image = image[20:60, 4:40, 2:9]   # same physical grid, smaller extent
    crop = bridge.sitk_to_volume(crop_image, scene, "crop")
    inside = np.zeros(lesion.shape, bool)
    inside[2:9, 4:40, 20:60] = True
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn on the crop")
    bridge.prepare_segmentation(seg, crop)
    cls = models.card("unet")["classes"][0]
    sid = bridge.add_class_segment(seg, cls)
    bridge.set_segment_mask(seg, sid, lesion[2:9, 4:40, 20:60], crop)
    got = bridge.segment_mask(seg, sid, vol)
    assert got.shape == lesion.shape and np.array_equal(got, lesion & inside)
    labels = bridge.labels_from_segmentation(seg, vol, [cls])
    assert np.array_equal(labels == 1, lesion & inside)
    # editor write of a mask that covers the whole volume (and so leaves the segmentation's geometry)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node.SetAndObserveSegmentationNode(seg)
    node.SetAndObserveSourceVolumeNode(crop)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(node)
    other = seg.GetSegmentation().AddEmptySegment("everything", "everything")
    bridge.modify_segment_with_editor(editor, seg, other, np.ones(lesion.shape, bool), vol)
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, other, labelmap, False)
    ext = labelmap.GetExtent()
    assert _oriented_count(labelmap) == int(inside.sum())
    assert (ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1) <= (40, 36, 7)
    assert np.array_equal(bridge.segment_mask(seg, other, vol), inside)


def _oriented_count(image) -> int:
    from vtk.util import numpy_support
    return int((numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()) > 0).sum())


def test_converter_rules_are_registered_once_per_process(tmp_path):
    """Batches make a scene per call; the segmentation converter rules are global and
    must not pile up (4 rules, however many scenes and batches)."""
    code = textwrap.dedent("""
        import slicer, sys
        import SimpleITK as sitk, numpy as np
        from LesionSegLib.slicer import bridge
        rules = lambda: len(slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules())
        counts = []
        for _ in range(3):
            scene = bridge.new_scene()
            seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            assert seg.GetSegmentation().AddEmptySegment("a")
            counts.append(rules())
        bridge.ensure_segmentation_converters()
        counts.append(rules())
        print(counts)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[4, 4, 4, 4]"
