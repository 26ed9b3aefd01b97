"""Slicer-free .seg.nrrd files, read back by slicer-core's real segmentation reader."""
import numpy as np
import pytest

from LesionSegLib import models
from LesionSegLib.slicer.segnrrd import write_seg_nrrd

from helpers import lesion_volume

slicer = pytest.importorskip("slicer")


def _read_back(path):
    from LesionSegLib.slicer import bridge as mrml_bridge
    scene = mrml_bridge.new_scene()
    node = mrml_bridge.load_segmentation(scene, path)
    seg = node.GetSegmentation()
    return scene, node, [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def test_single_layer_segmentation_opens_in_slicer_with_names_colours_terminology(tmp_path):
    from LesionSegLib.slicer import bridge as mrml_bridge
    image, lesion = lesion_volume()
    classes = models.preset("bsnet")["classes"]
    path = write_seg_nrrd(tmp_path / "out.seg.nrrd", {1: lesion}, image, classes, model="bsnet")
    scene, node, ids = _read_back(path)
    assert len(ids) == 1
    segment = node.GetSegmentation().GetSegment(ids[0])
    assert segment.GetName() == "Lung infection"
    assert np.allclose(segment.GetColor(), np.array(classes[0]["color"]) / 255, atol=1e-5)
    tags = mrml_bridge.parse_terminology_entry(mrml_bridge._get_tag(segment, "TerminologyEntry"))
    assert tags["type"] == ["SCT", "52988006", "Lesion"] and tags["anatomic_region"][1] == "39607008"
    volume = mrml_bridge.sitk_to_volume(image, scene, "vol")
    got = mrml_bridge.segment_mask(node, ids[0], volume)
    assert np.array_equal(got, lesion)


def test_overlapping_classes_become_layers_and_keep_every_voxel(tmp_path):
    from LesionSegLib.slicer import bridge as mrml_bridge
    image, lesion = lesion_volume()
    classes = models.preset("lseg")["classes"]            # four multi-label fundus classes
    shifted = np.roll(lesion, 3, axis=2)                   # overlaps the first mask partly
    masks = {classes[0]["value"]: lesion, classes[1]["value"]: shifted}
    path = write_seg_nrrd(tmp_path / "multi.seg.nrrd", masks, image, classes, model="lseg")
    scene, node, ids = _read_back(path)
    assert [node.GetSegmentation().GetSegment(i).GetName() for i in ids] == [c["name"] for c in classes]
    volume = mrml_bridge.sitk_to_volume(image, scene, "vol")
    assert np.array_equal(mrml_bridge.segment_mask(node, ids[0], volume), lesion)
    assert np.array_equal(mrml_bridge.segment_mask(node, ids[1], volume), shifted)
    assert not mrml_bridge.segment_mask(node, ids[3], volume).any()


def test_mask_of_wrong_shape_is_refused(tmp_path):
    image, lesion = lesion_volume()
    with pytest.raises(ValueError, match="has shape"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", {1: lesion[:-1]}, image, models.preset("bsnet")["classes"])
    assert not (tmp_path / "x.seg.nrrd").exists()
