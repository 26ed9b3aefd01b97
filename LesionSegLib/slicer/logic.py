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

import csv
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ..fileio import READABLE_EXTENSIONS
from . import EFFECT_MODELS, bridge
from .. import weights as _weights

logger = logging.getLogger("LesionSeg")

IMAGE_SUFFIXES = READABLE_EXTENSIONS
OUTPUT_FORMATS = ("seg.nrrd", "nii.gz", "nrrd")
SUMMARY_NAME = "lesionseg-summary.json"
LESIONS_NAME = "lesionseg-lesions.csv"
Progress = Optional[Callable[[float, str], None]]


class LesionSegError(ValueError):
    """Bad input to the logic, with the reason (shown to the user as it is)."""


@dataclass
class BatchSummary:
    """Result of :meth:`LesionSegLogic.segmentFiles`."""
    succeeded: List[Dict[str, Any]] = field(default_factory=list)   # input, output, lesions, voxels, seconds
    failed: List[Dict[str, Any]] = field(default_factory=list)      # input, error
    cancelled: List[str] = field(default_factory=list)              # inputs not processed
    summary_file: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.cancelled

    def __str__(self) -> str:
        lines = [f"{len(self.succeeded)} succeeded, {len(self.failed)} failed, {len(self.cancelled)} cancelled"]
        lines += [f"  FAILED {f['input']}: {f['error']}" for f in self.failed]
        if self.summary_file:
            lines.append(f"  summary: {self.summary_file}")
        return "\n".join(lines)


