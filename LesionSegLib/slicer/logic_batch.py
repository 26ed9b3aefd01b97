"""Batches of image files: :meth:`BatchLogic.segmentFiles` (part of ``LesionSegLogic``)
segments every file into an output folder through the batch that ``lesionseg predict``
uses too (:mod:`LesionSegLib.inference.batch`), writing Slicer's formats."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Optional, Union

from ..fileio import READABLE_EXTENSIONS, stem
from ..inference.batch import LESIONS_NAME, SUMMARY_NAME, BatchReport, BatchSummary, FileResult
from ..jobs import ProgressCallback
from . import bridge
from .errors import LesionSegError

IMAGE_SUFFIXES = READABLE_EXTENSIONS
OUTPUT_FORMATS = ("seg.nrrd", "nii.gz", "nrrd")
__all__ = ["BatchLogic", "BatchSummary", "batch_inputs", "IMAGE_SUFFIXES", "OUTPUT_FORMATS", "SUMMARY_NAME",
           "LESIONS_NAME"]


def batch_inputs(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]):
    """(image files, [(argument, why unusable)]) of a batch: folders expanded as
    ``lesionseg predict`` does (sorted, not recursive, without segmentations and earlier
    results); a file that is not there becomes a failed entry of the batch.
    :class:`LesionSegError` when the arguments are only folders without images."""
    from ..inference.io import list_inputs
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, problems = list_inputs([Path(p).expanduser() for p in paths])
    if not files and all(Path(a).is_dir() for a, _ in problems):
        raise LesionSegError(f"no image files in {paths!r}")
    return files, problems


class _SlicerFiles:
    """What the Slicer batch makes of one file: a ``.seg.nrrd`` (through MRML when
    Slicer or slicer-core is there, else :mod:`LesionSegLib.slicer.segnrrd`) or a labelmap."""

    def __init__(self, logic, fmt: str, predict_options) -> None:
        self.logic, self.fmt, self.options = logic, fmt, predict_options
        self.scene = None
        if fmt == "seg.nrrd":
            try:
                self.scene = bridge.new_scene()
            except ImportError:
                self.scene = None   # no MRML here: LesionSegLib.slicer.segnrrd writes the same file format

    def output_names(self, path: Path) -> List[str]:
        name = stem(path)
        return [f"{name}.seg.nrrd" if self.fmt == "seg.nrrd" else f"{name}_lesionseg.{self.fmt}"]

    def segment(self, path: Path, out_dir: Path, progress) -> FileResult:
        import SimpleITK as sitk
        from ..inference.io import read_image
        try:
            image = read_image(path)
        except ValueError as e:
            raise LesionSegError(f"{path}: {e}") from None
        if image.GetDimension() == 2:
            image = sitk.JoinSeries(image)
        pred = self.logic.predict(image, progress=progress, **self.options)
        out_path = out_dir / self.output_names(path)[0]
        model = self.options["model"]
        if self.fmt == "seg.nrrd" and self.scene is not None:
            self.logic._write_seg_nrrd(self.scene, image, pred, out_path, model, path)
        elif self.fmt == "seg.nrrd":
            from .segnrrd import write_seg_nrrd
            write_seg_nrrd(out_path, pred.masks, image, pred.classes, model=model)
        else:
            self.logic._write_labelmap(image, pred, out_path)
        return FileResult([out_path], pred)


class BatchLogic:
    """``LesionSegLogic``'s batch over files (mixed in; uses its ``predict``,
    ``writePrediction`` and ``log``)."""

    def segmentFiles(self, paths, outputDir, model: str = "msenet", checkpoint=None, preset: Optional[str] = None,
                     device: str = "auto", threshold: Optional[float] = None, tta: bool = False,
                     outputFormat: str = "seg.nrrd", overwrite: bool = False, minLesionSizeMm3: float = 0.0,
                     progress: Optional[ProgressCallback] = None, cancel=None, allowRandomWeights: bool = False,
                     seedThreshold: Optional[float] = None) -> BatchSummary:
        """Segment many image files (files and/or folders) into ``outputDir``.

        Each case gets ``<name>.seg.nrrd`` (segments named and coded as in Slicer) or a
        labelmap ``<name>_lesionseg.nii.gz`` / ``.nrrd``. A failing case is recorded and the
        batch goes on; inputs are never overwritten, existing outputs only with
        ``overwrite``. Writes ``lesionseg-summary.json`` and ``lesionseg-lesions.csv`` into
        ``outputDir``. ``threshold`` and ``seedThreshold``: as in :meth:`predict`."""
        from ..inference.batch import segment_files
        if outputFormat not in OUTPUT_FORMATS:
            raise LesionSegError(f"unknown output format {outputFormat!r}; use one of {', '.join(OUTPUT_FORMATS)}")
        files, problems = batch_inputs(paths)
        out_dir = Path(outputDir).expanduser()
        out_dir.mkdir(parents=True, exist_ok=True)
        options = dict(model=model, checkpoint=checkpoint, preset=preset, device=device, threshold=threshold,
                       tta=tta, minLesionSizeMm3=minLesionSizeMm3, cancel=cancel,
                       allowRandomWeights=allowRandomWeights, seedThreshold=seedThreshold)
        logic = self

        class Log(BatchReport):
            def failed(self, path, error):
                logic.log(f"LesionSeg batch: {path}: {error}")

        settings = {"model": model, "preset": preset, "checkpoint": str(checkpoint) if checkpoint else None}
        return segment_files(files, out_dir, _SlicerFiles(self, outputFormat, options), problems=problems,
                             overwrite=overwrite, settings=settings, progress=progress, cancel=cancel, report=Log())

    def _write_seg_nrrd(self, scene, image, pred, out_path: Path, model: str, src: Path) -> None:
        volume = bridge.sitk_to_volume(image if image.GetNumberOfComponentsPerPixel() == 1
                                       else _first_component(image), scene, stem(src))
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


def _first_component(image):
    import SimpleITK as sitk
    return sitk.VectorIndexSelectionCast(image, 0)
