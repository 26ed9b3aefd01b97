"""One batch over image files, for ``lesionseg predict`` and the Slicer logic's
``segmentFiles``: the inputs are listed the same way (:func:`LesionSegLib.inference.io.list_inputs`),
the output names are checked before anything runs (no two inputs writing the same file, no
output replacing an input, an existing result kept unless ``overwrite``), every file is
segmented with one failing file never stopping the rest, cancel is honoured between and
within files, and the batch writes one lesion table (``lesionseg-lesions.csv``, the
columns of :data:`LesionSegLib.inference.io.LESION_COLUMNS`) and one summary
(``lesionseg-summary.json``).

What a file becomes is the caller's :class:`FileSegmenter`: the CLI writes a label image
in the input's format (and probabilities, a per-file lesion table); the Slicer logic a
``.seg.nrrd`` or a labelmap.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from ..jobs import Progress, ProgressCallback, is_cancelled
from .io import lesions_csv

SUMMARY_NAME = "lesionseg-summary.json"
LESIONS_NAME = "lesionseg-lesions.csv"


@dataclass
class FileResult:
    """What segmenting one file gave: the files written (the main result first) and the prediction."""
    written: List[Path]
    prediction: Any  # LesionSegLib.inference.Prediction
    warnings: List[str] = field(default_factory=list)


class FileSegmenter(Protocol):
    def output_names(self, path: Path) -> List[str]:
        """Names, in the output folder, of the files that ``path`` will write."""

    def segment(self, path: Path, out_dir: Path, progress: Progress) -> FileResult:
        """Segment ``path`` and write its results into ``out_dir``."""


@dataclass
class BatchSummary:
    """Result of a batch."""
    succeeded: List[Dict[str, Any]] = field(default_factory=list)   # input, output, voxels, lesions, seconds
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


class BatchReport:
    """What a front end shows of a batch (the CLI prints, Slicer logs); does nothing here."""

    def started(self, path: Path, number: int, total: int) -> None:
        pass

    def succeeded(self, path: Path, result: FileResult, seconds: float) -> None:
        pass

    def failed(self, path: Path, error: str) -> None:
        pass


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_outputs(files: Sequence[Path], out_dir: Path, segmenter: FileSegmenter,
                  overwrite: bool) -> List[Optional[str]]:
    """Why each file may not run (None: it may): its results would replace those of an
    earlier input (same name from another folder, or ``case.png`` and ``case.jpg``), an
    input file, or an existing result without ``overwrite``."""
    inputs = {Path(f).resolve() for f in files if Path(f).exists()}
    claimed: Dict[str, Path] = {}
    reasons: List[Optional[str]] = []
    for path in files:
        names = segmenter.output_names(path)
        clash = next((n for n in names if n.casefold() in claimed), None)
        if clash is not None:
            reasons.append(f"its results would have the same name ({clash}) as those of "
                           f"{claimed[clash.casefold()]}; segment the two into separate output folders")
            continue
        claimed.update((n.casefold(), path) for n in names)
        targets = [out_dir / n for n in names]
        replaced = next((t for t in targets if t.resolve() in inputs), None)
        if replaced is not None:
            reasons.append(f"the output {replaced} would overwrite an input file; choose another output folder")
        elif not overwrite and targets[0].exists():
            reasons.append(f"{targets[0]} exists (pass overwrite=True to replace it)")
        else:
            reasons.append(None)
    return reasons


def segment_files(files: Sequence[Path], out_dir, segmenter: FileSegmenter, *,
                  problems: Sequence[Tuple[str, str]] = (), overwrite: bool = True,
                  settings: Optional[Dict[str, Any]] = None, lesion_table: bool = True,
                  summary_without_results: bool = True, progress: Optional[ProgressCallback] = None,
                  cancel=None, report: Optional[BatchReport] = None) -> BatchSummary:
    """Segment ``files`` into ``out_dir`` with ``segmenter``; ``problems`` are inputs
    already found unusable (``(argument, reason)``, from ``list_inputs``), recorded as
    failed. ``settings`` (network, preset, weights …) go into the summary file, which is
    not written when nothing succeeded and ``summary_without_results`` is False.
    KeyboardInterrupt propagates (the CLI reports it)."""
    report = report or BatchReport()
    out_dir = Path(out_dir)
    files = [Path(f) for f in files]
    prog = Progress(progress)
    summary = BatchSummary()
    for arg, reason in problems:
        summary.failed.append({"input": str(arg), "error": reason})
        report.failed(Path(arg), reason)
    tables: List[str] = []
    n = len(files)
    for i, (path, refused) in enumerate(zip(files, check_outputs(files, out_dir, segmenter, overwrite))):
        if cancel is not None and getattr(cancel, "cancelled", False):
            summary.cancelled.extend(str(f) for f in files[i:])
            break
        if refused:
            summary.failed.append({"input": str(path), "error": refused})
            report.failed(path, refused)
            continue
        report.started(path, i + 1, n)
        start = time.perf_counter()
        try:
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            result = segmenter.segment(path, out_dir, prog.span(i / n, (i + 1) / n, f"[{i + 1}/{n}] {path.name}: "))
        except Exception as e:  # one bad file must not stop the others
            if is_cancelled(e):
                summary.cancelled.extend(str(f) for f in files[i:])
                break
            summary.failed.append({"input": str(path), "error": _one_line(e)})
            report.failed(path, _one_line(e))
            continue
        seconds = time.perf_counter() - start
        pred = result.prediction
        voxels = {c["name"]: int(pred.masks[int(c["value"])].sum()) for c in pred.classes
                  if int(c["value"]) in pred.masks}
        if lesion_table:
            tables.append(lesions_csv(pred.lesions or [], str(path), pred.classes))
        summary.succeeded.append({"input": str(path), "output": str(result.written[0]), "voxels": voxels,
                                  "lesions": len(pred.lesions or []), "seconds": round(seconds, 2)})
        report.succeeded(path, result, seconds)
    if summary.succeeded or summary_without_results:
        summary.summary_file = str(write_summary(out_dir, summary, settings or {}, tables))
    prog.done(str(summary).splitlines()[0])
    return summary


def write_summary(out_dir: Path, summary: BatchSummary, settings: Dict[str, Any],
                  lesion_tables: List[str]) -> Path:
    """``lesionseg-summary.json`` and, when there are lesion tables, ``lesionseg-lesions.csv``
    (the tables of all files under one header), each written atomically."""
    from ..fileio import atomic_write_text
    data = {**settings, "succeeded": summary.succeeded, "failed": summary.failed, "cancelled": summary.cancelled}
    path = out_dir / SUMMARY_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
    if lesion_tables:
        header, *_ = lesion_tables[0].splitlines(keepends=True)
        body = "".join(line for t in lesion_tables for line in t.splitlines(keepends=True)[1:])
        atomic_write_text(out_dir / LESIONS_NAME, header + body)
    return path

