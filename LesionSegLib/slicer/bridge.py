"""Bridge between Slicer's MRML nodes and the numpy / SimpleITK world of LesionSegLib:
scenes, segments and files here; volume geometry in :mod:`.geometry`, terminology
entries in :mod:`.terminology` (both also reachable from this module).

Everything here works both inside the Slicer application and with the Qt-free
``slicer-core`` wheel (plain Python, no ``slicer.app``): it uses MRML nodes, storage nodes
and the static functions of ``vtkSlicerSegmentationsModuleLogic`` only, never
``slicer.util.loadVolume`` & co. (they need the Qt application). ``slicer`` and ``vtk``
are imported inside the functions, so importing this module costs nothing and needs
neither Slicer nor torch.

Segments
--------
A model card class ``{"value", "name", "color" (0-255), "terminology"}`` becomes one
segment: name, colour (0-1) and a Slicer terminology entry string, with the
"auto-generated" flags cleared so that Slicer keeps them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from ..fileio import stem
from .errors import BridgeError
from .geometry import (_oriented_array, _oriented_image, _volume_to_segmentation_matrix, ijk_to_ras,
                       ijk_to_ras_to_sitk_geometry, sitk_geometry_to_ijk_to_ras, sitk_to_volume,
                       update_volume_from_array, volume_array, volume_to_sitk)
from .terminology import ANATOMIC_CONTEXT, TERMINOLOGY_CONTEXT, parse_terminology_entry, terminology_entry

__all__ = ["BridgeError", "ijk_to_ras", "ijk_to_ras_to_sitk_geometry", "sitk_geometry_to_ijk_to_ras",
           "sitk_to_volume", "update_volume_from_array", "volume_array", "volume_to_sitk", "ANATOMIC_CONTEXT",
           "TERMINOLOGY_CONTEXT", "parse_terminology_entry", "terminology_entry", "CLASS_TAG",
           "ensure_segmentation_converters", "new_scene", "class_tag", "find_class_segment", "add_class_segment",
           "describe_segment", "prepare_segmentation", "mask_labelmap", "resample_to", "set_segment_mask",
           "modify_segment_with_editor", "segment_mask", "segment_ids", "snapshot", "restore",
           "labels_from_segmentation", "load_volume", "load_segmentation", "save_segmentation", "class_segments"]

#: segment tag holding "model:class value", so that re-running a model updates its own segments
CLASS_TAG = "LesionSeg.Class"

_keep_alive: List[Any] = []   # logics that must outlive the call that created them


# ----------------------------------------------------------------------------- scene


def ensure_segmentation_converters() -> None:
    """Register the segmentation representation converters once per process.

    In the Slicer application the Segmentations module has done it at startup. With
    slicer-core alone, ``vtkSegmentation.AddEmptySegment`` fails until a
    ``vtkSlicerSegmentationsModuleLogic`` has been given a scene (that call registers the
    rules); registering them by hand as well would duplicate them, so this only acts
    when there are none."""
    import slicer
    if len(slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules()) > 0:
        return
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    _keep_alive.extend([scene, logic])


def new_scene():
    """A standalone MRML scene with the module logics Slicer would register at startup
    (colours, volumes, segmentations), for use without the Slicer application: batch
    processing from plain Python, tests. Inside Slicer use ``slicer.mrmlScene``."""
    import slicer
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = [("Colors", slicer.vtkSlicerColorLogic()), ("Volumes", slicer.vtkSlicerVolumesLogic())]
    # a Segmentations logic registers the segmentation converter rules into the process's
    # global factory each time it gets a scene: only the first scene of a process gets one
    # (in Slicer, the application's Segmentations module has registered them already)
    if not slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules():
        logics.append(("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()))
    else:   # the one node class that logic would have registered with this scene
        scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    for name, logic in logics:
        # order matters: the colour logic looks for the application logic in SetMRMLScene
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
    _keep_alive.extend([app_logic] + [lg for _, lg in logics])
    return scene


# ----------------------------------------------------------------------------- segments


def _color01(color) -> List[float]:
    c = [float(v) for v in (color or (255, 64, 64))][:3]
    return [v / 255.0 for v in c] if max(c) > 1.0 else c


def class_tag(model: str, value: int) -> str:
    return f"{model}:{int(value)}"


def find_class_segment(segmentation_node, cls: Mapping[str, Any], model: Optional[str] = None) -> Optional[str]:
    """ID of the segment that holds class ``cls``: the one tagged by an earlier run of the
    same model, else the one with the class's name (case-insensitive); None if neither."""
    seg = segmentation_node.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    if model:
        want = class_tag(model, cls["value"])
        for sid in ids:
            tag = _get_tag(seg.GetSegment(sid), CLASS_TAG)
            if tag == want:
                return sid
    name = str(cls["name"]).strip().lower()
    for sid in ids:
        if (seg.GetSegment(sid).GetName() or "").strip().lower() == name:
            return sid
    return None


def _get_tag(segment, name: str) -> Optional[str]:
    import vtk
    holder = vtk.reference("")
    return str(holder) if segment.GetTag(name, holder) else None


