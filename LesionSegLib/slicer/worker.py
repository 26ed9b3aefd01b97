"""The worker process: networks, batches, training and downloads run outside Slicer.

Inside Slicer the main thread holds Python's GIL whenever it is not running Python
(PythonQt's thread support is off), so work on a Python thread only advances during the
GUI's poll ticks. LesionSeg therefore runs every long job in a separate process, as the
peers do (TotalSegmentator, MONAIAuto3DSeg): a crash, CUDA error or out-of-memory there
never takes Slicer down, the memory comes back when the process ends, and Cancel kills it.

Protocol (one job = one folder)::

    python -m LesionSegLib.slicer.worker JOB_DIR

* ``JOB_DIR/job.json``: ``{"protocol": 1, "task": "segment"|"batch"|"train"|"download",
  "parent_pid": …, "args": {…}}``; input images are files in the folder (the GUI writes
  the source volume with its exact geometry).
* stdout: one JSON object per line — ``{"progress": 0.42, "message": "…"}`` while it
  runs, ``{"error": "…"}`` when it fails (exit code 1), ``{"done": "result.json"}`` at
  the end.
* outputs (``segment``): ``mask-<value>.nrrd`` (uint8, one per class, overlapping
  classes kept), ``probability-<value>.nrrd`` (float32, when asked), all on the input's
  grid, and ``result.json`` (classes, files, lesions, info). Every file is written
  atomically; ``result.json`` comes last, so a result without it does not exist.
* the worker stops by itself when the process that started it has gone.

The GUI side is :class:`.worker_job.WorkerJob`.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..jobs import Cancelled

try:
    import resource  # loaded now: once memory has run out, loading it would fail like the rest
except ImportError:  # Windows
    resource = None

PROTOCOL = 1
JOB_FILE = "job.json"
RESULT_FILE = "result.json"
STDOUT_FILE = "stdout.jsonl"
STDERR_FILE = "stderr.txt"
CANCEL_FILE = "cancel"
TASKS = ("segment", "batch", "train", "download")
#: how long a cancelled job may take to stop by itself (training saves a resumable state)
CANCEL_GRACE_S = {"segment": 0.0, "batch": 2.0, "train": 30.0, "download": 2.0}


class WorkerError(RuntimeError):
    """A worker job failed; the message is one line saying why."""


# ============================================================================ worker side


def _emit(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


class _FileCancelToken:
    """The worker's cancel token: cancelled once the GUI has created the cancel file
    (the GUI kills the process if it does not stop within the task's grace time)."""

    def __init__(self, job_dir: Path):
        self._path = job_dir / CANCEL_FILE
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        if not self._cancelled and self._path.exists():
            self._cancelled = True
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled by the user")


def _watch_parent(parent_pid: Optional[int]) -> None:
    """Exit when the process that started the worker is gone (Slicer quit or crashed)."""
    if not parent_pid:
        return

    def alive() -> bool:
        if os.name == "nt":   # pragma: no cover - Windows
            import ctypes
            handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, parent_pid)
            if not handle:
                return False
            code = ctypes.c_ulong()
            ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            ctypes.windll.kernel32.CloseHandle(handle)
            return code.value == 259   # STILL_ACTIVE
        return os.getppid() == parent_pid

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if not alive():
                os._exit(3)
    threading.Thread(target=loop, name="LesionSeg parent watch", daemon=True).start()


def _write_image(image, path: Path) -> str:
    import SimpleITK as sitk
    from ..fileio import atomic_path
    with atomic_path(path, suffix=".nrrd") as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path.name


def _on_grid(array, reference):
    """SimpleITK image of a (z, y, x) array with ``reference``'s geometry."""
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    return image


def _task_segment(args: Dict[str, Any], job_dir: Path, progress, cancel) -> Dict[str, Any]:
    import numpy as np
    import SimpleITK as sitk
    from .logic import LesionSegLogic
    image = sitk.ReadImage(str(job_dir / args.pop("input")))
    logic = LesionSegLogic()
    pred = logic.predict(image, progress=progress, cancel=cancel, **args)
    grid = image if image.GetNumberOfComponentsPerPixel() == 1 else sitk.VectorIndexSelectionCast(image, 0)
    masks, probabilities = {}, {}
    for i, cls in enumerate(pred.classes):
        v = int(cls["value"])
        if v in pred.masks:
            masks[str(v)] = _write_image(_on_grid(np.asarray(pred.masks[v]).astype(np.uint8), grid),
                                         job_dir / f"mask-{v}.nrrd")
        if pred.probabilities is not None:
            probabilities[str(v)] = _write_image(
                _on_grid(np.asarray(pred.probabilities[i], dtype=np.float32), grid), job_dir / f"probability-{v}.nrrd")
    return {"classes": list(pred.classes), "masks": masks, "probabilities": probabilities or None,
            "lesions": list(pred.lesions or []), "info": dict(getattr(pred, "info", {}) or {})}


