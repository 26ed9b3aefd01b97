"""Batches of image files: :meth:`BatchLogic.segmentFiles` (part of ``LesionSegLogic``)
segments every file into an output folder, one failing case never stopping the rest."""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from ..jobs import Progress, ProgressCallback, is_cancelled
from . import bridge
from ..fileio import READABLE_EXTENSIONS, stem
from .errors import LesionSegError

IMAGE_SUFFIXES = READABLE_EXTENSIONS
OUTPUT_FORMATS = ("seg.nrrd", "nii.gz", "nrrd")
SUMMARY_NAME = "lesionseg-summary.json"
LESIONS_NAME = "lesionseg-lesions.csv"


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


class BatchLogic:
    """``LesionSegLogic``'s batch over files (mixed in; uses its ``predict``,
    ``writePrediction`` and ``log``)."""

    def segmentFiles(self, paths, outputDir, model: str = "msenet", checkpoint=None, preset: Optional[str] = None,
                     device: str = "auto", threshold: Optional[float] = None, tta: bool = False,
                     outputFormat: str = "seg.nrrd", overwrite: bool = False, minLesionSizeMm3: float = 0.0,
                     progress: Optional[ProgressCallback] = None, cancel=None, allowRandomWeights: bool = False) -> BatchSummary:
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
        prog = Progress(progress)
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
            sub = prog.span(i / n, (i + 1) / n, f"[{i + 1}/{n}] {path.name}: ")
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
                if is_cancelled(e):
                    summary.cancelled.extend(str(f) for f in files[i:])
                    break
                summary.failed.append({"input": str(path), "error": str(e) or type(e).__name__})
                self.log(f"LesionSeg batch: {path}: {e}")
        summary.summary_file = str(self._write_summary(out_dir, summary, lesion_rows, model, preset, checkpoint))
        prog.done(str(summary).splitlines()[0])
        return summary

    @staticmethod
    def _output_path(path: Path, out_dir: Path, fmt: str) -> Path:
        name = stem(path)
        return out_dir / (f"{name}.seg.nrrd" if fmt == "seg.nrrd" else f"{name}_lesionseg.{fmt}")

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


def _first_component(image):
    import SimpleITK as sitk
    return sitk.VectorIndexSelectionCast(image, 0)
