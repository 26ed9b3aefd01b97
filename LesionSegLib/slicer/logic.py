"""LesionSegLogic: what the Slicer module, its Segment Editor effects and the Python
console use to segment, batch-process, train and manage weights.

Qt-free: it needs MRML (the Slicer application, or the ``slicer-core`` wheel in plain
Python) only for the functions that take or make nodes, and imports ``slicer``, torch
and the inference code inside the functions, so importing it at Slicer startup costs
nothing. ``LesionSeg/LesionSeg.py`` exposes it as ``LesionSegLogic`` the Slicer way.

Console::

    logic = slicer.util.getModuleLogic("LesionSeg")          # or LesionSegLib.slicer.logic.LesionSegLogic()
    seg = logic.segment(volumeNode, model="msenet", preset="isles-dwi")
    summary = logic.segmentFiles(["/data/cases"], "/data/out", model="m2snet", preset="covid-ct")

Work is split so that the GUI keeps MRML on the main thread and the network out of
Slicer's process: :meth:`startSegmentJob` (main thread: writes the source volume with its
geometry to a file and starts a worker process, :mod:`.worker`), the worker's
:meth:`predict` (no MRML), then :meth:`finishSegmentJob` (main thread: reads the result
and writes it through the editor's modifier labelmap). Batches, training and downloads
from the panel go through the same worker (:meth:`startBatchJob`, :meth:`startTrainJob`,
:meth:`startDownloadJob`). :meth:`segment` (console, scripts) runs in this process.
Nothing is written into a segmentation until the prediction is complete, so a cancelled
or failing run leaves it exactly as it was; a write that fails half-way is rolled back.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ..jobs import Progress, ProgressCallback
from . import EFFECT_MODELS, bridge
from .logic_batch import IMAGE_SUFFIXES, LESIONS_NAME, OUTPUT_FORMATS, SUMMARY_NAME, BatchLogic, BatchSummary, batch_inputs
from .errors import LesionSegError
from .logic_training import TrainingLogic
from .logic_weights import WeightsLogic
from .logic_jobs import SegmentJob, WorkerJobLogic

__all__ = ["LesionSegLogic", "LesionSegError", "BatchSummary", "SegmentJob", "batch_inputs", "IMAGE_SUFFIXES",
           "OUTPUT_FORMATS", "SUMMARY_NAME", "LESIONS_NAME"]

logger = logging.getLogger("LesionSeg")


class LesionSegLogic(WeightsLogic, WorkerJobLogic, BatchLogic, TrainingLogic):
    """Segment volumes with the LesionSeg networks, in batches, train them, manage weights.

    ``scene``: the MRML scene for nodes the logic creates when no input node tells it
    (default: the input node's scene; ``slicer.mrmlScene`` in Slicer).
    ``log``: callable(str) for messages (default: the ``LesionSeg`` logger).
    """

    def __init__(self, scene=None, log: Optional[Callable[[str], None]] = None):
        self.scene = scene
        self.log = log or logger.info
        self._predictor = None
        self._predictor_key = None
        self._lock = threading.Lock()
        self.lastPrediction = None
        self.lastProbabilityVolumes: List[Any] = []

    # ------------------------------------------------------------------ models

    @staticmethod
    def models(all: bool = False) -> List[str]:
        """Registry names: the five published networks (``all``: with the baselines)."""
        from .. import models
        return models.list_models() if all else list(EFFECT_MODELS)

    @staticmethod
    def presets(model: str) -> List[str]:
        from .. import models
        return list(models.card(model).get("presets", {}))

    @staticmethod
    def modelCard(model: str, preset: Optional[str] = None) -> Dict[str, Any]:
        """The model card with the task preset's input, classes and outputs merged in."""
        from .. import models
        card = models.card(model)
        p = models.preset(model, preset)
        card["input"], card["classes"], card["outputs"] = p["input"], p["classes"], p["outputs"]
        card["preset"] = p
        return card

    # ------------------------------------------------------------------ effect parameters

    #: parameter values that stand for "no choice": Slicer treats an empty parameter as
    #: undefined (it logs "Parameter … cannot be found"), so every default is non-empty
    NEWEST_WEIGHTS = "newest"
    ALL_CLASSES = "all"

    @classmethod
    def effectParameterDefaults(cls, model: str) -> Dict[str, str]:
        """The Segment Editor effect's parameters (stored on the segment editor node) with
        their defaults, all non-empty."""
        from .. import models
        card = models.card(model)
        preset = card.get("default_preset") or next(iter(card.get("presets", {})), "")
        threshold = models.Outputs.of(models.preset(model, preset or None)).threshold
        return {"Preset": preset or "default", "Checkpoint": cls.NEWEST_WEIGHTS, "Device": "auto",
                "UseCardThreshold": "1", "Threshold": repr(float(threshold)), "SeedThreshold": "0",
                "TTA": "0", "ProbabilityMap": "0", "Segments": cls.ALL_CLASSES}

    @classmethod
    def effectOptions(cls, model: str, parameter: Callable[[str], str]) -> Dict[str, Any]:
        """:meth:`startSegmentJob` options from an effect's parameters (``parameter(name)``
        returns the stored string); also "classes": the class values to write, or None."""
        p = {k: (parameter(k) or v) for k, v in cls.effectParameterDefaults(model).items()}
        checkpoint = p["Checkpoint"]
        segments = p["Segments"]
        return {
            "model": model,
            "checkpoint": None if checkpoint == cls.NEWEST_WEIGHTS else checkpoint,
            "preset": None if p["Preset"] == "default" else p["Preset"],
            "device": p["Device"],
            "threshold": None if int(float(p["UseCardThreshold"])) else float(p["Threshold"]),
            # the card's threshold comes with the weights' rules (a release's seed threshold);
            # with their own threshold, the user's seed threshold (0: none) is the only rule
            "seedThreshold": None if int(float(p["UseCardThreshold"])) else float(p["SeedThreshold"]),
            "tta": bool(int(float(p["TTA"]))),
            "probabilities": bool(int(float(p["ProbabilityMap"]))),
            "classes": None if segments == cls.ALL_CLASSES else [int(v) for v in segments.split(",") if v.strip()],
        }

    # ------------------------------------------------------------------ inference

    def predictor(self, model: str = "msenet", checkpoint=None, preset: Optional[str] = None, device: str = "auto",
                  tta: bool = False, allowRandomWeights: bool = False):
        """A (cached) :class:`LesionSegLib.inference.Predictor`. Without weights it
        refuses, unless ``allowRandomWeights`` (tests, demonstrations)."""
        from ..inference import Predictor
        path = self.requireWeights(model, checkpoint, preset, allowRandomWeights)
        stamp = os.stat(path).st_mtime_ns if path else None
        key = (model, path, stamp, preset, device, bool(tta))
        with self._lock:
            if self._predictor_key != key:
                self._predictor = None   # free the old network before building the new one
                self._predictor = Predictor(path if path else model, preset=preset, device=device, tta=bool(tta))
                self._predictor_key = key
            return self._predictor

    @staticmethod
    def inputImage(volumeNode):
        """SimpleITK image of a volume node (main thread; a copy, safe to use on a worker)."""
        if volumeNode is None:
            raise LesionSegError("no input volume selected")
        if volumeNode.GetImageData() is None:
            raise LesionSegError(f"volume {volumeNode.GetName()!r} holds no image data")
        from ..validation import check_geometry
        try:
            check_geometry(volumeNode.GetSpacing(), volumeNode.GetOrigin(), [1, 0, 0, 0, 1, 0, 0, 0, 1],
                           f"volume {volumeNode.GetName()!r}")
        except ValueError as e:
            raise LesionSegError(str(e).replace("fix the image header", "fix it in the Volumes module "
                                                "(Volume Information)")) from None
        return bridge.volume_to_sitk(volumeNode)

    def predict(self, image, model: str = "msenet", checkpoint=None, preset: Optional[str] = None,
                device: str = "auto", threshold: Optional[float] = None, tta: bool = False,
                probabilities: bool = False, minLesionSizeMm3: float = 0.0, progress: Optional[ProgressCallback] = None,
                cancel=None, allowRandomWeights: bool = False, seedThreshold: Optional[float] = None):
        """Run a network on a SimpleITK image (any thread; touches no MRML node).
        Single-slice images (photographs, 2D slices) go through ``predict_image`` (then
        ``minLesionSizeMm3`` is an area in mm²), volumes through ``predict_volume``; the
        result is on the image's own grid. ``seedThreshold``: keep only lesions with a
        voxel at or above this probability (default: the weights' own rule, if any; 0 keeps
        every lesion)."""
        import numpy as np
        import SimpleITK as sitk
        from ..preprocessing import InputError
        from ..validation import OptionError, number
        from ..validation import threshold as _threshold
        try:
            threshold = _threshold(threshold)
            minLesionSizeMm3 = number(minLesionSizeMm3, "the minimum lesion size", lo=0.0)
        except OptionError as e:
            raise LesionSegError(str(e)) from None
        prog = Progress(progress)
        prog(0.0, "loading network")
        pred = self.predictor(model, checkpoint, preset, device, tta, allowRandomWeights)
        try:
            pred.outputs.decision(threshold, seedThreshold)
        except InputError as e:
            raise LesionSegError(str(e)) from None
        prog(0.05, f"running {model} on {pred.device}")
        sub = prog.span(0.05, 1.0)
        if image.GetDimension() == 3 and image.GetSize()[2] == 1 or image.GetDimension() == 2:
            arr = sitk.GetArrayFromImage(image)
            arr = arr[0] if image.GetDimension() == 3 else arr
            # lesion areas in mm² from the image's pixel spacing; the size limit is then an area
            result = pred.predict_image(arr, threshold=threshold, seed_threshold=seedThreshold,
                                        return_probabilities=probabilities,
                                        spacing=tuple(image.GetSpacing())[:2],
                                        min_lesion_size_mm2=minLesionSizeMm3, progress=sub, cancel=cancel)
            # back to the (z, y, x) layout of a one-slice volume
            result.masks = {v: np.asarray(m)[None] for v, m in result.masks.items()}
            labels = np.asarray(result.labels)[None]
            lab = sitk.GetImageFromArray(labels)
            if image.GetDimension() == 3:
                lab.CopyInformation(sitk.Image(image.GetSize(), sitk.sitkUInt8))
                lab.SetSpacing(image.GetSpacing())
                lab.SetOrigin(image.GetOrigin())
                lab.SetDirection(image.GetDirection())
            result.labels = lab
            if result.probabilities is not None:
                result.probabilities = np.asarray(result.probabilities)[:, None]
        else:
            result = pred.predict_volume(image, threshold=threshold, seed_threshold=seedThreshold,
                                         min_lesion_size_mm3=minLesionSizeMm3,
                                         return_probabilities=probabilities, progress=sub, cancel=cancel)
        nonfinite = int(result.info.get("nonfinite_voxels") or 0)
        if nonfinite:
            self.log(f"LesionSeg: {nonfinite} voxel(s) of the input are NaN or infinite; they were left out of "
                     f"the intensity statistics and read as the lowest intensity")
        prog.done()
        return result

    # ------------------------------------------------------------------ writing

    def writePrediction(self, prediction, volumeNode, segmentationNode=None, model: Optional[str] = None,
                        classes: Optional[Sequence[Union[int, str]]] = None,
                        segmentIds: Optional[Mapping[Union[int, str], str]] = None, editorLogic=None,
                        probabilityVolume: bool = False, provenance: Optional[Mapping[str, Any]] = None,
                        writer: Optional[Callable[[Any, str, Any, Any], None]] = None):
        """Write a prediction into a segmentation node (main thread). Returns the node.

        One segment per class (``classes``: the values or names to write, default all),
        named, coloured and terminology-coded from the card; a segment made by an
        earlier run of the same model, or with the class's name, is reused and replaced.
        ``segmentIds`` {class value or name: segment ID} writes a class into a chosen
        segment (e.g. the Segment Editor's selected segment), which keeps its name.
        With ``editorLogic`` (a ``vtkSlicerSegmentEditorLogic`` set up on this
        segmentation and volume) writing goes through the modifier labelmap, so the
        editor's masking settings apply; without it, voxels are replaced as predicted.
        ``writer(segmentationNode, segmentId, mask, volumeNode)`` replaces both (the Segment
        Editor effects pass one that goes through their modifier labelmap).
        A failure while writing restores the segmentation as it was."""
        import numpy as np
        scene = volumeNode.GetScene() or self._scene()
        all_classes = list(prediction.classes)
        chosen = self._select_classes(all_classes, classes)
        targets = {}
        for key, sid in (segmentIds or {}).items():
            cls = self._select_classes(all_classes, [key])[0]
            targets[int(cls["value"])] = sid
        # validate everything before the first voxel is written
        dims = volumeNode.GetImageData().GetDimensions()
        shape = (dims[2], dims[1], dims[0])
        masks = {}
        for cls in chosen:
            v = int(cls["value"])
            if v not in prediction.masks:
                raise LesionSegError(f"the prediction has no mask for class {cls['name']!r}")
            m = np.asarray(prediction.masks[v]).astype(bool)
            if m.shape != shape:
                raise LesionSegError(f"mask of {cls['name']!r} has shape {m.shape}, volume "
                                     f"{volumeNode.GetName()!r} is {shape}")
            masks[v] = m
        for sid in targets.values():
            if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(sid) is None:
                where = repr(segmentationNode.GetName()) if segmentationNode is not None else "(none given)"
                raise LesionSegError(f"segmentation {where} has no segment {sid!r}")
        created = segmentationNode is None
        if created:
            segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                       f"{volumeNode.GetName()} {model or 'LesionSeg'}")
        saved = bridge.snapshot(segmentationNode)
        try:
            bridge.prepare_segmentation(segmentationNode, volumeNode)
            ids = {}
            for cls in chosen:
                v = int(cls["value"])
                sid = targets.get(v)
                if sid is None:
                    sid = bridge.find_class_segment(segmentationNode, cls, model)
                    if sid is None:
                        sid = bridge.add_class_segment(segmentationNode, cls, model)
                    else:
                        bridge.describe_segment(segmentationNode, sid, cls, model)
                elif model:
                    # a user-chosen segment keeps its name and colour; record what filled it
                    segmentationNode.GetSegmentation().GetSegment(sid).SetTag(
                        bridge.CLASS_TAG, bridge.class_tag(model, v))
                ids[v] = sid

            def write(v):
                if writer is not None:
                    writer(segmentationNode, ids[v], masks[v], volumeNode)
                elif editorLogic is not None:
                    bridge.modify_segment_with_editor(editorLogic, segmentationNode, ids[v], masks[v], volumeNode)
                else:
                    bridge.set_segment_mask(segmentationNode, ids[v], masks[v], volumeNode)

            through_editor = writer is not None or editorLogic is not None
            if not through_editor or len(ids) == 1:
                for v in ids:
                    write(v)
            else:
                # The classes of one result may overlap (L-Seg). Written one after the
                # other through the editor, each would be cut by the ones before it: by
                # the overwrite mode ("all segments" by default), and by masking when a
                # class's voxels leave a mask segment. So: what the editor makes of each
                # class is taken on the segmentation as it was before this result…
                before = bridge.snapshot(segmentationNode)
                alone = {}
                for v in ids:
                    write(v)
                    alone[v] = bridge.segment_mask(segmentationNode, ids[v], volumeNode)
                    bridge.restore(segmentationNode, before)
                # …all classes are written in turn, so that the overwrite mode applies to
                # the other segments as the user set it, then each class gets its voxels back.
                for v in ids:
                    write(v)
                for v, mask in alone.items():
                    if not np.array_equal(bridge.segment_mask(segmentationNode, ids[v], volumeNode), mask):
                        bridge.set_segment_mask(segmentationNode, ids[v], mask, volumeNode)
            for key, value in (provenance or {}).items():
                segmentationNode.SetAttribute(f"LesionSeg.{key}", str(value))
        except BaseException:
            if created:
                scene.RemoveNode(segmentationNode)
            else:
                bridge.restore(segmentationNode, saved)
            raise
        self.lastProbabilityVolumes = []
        if probabilityVolume:
            if prediction.probabilities is None:
                raise LesionSegError("probability maps were not computed (predict with probabilities=True)")
            self.lastProbabilityVolumes = self._probability_volumes(prediction, volumeNode, chosen, all_classes)
        return segmentationNode

    def _probability_volumes(self, prediction, volumeNode, chosen, all_classes) -> List[Any]:
        import numpy as np
        scene = volumeNode.GetScene() or self._scene()
        probs = np.asarray(prediction.probabilities, dtype=np.float32)
        index = {int(c["value"]): i for i, c in enumerate(all_classes)}
        out = []
        for cls in chosen:
            name = f"{volumeNode.GetName()} {cls['name']} probability"
            node = scene.GetFirstNodeByName(name)
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            bridge.update_volume_from_array(node, probs[index[int(cls["value"])]], bridge.ijk_to_ras(volumeNode))
            if volumeNode.GetParentTransformNode() is not None:
                node.SetAndObserveTransformNodeID(volumeNode.GetParentTransformNode().GetID())
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            out.append(node)
        return out

    @staticmethod
    def _select_classes(all_classes, wanted) -> List[Dict[str, Any]]:
        if wanted is None:
            return list(all_classes)
        out = []
        for w in wanted:
            hits = [c for c in all_classes if (isinstance(w, int) and int(c["value"]) == w)
                    or (isinstance(w, str) and w.strip().lower() in (c["name"].lower(), str(c["value"])))]
            if not hits:
                raise LesionSegError(f"unknown class {w!r}; the network's classes are "
                                     f"{[c['name'] for c in all_classes]}")
            out.extend(h for h in hits if h not in out)
        return out

    def _scene(self):
        if self.scene is not None:
            return self.scene
        import slicer
        scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise LesionSegError("no MRML scene: pass scene= to LesionSegLogic")
        return scene

    def segment(self, volumeNode, segmentationNode=None, model: str = "msenet", checkpoint=None,
                preset: Optional[str] = None, device: str = "auto", threshold: Optional[float] = None,
                tta: bool = False, probabilityVolume: bool = False, classes=None, segmentIds=None,
                editorLogic=None, minLesionSizeMm3: float = 0.0, progress: Optional[ProgressCallback] = None, cancel=None,
                allowRandomWeights: bool = False, seedThreshold: Optional[float] = None):
        """Segment ``volumeNode`` with ``model`` and return the segmentation node (a new one
        when ``segmentationNode`` is None), one segment per output class, on the volume's
        geometry. ``checkpoint``: a weight file or installed entry id (default: newest
        installed for the model and preset). ``threshold`` overrides the card's,
        ``seedThreshold`` the weights' hysteresis rule (see :meth:`predict`).
        ``probabilityVolume`` also adds one probability volume per class
        (:attr:`lastProbabilityVolumes`). ``progress(fraction, message)``;
        ``cancel``: an ``inference.CancelToken``. A cancelled or failing run raises and
        leaves ``segmentationNode`` unchanged (and creates no node)."""
        prog = Progress(progress)
        image = self.inputImage(volumeNode)
        prediction = self.predict(image, model=model, checkpoint=checkpoint, preset=preset, device=device,
                                  threshold=threshold, tta=tta, probabilities=probabilityVolume,
                                  minLesionSizeMm3=minLesionSizeMm3, progress=prog.span(0.0, 0.95),
                                  cancel=cancel, allowRandomWeights=allowRandomWeights, seedThreshold=seedThreshold)
        self.lastPrediction = prediction
        prog(0.96, "writing segments")
        if editorLogic is not None:
            editorLogic.SaveStateForUndo()
        ckpt = self.resolveCheckpoint(model, checkpoint, preset)
        node = self.writePrediction(
            prediction, volumeNode, segmentationNode, model=model, classes=classes, segmentIds=segmentIds,
            editorLogic=editorLogic, probabilityVolume=probabilityVolume,
            provenance=self.provenance(prediction, model, preset, ckpt, threshold))
        prog.done()
        return node

    @staticmethod
    def provenance(prediction, model: str, preset: Optional[str], checkpoint, threshold: Optional[float]):
        """What a segmentation node records of the run that made it (its "LesionSeg.…"
        attributes): the same for the console and for a worker's result."""
        return {"model": model, "preset": preset or "", "checkpoint": checkpoint or "random weights",
                "threshold": "card" if threshold is None else threshold,
                "seed threshold": prediction.info.get("seed_threshold") or "none"}

    # ------------------------------------------------------------------ training