def _task_batch(args: Dict[str, Any], job_dir: Path, progress, cancel) -> Dict[str, Any]:
    from .logic import LesionSegLogic
    paths, output = args.pop("paths"), args.pop("outputDir")
    summary = LesionSegLogic().segmentFiles(paths, output, progress=progress, cancel=cancel, **args)
    return {"succeeded": summary.succeeded, "failed": summary.failed, "cancelled": summary.cancelled,
            "summary_file": summary.summary_file, "text": str(summary)}


def _task_train(args: Dict[str, Any], job_dir: Path, progress, cancel) -> Dict[str, Any]:
    from .logic import LesionSegLogic
    cases = [(str(job_dir / a) if not os.path.isabs(a) else a, str(job_dir / b) if not os.path.isabs(b) else b)
             for a, b in args.pop("cases")]
    output = args.pop("outputDir")
    result = LesionSegLogic().trainCases(cases, output, progress=progress, cancel=cancel, **args)
    best = getattr(result, "best_checkpoint", None)
    return {"best_checkpoint": str(best) if best else None, "output_dir": str(output)}


def _task_download(args: Dict[str, Any], job_dir: Path, progress, cancel) -> Dict[str, Any]:
    from .logic import LesionSegLogic
    entry = LesionSegLogic.downloadWeights(progress=progress, cancel=cancel, **args)
    return {"id": entry.id, "path": str(entry.path)}


_TASK_FUNCTIONS = {"segment": _task_segment, "batch": _task_batch, "train": _task_train,
                   "download": _task_download}


def _memory_exhausted() -> bool:
    """True when this process is at its address-space limit or the machine is out of
    memory (Linux; elsewhere only the error text tells). Native libraries report a
    failed allocation in many ways (a thread that cannot start, a null buffer)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0] if resource else None
        if soft is not None and soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            if vm + (64 << 20) > soft:
                return True
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return available < (64 << 20)
    except MemoryError:  # even reading the figures failed for lack of memory
        return True
    except (OSError, StopIteration, ValueError):
        return False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[-1] if text else ""
    low = f"{type(exc).__name__} {text}".lower()
    if isinstance(exc, MemoryError) or "out of memory" in low or "can't allocate memory" in low \
            or "cannot allocate memory" in low or "bad_alloc" in low or _memory_exhausted():
        return f"out of memory: {text or type(exc).__name__} (try the CPU, a smaller volume or fewer options)"
    return text or type(exc).__name__


def run(job_dir) -> int:
    """Run the job in ``job_dir`` (the worker process's main function). Returns the exit code."""
    job_dir = Path(job_dir)
    try:
        spec = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
        if spec.get("protocol") != PROTOCOL:
            raise WorkerError(f"job protocol {spec.get('protocol')!r}; this LesionSegLib speaks {PROTOCOL}")
        task = spec["task"]
        if task not in _TASK_FUNCTIONS:
            raise WorkerError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    except Exception as e:
        _emit({"error": f"unreadable job in {job_dir}: {e}"})
        return 1
    _watch_parent(spec.get("parent_pid"))
    cancel = _FileCancelToken(job_dir)
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.05 or fraction >= 1.0:   # at most 20 lines a second
            last[0] = now
            _emit({"progress": round(float(fraction), 4), "message": str(message)})

    _emit({"progress": 0.0, "message": f"worker started ({task})", "pid": os.getpid()})
    start = time.perf_counter()
    try:
        result = _TASK_FUNCTIONS[task](dict(spec.get("args") or {}), job_dir, progress, cancel)
    except BaseException as e:   # reported to the GUI as one line; the traceback goes to stderr
        if isinstance(e, Cancelled):
            _emit({"cancelled": True})
            return 2
        traceback.print_exc()
        _emit({"error": _describe(e)})
        return 1
    result.update({"protocol": PROTOCOL, "task": task, "seconds": round(time.perf_counter() - start, 3)})
    from ..fileio import atomic_write_text
    atomic_write_text(job_dir / RESULT_FILE, json.dumps(result, default=str, indent=1))
    _emit({"progress": 1.0, "message": "done"})
    _emit({"done": RESULT_FILE})
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m LesionSegLib.slicer.worker JOB_DIR", file=sys.stderr)
        return 2
    return run(argv[0])


if __name__ == "__main__":
    raise SystemExit(main())
