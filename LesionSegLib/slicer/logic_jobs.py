"""Work in a worker process (:mod:`.worker`): ``LesionSegLogic``'s ``start…Job`` methods
(main thread: write inputs, start the process) and :meth:`WorkerJobLogic.finishSegmentJob`
(main thread: read the result and write it into the nodes of the Apply)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .errors import LesionSegError
from .logic_batch import OUTPUT_FORMATS, batch_inputs


def _check_threshold_pair(threshold: Optional[float], seedThreshold: Optional[float]) -> None:
    """A user's threshold and seed threshold that the worker would refuse, refused before
    it starts (with the card's threshold the worker decides: the weights may change it)."""
    if threshold is None or not seedThreshold:
        return
    from ..validation import OptionError, threshold_pair
    try:
        threshold_pair(threshold, seedThreshold, threshold)
    except OptionError as e:
        raise LesionSegError(str(e)) from None


class WorkerJobLogic:
    """``LesionSegLogic``'s worker jobs (mixed in; uses its ``requireWeights``,
    ``inputImage``, ``trainingCases``, ``writePrediction`` and ``provenance``)."""

    @staticmethod
    def _job_options(python=None, env=None) -> Dict[str, Any]:
        return {"python": python, "env": env}

    def startSegmentJob(self, volumeNode, segmentationNode=None, model: str = "msenet", checkpoint=None,
                        preset: Optional[str] = None, device: str = "auto", threshold: Optional[float] = None,
                        tta: bool = False, probabilities: bool = False, minLesionSizeMm3: float = 0.0,
                        selectedSegmentId: Optional[str] = None, allowRandomWeights: bool = False,
                        python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                        seedThreshold: Optional[float] = None) -> "SegmentJob":
        """Start segmenting ``volumeNode`` in a worker process (main thread; returns at once).

        The weights are resolved and the source volume is written to the job folder
        with its exact geometry now; the nodes are pinned: :meth:`finishSegmentJob`
        writes into these, whatever the user selects meanwhile. Poll ``job.poll()``."""
        from .worker_job import WorkerJob
        if volumeNode is None:
            raise LesionSegError("no input volume selected")
        _check_threshold_pair(threshold, seedThreshold)
        path = self.requireWeights(model, checkpoint, preset, allowRandomWeights)
        image = self.inputImage(volumeNode)
        args = {"input": "input.nrrd", "model": model, "checkpoint": path, "preset": preset, "device": device,
                "threshold": threshold, "tta": bool(tta), "probabilities": bool(probabilities),
                "minLesionSizeMm3": float(minLesionSizeMm3), "allowRandomWeights": bool(allowRandomWeights),
                "seedThreshold": seedThreshold}
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
                provenance=self.provenance(prediction, options["model"], options["preset"], options["checkpoint"],
                                           options["threshold"]))
        finally:
            job.cleanup()

    def startBatchJob(self, paths, outputDir, python=None, env=None, **options):
        """:meth:`segmentFiles` in a worker process (the panel's batch)."""
        from .worker_job import WorkerJob
        if options.get("outputFormat", "seg.nrrd") not in OUTPUT_FORMATS:
            raise LesionSegError(f"unknown output format {options['outputFormat']!r}; "
                                 f"use one of {', '.join(OUTPUT_FORMATS)}")
        batch_inputs(paths)   # refuses arguments without images before a worker starts
        _check_threshold_pair(options.get("threshold"), options.get("seedThreshold"))
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
        from .worker_job import WorkerJob
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
        from .worker_job import WorkerJob
        return WorkerJob("download", {"url": url, "sha256": sha256, **options}, python=python, env=env).start()


@dataclass
class SegmentJob:
    """A segmentation running in a worker, with the nodes of its Apply (pinned)."""
    job: Any                      # worker_job.WorkerJob
    volume: Any
    segmentation: Any
    selectedSegmentId: Optional[str]
    options: Dict[str, Any]

    def poll(self) -> bool:
        return self.job.poll()

    def cancel(self) -> None:
        self.job.cancel()