def _call(progress: Progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(max(0.0, min(1.0, float(fraction))), message)


def _scaled(progress: Progress, start: float, stop: float, prefix: str = "") -> Progress:
    if progress is None:
        return None
    return lambda f, m: progress(start + (stop - start) * max(0.0, min(1.0, f)), f"{prefix}{m}")


def _is_cancelled(exc: BaseException) -> bool:
    try:
        from ..inference import Cancelled
    except ImportError:  # pragma: no cover - inference always ships with the logic
        return False
    return isinstance(exc, Cancelled)


def image_files(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> List[Path]:
    """Image files named by ``paths``: files as given, folders expanded (sorted, not
    recursive). Segmentation files (``.seg.nrrd``) and LesionSeg outputs are skipped in
    folders."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            for child in sorted(p.iterdir()):
                name = child.name.lower()
                if (child.is_file() and name.endswith(IMAGE_SUFFIXES) and not name.endswith(".seg.nrrd")
                        and "_lesionseg" not in name):
                    out.append(child)
        else:
            out.append(p)
    return out


class LesionSegLogic:
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

    # ------------------------------------------------------------------ weights

    @staticmethod
    def weightsCacheDir() -> Path:
        """The weights cache (environment variable ``LESIONSEG_CACHE`` moves it)."""
        return _weights.cache_dir()

    @staticmethod
    def installedWeights(model: Optional[str] = None) -> List[_weights.InstalledWeights]:
        return _weights.list_installed(model)

    @staticmethod
    def importCheckpoint(path, name: Optional[str] = None, model: Optional[str] = None,
                         preset: Optional[str] = None) -> _weights.InstalledWeights:
        """Install a weight file the user has (offline use); the original is not touched."""
        return _weights.import_checkpoint(path, name=name, model=model, preset=preset)

    @staticmethod
    def downloadWeights(url: str, sha256: str, name: Optional[str] = None, model: Optional[str] = None,
                        preset: Optional[str] = None, progress: Progress = None, cancel=None) -> _weights.InstalledWeights:
        """Download weights into the cache; refused unless the SHA-256 matches."""
        return _weights.download(url, sha256, name=name, model=model, preset=preset, progress=progress, cancel=cancel)

    @staticmethod
    def removeWeights(entry_id: str) -> int:
        return _weights.remove(entry_id)

    @staticmethod
    def clearWeightsCache() -> int:
        """Delete all installed weights; returns the bytes freed."""
        return _weights.clear_cache()

    @staticmethod
    def resolveCheckpoint(model: str, checkpoint=None, preset: Optional[str] = None) -> Optional[str]:
        """The weight file to use: ``checkpoint`` (a path, or an installed entry's id), else
        the newest installed weights of ``model`` for ``preset``; None when there are none."""
        if checkpoint:
            p = Path(str(checkpoint)).expanduser()
            if p.is_file():
                return str(p)
            try:
                return _weights.get(str(checkpoint)).path
            except _weights.WeightsError:
                raise LesionSegError(f"checkpoint {checkpoint!r} is neither a file nor installed weights") from None
        entry = _weights.find(model, preset)
        return entry.path if entry else None

    def requireWeights(self, model: str, checkpoint=None, preset: Optional[str] = None,
                       allowRandomWeights: bool = False) -> Optional[str]:
        """The weight file a run will use, or a :class:`LesionSegError` saying that none is
        installed and what to do (the one "no weights" check of the module and effects)."""
        path = self.resolveCheckpoint(model, checkpoint, preset)
        if path is None and not allowRandomWeights:
            from .. import models
            name = models.card(model)["display_name"]
            raise LesionSegError(
                f"no weights installed for {name}"
                + (f" ({preset})" if preset else "")
                + ": import a checkpoint file or download weights in the LesionSeg module (Weights section), "
                  "or train the network on your own cases")
        return path

    @staticmethod
    def weightsChoices(model: str, preset: Optional[str] = None) -> List[tuple]:
        """(label, value) items of a weights selector: "newest installed" (value "") and
        the installed weights of ``model`` usable with ``preset``."""
        entries = [e for e in _weights.list_installed(model) if e.preset in (None, preset)]
        items = [("newest installed" if entries else "(no weights installed: see the LesionSeg module)", "")]
        return items + [(e.label, e.id) for e in entries]

    @staticmethod
    def weightsFileFilter() -> str:
        """File-dialog filter for importing weights (``.safetensors`` only when the
        safetensors package is installed)."""
        import importlib.util
        patterns = ["*.pt", "*.pth", "*.ckpt"]
        if importlib.util.find_spec("safetensors") is not None:
            patterns.append("*.safetensors")
        return f"Weights ({' '.join(patterns)});;All files (*)"

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
        threshold = models.preset(model, preset or None)["outputs"].get("threshold", 0.5)
        return {"Preset": preset or "default", "Checkpoint": cls.NEWEST_WEIGHTS, "Device": "auto",
                "UseCardThreshold": "1", "Threshold": repr(float(threshold)), "TTA": "0", "ProbabilityMap": "0",
                "Segments": cls.ALL_CLASSES}

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
                probabilities: bool = False, minLesionSizeMm3: float = 0.0, progress: Progress = None,
                cancel=None, allowRandomWeights: bool = False):
        """Run a network on a SimpleITK image (any thread; touches no MRML node).
        Single-slice images (photographs, 2D slices) go through ``predict_image`` (then
        ``minLesionSizeMm3`` is an area in mm²), volumes through ``predict_volume``; the
        result is on the image's own grid."""
        import numpy as np
        import SimpleITK as sitk
        from ..validation import OptionError, number
        from ..validation import threshold as _threshold
        try:
            threshold = _threshold(threshold)
            minLesionSizeMm3 = number(minLesionSizeMm3, "the minimum lesion size", lo=0.0)
        except OptionError as e:
            raise LesionSegError(str(e)) from None
        _call(progress, 0.0, "loading network")
        pred = self.predictor(model, checkpoint, preset, device, tta, allowRandomWeights)
        _call(progress, 0.05, f"running {model} on {pred.device}")
        sub = _scaled(progress, 0.05, 1.0)
        if image.GetDimension() == 3 and image.GetSize()[2] == 1 or image.GetDimension() == 2:
            arr = sitk.GetArrayFromImage(image)
            arr = arr[0] if image.GetDimension() == 3 else arr
            # lesion areas in mm² from the image's pixel spacing; the size limit is then an area
            result = pred.predict_image(arr, threshold=threshold, return_probabilities=probabilities,
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
            result = pred.predict_volume(image, threshold=threshold, min_lesion_size_mm3=minLesionSizeMm3,
                                         return_probabilities=probabilities, progress=sub, cancel=cancel)
        nonfinite = int(result.info.get("nonfinite_voxels") or 0)
        if nonfinite:
            self.log(f"LesionSeg: {nonfinite} voxel(s) of the input are NaN or infinite; they were left out of "
                     f"the intensity statistics and read as the lowest intensity")
        _call(progress, 1.0, "done")
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
                editorLogic=None, minLesionSizeMm3: float = 0.0, progress: Progress = None, cancel=None,
                allowRandomWeights: bool = False):
        """Segment ``volumeNode`` with ``model`` and return the segmentation node (a new one
        when ``segmentationNode`` is None), one segment per output class, on the volume's
        geometry. ``checkpoint``: a weight file or installed entry id (default: newest
        installed for the model and preset). ``threshold`` overrides the card's.
        ``probabilityVolume`` also adds one probability volume per class
        (:attr:`lastProbabilityVolumes`). ``progress(fraction, message)``;
        ``cancel``: an ``inference.CancelToken``. A cancelled or failing run raises and
        leaves ``segmentationNode`` unchanged (and creates no node)."""
        image = self.inputImage(volumeNode)
        prediction = self.predict(image, model=model, checkpoint=checkpoint, preset=preset, device=device,
                                  threshold=threshold, tta=tta, probabilities=probabilityVolume,
                                  minLesionSizeMm3=minLesionSizeMm3, progress=_scaled(progress, 0.0, 0.95),
                                  cancel=cancel, allowRandomWeights=allowRandomWeights)
        self.lastPrediction = prediction
        _call(progress, 0.96, "writing segments")
        if editorLogic is not None:
            editorLogic.SaveStateForUndo()
        ckpt = self.resolveCheckpoint(model, checkpoint, preset)
        node = self.writePrediction(
            prediction, volumeNode, segmentationNode, model=model, classes=classes, segmentIds=segmentIds,
            editorLogic=editorLogic, probabilityVolume=probabilityVolume,
            provenance={"model": model, "preset": preset or "", "checkpoint": ckpt or "random weights",
                        "threshold": "card" if threshold is None else threshold})
        _call(progress, 1.0, "done")
        return node

    # ------------------------------------------------------------------ worker jobs

    @staticmethod
    def _job_options(python=None, env=None) -> Dict[str, Any]:
        return {"python": python, "env": env}

    def startSegmentJob(self, volumeNode, segmentationNode=None, model: str = "msenet", checkpoint=None,
                        preset: Optional[str] = None, device: str = "auto", threshold: Optional[float] = None,
                        tta: bool = False, probabilities: bool = False, minLesionSizeMm3: float = 0.0,
                        selectedSegmentId: Optional[str] = None, allowRandomWeights: bool = False,
                        python: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> "SegmentJob":
        """Start segmenting ``volumeNode`` in a worker process (main thread; returns at once).

        The weights are resolved and the source volume is written to the job folder
        with its exact geometry now; the nodes are pinned: :meth:`finishSegmentJob`
        writes into these, whatever the user selects meanwhile. Poll ``job.poll()``."""
        from .worker import WorkerJob
        if volumeNode is None:
            raise LesionSegError("no input volume selected")
        path = self.requireWeights(model, checkpoint, preset, allowRandomWeights)
        image = self.inputImage(volumeNode)
        args = {"input": "input.nrrd", "model": model, "checkpoint": path, "preset": preset, "device": device,
                "threshold": threshold, "tta": bool(tta), "probabilities": bool(probabilities),
                "minLesionSizeMm3": float(minLesionSizeMm3), "allowRandomWeights": bool(allowRandomWeights)}
        job = WorkerJob("segment", args, python=python, env=env)
        try:
            import SimpleITK as sitk
            sitk.WriteImage(image, str(job.path("input.nrrd")), True)
            job.start()
        except BaseException:
            job.cleanup()
            raise
        return SegmentJob(job, volumeNode, segmentationNode, selectedSegmentId,
                          {"model": model, "preset": preset, "checkpoint": path, "threshold": threshold,
                           "probabilities": bool(probabilities)})

    def readSegmentResult(self, job, volumeNode):
        """The worker's result as a ``Prediction`` on ``volumeNode``'s grid (refused when
        a mask is not on that grid)."""
        import numpy as np
        import SimpleITK as sitk
        from ..inference.predictor import Prediction
        from .worker import WorkerError
        if job.error:
            raise WorkerError(job.error)
        if job.result is None:
            raise WorkerError("the job produced no result")
        res = job.result
        dims = volumeNode.GetImageData().GetDimensions()
        shape = (dims[2], dims[1], dims[0])
        reference = self.inputImage(volumeNode)
        masks, probs = {}, []
        for cls in res["classes"]:
            v = int(cls["value"])
            name = res["masks"].get(str(v))
            if name is None:
                continue
            image = sitk.ReadImage(str(job.path(name)))
            arr = sitk.GetArrayFromImage(image)
            if arr.shape != shape or not np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6) \
                    or not np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4) \
                    or not np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6):
                raise WorkerError(f"the result for {cls['name']!r} is not on the grid of {volumeNode.GetName()!r}")
            masks[v] = arr.astype(bool)
            if res.get("probabilities"):
                probs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(job.path(res["probabilities"][str(v)])))))
        probabilities = np.stack(probs).astype(np.float32) if probs else None
        return Prediction(None, masks, probabilities, list(res["classes"]), list(res.get("lesions") or []),
                          dict(res.get("info") or {}))

    def finishSegmentJob(self, run: "SegmentJob", editorNode=None, editorLogic=None, writer=None,
                         saveStateForUndo: Optional[Callable[[], None]] = None, classes=None):
        """Main thread, once ``run.job.poll()`` is True: write the result into the nodes of
        the Apply and return the segmentation node. Raises ``WorkerError`` (one line) when
        the worker failed; returns None when it was cancelled. Nothing is changed then.

        With ``editorNode`` (the Segment Editor's parameter node) the editor is pointed
        back at the Apply's segmentation and source volume if the user switched them
        meanwhile, so that the result, its undo state and the masking all belong to the
        nodes of the Apply. ``editorLogic`` (a ``vtkSlicerSegmentEditorLogic``) or
        ``writer`` (an effect's modifier-labelmap writer) writes through the editor;
        ``saveStateForUndo`` (default: the editor logic's) is called before the first voxel."""
        job = run.job
        try:
            if job.cancelled:
                return None
            if run.volume.GetScene() is None or (run.segmentation is not None and run.segmentation.GetScene() is None):
                raise LesionSegError("the volume or segmentation of this run was removed while the network was running")
            prediction = self.readSegmentResult(job, run.volume)
            self.lastPrediction = prediction
            if editorNode is not None:
                if run.segmentation is not None and editorNode.GetSegmentationNode() is not run.segmentation:
                    editorNode.SetAndObserveSegmentationNode(run.segmentation)
                if editorNode.GetSourceVolumeNode() is not run.volume:
                    editorNode.SetAndObserveSourceVolumeNode(run.volume)
            segment_ids = None
            cls_list = list(prediction.classes)
            if (len(cls_list) == 1 and run.selectedSegmentId and run.segmentation is not None
                    and run.segmentation.GetSegmentation().GetSegment(run.selectedSegmentId) is not None):
                segment_ids = {int(cls_list[0]["value"]): run.selectedSegmentId}
            if saveStateForUndo is not None:
                saveStateForUndo()
            elif editorLogic is not None:
                editorLogic.SaveStateForUndo()
            options = run.options
            return self.writePrediction(
                prediction, run.volume, run.segmentation, model=options["model"], classes=classes,
                segmentIds=segment_ids, editorLogic=editorLogic, writer=writer,
                probabilityVolume=options["probabilities"],
                provenance={"model": options["model"], "preset": options["preset"] or "",
                            "checkpoint": options["checkpoint"] or "random weights",
                            "threshold": "card" if options["threshold"] is None else options["threshold"]})
        finally:
            job.cleanup()

    def startBatchJob(self, paths, outputDir, python=None, env=None, **options):
        """:meth:`segmentFiles` in a worker process (the panel's batch)."""
        from .worker import WorkerJob
        if options.get("outputFormat", "seg.nrrd") not in OUTPUT_FORMATS:
            raise LesionSegError(f"unknown output format {options['outputFormat']!r}; "
                                 f"use one of {', '.join(OUTPUT_FORMATS)}")
        if not image_files(paths):
            raise LesionSegError(f"no image files in {paths!r}")
        options["checkpoint"] = self.requireWeights(options.get("model", "msenet"), options.get("checkpoint"),
                                                    options.get("preset"), options.get("allowRandomWeights", False))
        args = {"paths": [str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)],
                "outputDir": str(outputDir), **options}
        return WorkerJob("batch", args, python=python, env=env).start()

    def startTrainJob(self, pairs, outputDir, python=None, env=None, **options):
        """Training in a worker process (the panel's Training section): the pairs' MRML
        nodes are read here, on the main thread, into image/label files of the job; the
        worker trains on those files (no data loaders forked from Slicer)."""
        import SimpleITK as sitk
        from .worker import WorkerJob
        if not pairs:
            raise LesionSegError("no training pairs: select at least one volume with its segmentation")
        cases = self.trainingCases(pairs, options.get("model", "msenet"), options.get("preset"))
        job = WorkerJob("train", {}, python=python, env=env)
        files = []
        try:
            for k, case in enumerate(cases):
                if isinstance(case, dict):
                    a, b = f"case-{k:03d}-image.nrrd", f"case-{k:03d}-label.nrrd"
                    sitk.WriteImage(case["image"], str(job.path(a)), True)
                    sitk.WriteImage(case["label"], str(job.path(b)), True)
                    files.append((a, b))
                else:
                    files.append(tuple(str(Path(x).resolve()) for x in case))
            job.args = {"cases": files, "outputDir": str(outputDir), **options}
            return job.start()
        except BaseException:
            job.cleanup()
            raise

    def startDownloadJob(self, url: str, sha256: str, python=None, env=None, **options):
        """:meth:`downloadWeights` in a worker process."""
        from .worker import WorkerJob
        return WorkerJob("download", {"url": url, "sha256": sha256, **options}, python=python, env=env).start()

    # ------------------------------------------------------------------ batch

    def segmentFiles(self, paths, outputDir, model: str = "msenet", checkpoint=None, preset: Optional[str] = None,
                     device: str = "auto", threshold: Optional[float] = None, tta: bool = False,
                     outputFormat: str = "seg.nrrd", overwrite: bool = False, minLesionSizeMm3: float = 0.0,
                     progress: Progress = None, cancel=None, allowRandomWeights: bool = False) -> BatchSummary:
        """Segment many image files (files and/or folders) into ``outputDir``.

        Each case gets ``<name>.seg.nrrd`` (segments named and coded as in Slicer; written
        through MRML when Slicer or slicer-core is there, else by
        :mod:`LesionSegLib.slicer.segnrrd`) or a labelmap ``<name>_lesionseg.nii.gz`` / ``.nrrd``. A failing case is recorded and the batch goes on; inputs are
        never overwritten, existing outputs only with ``overwrite``. Writes
        ``lesionseg-summary.json`` and ``lesionseg-lesions.csv`` into ``outputDir``."""
        import SimpleITK as sitk
        if outputFormat not in OUTPUT_FORMATS:
            raise LesionSegError(f"unknown output format {outputFormat!r}; use one of {', '.join(OUTPUT_FORMATS)}")
        files = image_files(paths)
        if not files:
            raise LesionSegError(f"no image files in {paths!r}")
        out_dir = Path(outputDir).expanduser()
        out_dir.mkdir(parents=True, exist_ok=True)
        inputs = {f.resolve() for f in files if f.exists()}
        summary = BatchSummary()
        lesion_rows = []
        scene = None
        if outputFormat == "seg.nrrd":
            try:
                scene = bridge.new_scene()
            except ImportError:
                scene = None   # no MRML here: LesionSegLib.slicer.segnrrd writes the same file format
        n = len(files)
        claimed: Dict[Path, Path] = {}   # output → the input it belongs to (names must not clash)
        for i, path in enumerate(files):
            if cancel is not None and getattr(cancel, "cancelled", False):
                summary.cancelled.extend(str(f) for f in files[i:])
                break
            sub = _scaled(progress, i / n, (i + 1) / n, f"[{i + 1}/{n}] {path.name}: ")
            start = time.perf_counter()
            try:
                out_path = self._output_path(path, out_dir, outputFormat)
                if out_path.resolve() in inputs:
                    raise LesionSegError(f"the output {out_path} would overwrite an input file")
                if out_path in claimed:
                    raise LesionSegError(f"its output {out_path.name} would overwrite that of {claimed[out_path]}; "
                                         f"segment the two into separate output folders")
                claimed[out_path] = path
                if out_path.exists() and not overwrite:
                    raise LesionSegError(f"{out_path} exists (pass overwrite=True to replace it)")
                if not path.is_file():
                    raise LesionSegError(f"no such file: {path}")
                from ..inference.io import read_image
                try:
                    image = read_image(path)
                except ValueError as e:
                    raise LesionSegError(f"{path}: {e}") from None
                if image.GetDimension() == 2:
                    image = sitk.JoinSeries(image)
                pred = self.predict(image, model=model, checkpoint=checkpoint, preset=preset, device=device,
                                    threshold=threshold, tta=tta, minLesionSizeMm3=minLesionSizeMm3,
                                    progress=sub, cancel=cancel, allowRandomWeights=allowRandomWeights)
                if outputFormat == "seg.nrrd" and scene is not None:
                    self._write_seg_nrrd(scene, image, pred, out_path, model, path)
                elif outputFormat == "seg.nrrd":
                    from .segnrrd import write_seg_nrrd
                    write_seg_nrrd(out_path, pred.masks, image, pred.classes, model=model)
                else:
                    self._write_labelmap(image, pred, out_path)
                voxels = {c["name"]: int(pred.masks[int(c["value"])].sum()) for c in pred.classes
                          if int(c["value"]) in pred.masks}
                lesions = list(getattr(pred, "lesions", []) or [])
                for row in lesions:
                    lesion_rows.append({"input": str(path), **{k: (json.dumps(v) if isinstance(v, (list, tuple)) else v)
                                                               for k, v in row.items()}})
                summary.succeeded.append({"input": str(path), "output": str(out_path), "voxels": voxels,
                                          "lesions": len(lesions), "seconds": round(time.perf_counter() - start, 2)})
            except Exception as e:   # one bad case must not stop the batch
                if _is_cancelled(e):
                    summary.cancelled.extend(str(f) for f in files[i:])
                    break
                summary.failed.append({"input": str(path), "error": str(e) or type(e).__name__})
                self.log(f"LesionSeg batch: {path}: {e}")
        summary.summary_file = str(self._write_summary(out_dir, summary, lesion_rows, model, preset, checkpoint))
        _call(progress, 1.0, str(summary).splitlines()[0])
        return summary

    @staticmethod
    def _output_path(path: Path, out_dir: Path, fmt: str) -> Path:
        stem = bridge._stem(path)
        return out_dir / (f"{stem}.seg.nrrd" if fmt == "seg.nrrd" else f"{stem}_lesionseg.{fmt}")

    def _write_seg_nrrd(self, scene, image, pred, out_path: Path, model: str, src: Path) -> None:
        volume = bridge.sitk_to_volume(image if image.GetNumberOfComponentsPerPixel() == 1
                                       else _first_component(image), scene, bridge._stem(src))
        seg = None
        try:
            seg = self.writePrediction(pred, volume, None, model=model, provenance={"model": model, "source": src})
            bridge.save_segmentation(seg, out_path)
        finally:
            if seg is not None:
                scene.RemoveNode(seg)
            scene.RemoveNode(volume)

    @staticmethod
    def _write_labelmap(image, pred, out_path: Path) -> None:
        import SimpleITK as sitk
        from ..inference.io import write_image
        labels = pred.labels
        if not isinstance(labels, sitk.Image):
            labels = sitk.GetImageFromArray(labels)
            labels.CopyInformation(image)
        write_image(labels, out_path)   # atomic, read back and compared before the rename

    @staticmethod
    def _write_summary(out_dir: Path, summary: BatchSummary, rows, model, preset, checkpoint) -> Path:
        import io
        from ..fileio import atomic_write_text
        data = {"model": model, "preset": preset, "checkpoint": str(checkpoint) if checkpoint else None,
                "succeeded": summary.succeeded, "failed": summary.failed, "cancelled": summary.cancelled}
        path = out_dir / SUMMARY_NAME
        atomic_write_text(path, json.dumps(data, indent=2, default=str))
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(out_dir / LESIONS_NAME, buf.getvalue())
        return path

    # ------------------------------------------------------------------ training

    def trainingCases(self, pairs, model: str, preset: Optional[str] = None) -> List[Any]:
        """Training data for :func:`LesionSegLib.training.train` from (volume, segmentation)
        pairs: MRML node pairs become in-memory cases (image and label with the volume's
        geometry; label values from the card's classes, matched to segments by name);
        file pairs are passed as paths (a ``.seg.nrrd`` label file is converted through
        MRML). Main thread (reads MRML)."""
        from .. import models
        p = models.preset(model, preset)
        classes = p["classes"]
        multi = bool(p["outputs"].get("multi_label"))
        cases = []
        temp_scene = None
        for k, pair in enumerate(pairs):
            if len(pair) != 2:
                raise LesionSegError(f"training pair {k} must be (volume, segmentation), got {len(pair)} items")
            vol, seg = pair
            if isinstance(vol, (str, os.PathLike)) and isinstance(seg, (str, os.PathLike)):
                if not Path(vol).is_file():
                    raise LesionSegError(f"training pair {k}: no such image file {vol}")
                if not Path(seg).is_file():
                    raise LesionSegError(f"training pair {k}: no such label file {seg}")
                if str(seg).lower().endswith(".seg.nrrd"):
                    temp_scene = temp_scene or bridge.new_scene()
                    vnode = bridge.load_volume(temp_scene, vol)
                    snode = bridge.load_segmentation(temp_scene, seg)
                    cases.append(self._case_from_nodes(vnode, snode, classes, model, multi))
                    temp_scene.Clear(0)
                else:
                    cases.append((str(vol), str(seg)))
            elif hasattr(vol, "GetImageData") and hasattr(seg, "GetSegmentation"):
                cases.append(self._case_from_nodes(vol, seg, classes, model, multi))
            else:
                raise LesionSegError(f"training pair {k}: expected (volume node, segmentation node) or "
                                     f"(image path, label path), got ({type(vol).__name__}, {type(seg).__name__})")
        return cases

    @staticmethod
    def _case_from_nodes(volume, segmentation, classes, model, multi):
        """An in-memory training case as the trainer takes it: SimpleITK image and label
        with the volume's full geometry, so that the trainer orients it exactly as it
        orients files (axial slices, LPS) and as the predictor will."""
        import SimpleITK as sitk
        image = bridge.volume_to_sitk(volume)
        labels = bridge.labels_from_segmentation(segmentation, volume, classes, model=model, multi_label=False)
        label = sitk.GetImageFromArray(labels)
        label.CopyInformation(image)
        return {"image": image, "label": label, "case": volume.GetName() or "case"}

    def train(self, pairs, outputDir, model: str = "msenet", preset: Optional[str] = None,
              epochs: Optional[int] = None, device: str = "auto", recipeOverrides: Optional[Dict[str, Any]] = None,
              resume: bool = False, seed: int = 0, pretrained=None, install: bool = True,
              progress: Progress = None, cancel=None):
        """Train ``model`` on (volume, segmentation) pairs — scene nodes or files — into
        ``outputDir`` with the trainer (:func:`LesionSegLib.training.train`). The best
        checkpoint is installed into the weights cache (``install``), so the effects
        can use it at once. Returns the trainer's ``TrainResult``.
        (The module panel calls :meth:`trainingCases` on the main thread and
        :meth:`trainCases` on a worker.)"""
        if not pairs:
            raise LesionSegError("no training pairs: select at least one volume with its segmentation")
        _call(progress, 0.0, "preparing training data")
        cases = self.trainingCases(pairs, model, preset)
        return self.trainCases(cases, outputDir, model=model, preset=preset, epochs=epochs, device=device,
                               recipeOverrides=recipeOverrides, resume=resume, seed=seed, pretrained=pretrained,
                               install=install, progress=progress, cancel=cancel)

    def trainCases(self, cases, outputDir, model: str = "msenet", preset: Optional[str] = None,
                   epochs: Optional[int] = None, device: str = "auto",
                   recipeOverrides: Optional[Dict[str, Any]] = None, resume: bool = False, seed: int = 0,
                   pretrained=None, install: bool = True, progress: Progress = None, cancel=None):
        """Train on cases made by :meth:`trainingCases` (touches no MRML node: any thread)."""
        from ..training import train as run_training
        if not cases:
            raise LesionSegError("no training cases")
        overrides = dict(recipeOverrides or {})
        if epochs is not None:
            overrides["epochs"] = int(epochs)
        report = _scaled(progress, 0.02, 0.98)

        def on_step(epoch, step, steps_per_epoch, metrics):
            # the trainer reports (epoch, step, steps per epoch, metrics); the GUI wants a fraction
            if report is None:
                return
            total = max(int(metrics.get("epochs", 1) or 1), 1)
            frac = (epoch + min(step, steps_per_epoch) / max(steps_per_epoch, 1)) / total
            loss = metrics.get("loss")
            report(frac, f"epoch {epoch + 1}/{total}" + (f", loss {loss:.4f}" if isinstance(loss, float) else ""))

        result = run_training(model, cases, str(outputDir), preset=preset, recipe_overrides=overrides or None,
                              resume=resume, device=device, seed=seed, progress=on_step,
                              cancel=cancel, pretrained=pretrained)
        if install and getattr(result, "best_checkpoint", None):
            # a name that says what it is: every run's best file is called best.pt
            stamp = time.strftime("%Y%m%d-%H%M%S")
            entry = _weights.import_checkpoint(result.best_checkpoint, name=f"{model}-{preset or 'default'}-{stamp}.pt",
                                               model=model, preset=preset)
            self.log(f"LesionSeg: installed trained weights {entry.id}")
        _call(progress, 1.0, "training finished")
        return result


@dataclass
class SegmentJob:
    """A segmentation running in a worker, with the nodes of its Apply (pinned)."""
    job: Any                      # worker.WorkerJob
    volume: Any
    segmentation: Any
    selectedSegmentId: Optional[str]
    options: Dict[str, Any]

    def poll(self) -> bool:
        return self.job.poll()

    def cancel(self) -> None:
        self.job.cancel()


def _first_component(image):
    import SimpleITK as sitk
    return sitk.VectorIndexSelectionCast(image, 0)