def add_class_segment(segmentation_node, cls: Mapping[str, Any], model: Optional[str] = None) -> str:
    """Add an empty segment named, coloured and terminology-coded from a card class."""
    seg = segmentation_node.GetSegmentation()
    base = "".join(ch if ch.isalnum() else "_" for ch in str(cls["name"])).strip("_") or "Lesion"
    sid = seg.GenerateUniqueSegmentID(base)
    new_id = seg.AddEmptySegment(sid, str(cls["name"]), _color01(cls.get("color")))
    if not new_id:
        raise BridgeError(f"could not add segment {cls['name']!r} to {segmentation_node.GetName()!r}")
    describe_segment(segmentation_node, new_id, cls, model)
    return new_id


def describe_segment(segmentation_node, segment_id: str, cls: Mapping[str, Any], model: Optional[str] = None,
                     rename: bool = True) -> None:
    """Set a segment's name (if ``rename``), colour, terminology and class tag from a card class."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise BridgeError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}")
    if rename:
        segment.SetName(str(cls["name"]))
        segment.SetNameAutoGenerated(False)
    segment.SetColor(*_color01(cls.get("color")))
    segment.SetColorAutoGenerated(False)
    entry = terminology_entry(cls.get("terminology"))
    if entry:
        segment.SetTerminology(entry)
    if model:
        segment.SetTag(CLASS_TAG, class_tag(model, cls["value"]))


def prepare_segmentation(segmentation_node, volume_node) -> None:
    """Give a new (or empty) segmentation the volume's geometry and transform, and
    display nodes; an existing non-empty segmentation keeps its own geometry."""
    ensure_segmentation_converters()
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        if volume_node.GetParentTransformNode() is not None:
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetParentTransformNode().GetID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segmentation_node.GetScene() is not None and segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()


def mask_labelmap(mask: np.ndarray, volume_node, segmentation_node):
    """vtkOrientedImageData of a (z, y, x) mask on ``volume_node``'s grid, in the
    segmentation's coordinates (for ``SetBinaryLabelmapToSegment`` or an editor's
    ``ModifySegmentByLabelmap``)."""
    dims = volume_node.GetImageData().GetDimensions()
    if tuple(mask.shape) != (dims[2], dims[1], dims[0]):
        raise BridgeError(f"mask shape {tuple(mask.shape)} does not match volume {volume_node.GetName()!r} "
                          f"(z, y, x) = {(dims[2], dims[1], dims[0])}")
    return _oriented_image(mask.astype(bool), _volume_to_segmentation_matrix(volume_node, segmentation_node))


def resample_to(image, reference):
    """Nearest-neighbour resample of an oriented image onto another's geometry, extent
    included: nothing lands outside the reference (no padding)."""
    import slicer
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, out, False, False):
        raise BridgeError("could not resample the labelmap to the segmentation geometry")
    return out


def set_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, volume_node) -> None:
    """Replace a segment's voxels by ``mask`` (z, y, x on ``volume_node``'s grid), with no
    editor masking. Overlapping segments are kept (Slicer moves the segment to its own
    labelmap layer)."""
    import slicer
    labelmap = mask_labelmap(mask, volume_node, segmentation_node)
    L = slicer.vtkSlicerSegmentationsModuleLogic
    if not L.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, L.MODE_REPLACE):
        raise BridgeError(f"could not write segment {segment_id!r} of {segmentation_node.GetName()!r}")


def modify_segment_with_editor(editor_logic, segmentation_node, segment_id: str, mask: np.ndarray, volume_node,
                               mode: Optional[int] = None) -> None:
    """Write ``mask`` into a segment the way a Segment Editor effect does: through the
    editor's modifier labelmap and ``ModifySegmentByLabelmap``, so that the editor
    node's masking settings (editable area: inside/outside segments, editable intensity
    range, overwrite of other segments) apply. ``editor_logic`` is a
    ``vtkSlicerSegmentEditorLogic`` whose editor node has this segmentation and a source
    volume; ``mode`` defaults to ``ModificationModeSet``."""
    import slicer
    L = slicer.vtkSlicerSegmentEditorLogic
    mode = L.ModificationModeSet if mode is None else mode
    if not editor_logic.ResetModifierLabelmapToDefault():
        raise BridgeError("the segment editor has no reference geometry (set its source volume)")
    modifier = editor_logic.GetModifierLabelmap()
    labelmap = mask_labelmap(mask, volume_node, segmentation_node)
    resampled = resample_to(labelmap, modifier)
    modifier.DeepCopy(resampled)
    editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode, True, False)


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """Bool (z, y, x) mask of a segment on ``volume_node``'s grid."""
    import slicer
    seg = segmentation_node.GetSegmentation()
    segment = seg.GetSegment(segment_id)
    if segment is None:
        raise BridgeError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}")
    dims = volume_node.GetImageData().GetDimensions()
    shape = (dims[2], dims[1], dims[0])
    source = slicer.vtkOrientedImageData()
    ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, source, False)
    ext = source.GetExtent()
    if not ok or ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5] or source.GetPointData().GetScalars() is None:
        return np.zeros(shape, bool)
    reference = _oriented_image(np.zeros(shape, np.uint8), _volume_to_segmentation_matrix(volume_node, segmentation_node))
    out = resample_to(source, reference)
    arr = _oriented_array(out)
    if arr.shape != shape:  # resample keeps the reference extent; guard anyway
        raise BridgeError(f"resampled segment has shape {arr.shape}, expected {shape}")
    # the representation is the segment's whole layer, shared with other segments: keep
    # only this segment's label value
    return arr == segment.GetLabelValue()


def segment_ids(segmentation_node) -> List[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def snapshot(segmentation_node):
    """A deep copy of the segments (voxels, names, colours, tags), for :func:`restore`."""
    import slicer
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation_node.GetSegmentation())
    return copy


def restore(segmentation_node, saved) -> None:
    segmentation_node.GetSegmentation().DeepCopy(saved)
    segmentation_node.Modified()


def labels_from_segmentation(segmentation_node, volume_node, classes: Sequence[Mapping[str, Any]],
                             model: Optional[str] = None, multi_label: bool = False) -> np.ndarray:
    """Label array (z, y, x) on the volume's grid for training: each card class's value
    where its segment is (found by class tag or name; with one class and one segment,
    that segment). Raises :class:`BridgeError` naming the segments when a class has
    none. With ``multi_label``, returns (C, z, y, x) bool masks instead."""
    ids = segment_ids(segmentation_node)
    chosen = {}
    for cls in classes:
        sid = find_class_segment(segmentation_node, cls, model)
        if sid is None and len(classes) == 1 and len(ids) == 1:
            sid = ids[0]
        if sid is None:
            names = [segmentation_node.GetSegmentation().GetSegment(i).GetName() for i in ids]
            raise BridgeError(f"segmentation {segmentation_node.GetName()!r} has no segment for class "
                              f"{cls['name']!r}; its segments are {names}. Rename a segment to {cls['name']!r}.")
        chosen[int(cls["value"])] = sid
    masks = {v: segment_mask(segmentation_node, sid, volume_node) for v, sid in chosen.items()}
    if multi_label:
        return np.stack([masks[int(c["value"])] for c in classes])
    shape = next(iter(masks.values())).shape
    labels = np.zeros(shape, np.uint8)
    for v in sorted(masks):  # later classes win where a user drew overlapping segments
        labels[masks[v]] = v
    return labels


# ----------------------------------------------------------------------------- files


def load_volume(scene, path, name: Optional[str] = None, labelmap: bool = False):
    """Read an image file (NIfTI, NRRD, MHA, PNG …) into a new volume node through
    Slicer's own archetype reader (same geometry as in the application). Files that
    reader cannot open — 2D photographs with slicer-core alone, whose ITK has no PNG/JPEG
    reader registered — are read with SimpleITK instead (RGB becomes a vector volume)."""
    import slicer
    path = Path(path)
    if not path.is_file():
        raise BridgeError(f"no such file: {path}")
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                                   name or stem(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    if storage.ReadData(node):
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        return node
    scene.RemoveNode(node)
    scene.RemoveNode(storage)
    from ..inference.io import read_image
    try:
        image = read_image(path)
    except ValueError as e:
        raise BridgeError(f"{path}: Slicer could not read this image file: {e}") from None
    if image.GetDimension() not in (2, 3):
        raise BridgeError(f"{path}: a {image.GetDimension()}D image; volumes are 2D or 3D")
    return sitk_to_volume(image, scene, name or stem(path),
                          "vtkMRMLLabelMapVolumeNode" if labelmap else None)


def load_segmentation(scene, path, name: Optional[str] = None):
    """Read a ``.seg.nrrd`` (or labelmap file) into a new segmentation node."""
    import slicer
    ensure_segmentation_converters()
    path = Path(path)
    if not path.is_file():
        raise BridgeError(f"no such file: {path}")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or stem(path))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise BridgeError(f"{path}: Slicer could not read this segmentation file")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def save_segmentation(segmentation_node, path) -> Path:
    """Write a segmentation to ``.seg.nrrd`` atomically (temporary file, then rename), so
    an interrupted save never destroys an existing file."""
    import slicer
    from ..fileio import atomic_path
    path = Path(path)

    def verify(tmp):  # teem refuses a cut-short .nrrd: read it back through ITK
        import SimpleITK as sitk
        sitk.ReadImage(str(tmp))

    with atomic_path(path, suffix=".tmp.seg.nrrd", verify=verify) as tmp:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(tmp))
        if not storage.WriteData(segmentation_node):
            raise BridgeError(f"{path}: Slicer could not write the segmentation")
    return path


def class_segments(segmentation_node, classes: Iterable[Mapping[str, Any]], model: Optional[str] = None,
                   create: bool = True) -> Dict[int, str]:
    """{class value: segment ID}, reusing segments of an earlier run (tag or name) and
    adding the missing ones when ``create``."""
    out = {}
    for cls in classes:
        sid = find_class_segment(segmentation_node, cls, model)
        if sid is None and create:
            sid = add_class_segment(segmentation_node, cls, model)
        if sid is not None:
            out[int(cls["value"])] = sid
    return out
