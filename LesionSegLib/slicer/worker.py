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

The GUI side is :class:`WorkerJob`: started with :mod:`subprocess`, polled without
blocking (no threads: progress is read from the file the worker's stdout goes to), so
that a QTimer in Slicer or a plain loop in a test drive it the same way.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
            from ..inference import Cancelled
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
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        if soft != resource.RLIM_INFINITY and vm + (64 << 20) > soft:
            return True
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return available < (64 << 20)
    except (ImportError, OSError, StopIteration, ValueError):
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
        # nothing is imported here: the failure may be that memory ran out
        cancel_module = sys.modules.get("LesionSegLib.inference.cancel")
        if cancel_module is not None and isinstance(e, cancel_module.Cancelled):
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


# ============================================================================ GUI side

_running: "weakref.WeakSet[WorkerJob]" = weakref.WeakSet()


def stop_all() -> int:
    """Kill every running worker of this process (Slicer calls it when it quits; it is
    also registered with :mod:`atexit`). Returns how many were running."""
    jobs = [j for j in list(_running) if not j.done]
    for job in jobs:
        job.kill()
    return len(jobs)


atexit.register(stop_all)


def library_root() -> Path:
    """The folder that holds the ``LesionSegLib`` package (put on the worker's path)."""
    return Path(__file__).resolve().parents[2]


def python_executable() -> str:
    """The Python that runs the worker: Slicer's ``PythonSlicer`` inside Slicer (the
    application's own interpreter, with its torch), else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        here = Path(sys.executable).parent
        for cand in (here / "PythonSlicer", here / "PythonSlicer.exe", shutil.which("PythonSlicer")):
            if cand and Path(cand).is_file():
                return str(cand)
    return sys.executable


def _environment(env: Optional[Dict[str, str]]) -> Dict[str, str]:
    if env is None:
        env = dict(os.environ)
        slicer = sys.modules.get("slicer")
        if slicer is not None and hasattr(slicer, "app") and hasattr(slicer.util, "startupEnvironment"):
            # as slicer.util.launchConsoleProcess does: the launcher's environment, not the GUI's
            env = dict(slicer.util.startupEnvironment())
    env = dict(env)
    root = str(library_root())
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerJob:
    """A job in a worker process, polled by the GUI.

    ``start()`` writes ``job.json`` and launches the worker; call :meth:`poll` often
    (it never blocks): it reads new progress lines into :attr:`fraction` /
    :attr:`message` and returns True once the process has ended. Then exactly one of
    :attr:`result` (the parsed ``result.json``), :attr:`error` (one line) or
    :attr:`cancelled` is set. :meth:`cancel` asks the worker to stop and kills it after
    the task's grace time (at once for segmentation); nothing it produced is used.
    """

    def __init__(self, task: str, args: Dict[str, Any], job_dir=None, python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, keep: bool = False):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        self.task, self.args = task, dict(args)
        self.dir = Path(job_dir) if job_dir else Path(tempfile.mkdtemp(prefix=f"LesionSeg-{task}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.python, self.env, self.keep = python, env, keep
        self.fraction, self.message = 0.0, "starting"
        self.result: Optional[Dict[str, Any]] = None
        self.error: Optional[str] = None
        self.cancelled = False
        self.returncode: Optional[int] = None
        self.worker_pid: Optional[int] = None
        self.lines: List[Dict[str, Any]] = []
        self._proc: Optional[subprocess.Popen] = None
        self._offset = 0
        self._partial = b""
        self._cancel_deadline: Optional[float] = None
        self._killed = False
        self.started_at = self.ended_at = None

    # -------------------------------------------------------------- control

    def start(self) -> "WorkerJob":
        from ..fileio import atomic_write_text
        spec = {"protocol": PROTOCOL, "task": self.task, "parent_pid": os.getpid(), "args": self.args}
        atomic_write_text(self.dir / JOB_FILE, json.dumps(spec, default=str, indent=1))
        cmd = [self.python or python_executable(), "-m", "LesionSegLib.slicer.worker", str(self.dir)]
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":   # pragma: no cover - Windows: no console window, own process group
            kwargs["creationflags"] = 0x08000000 | 0x00000200
        else:
            kwargs["start_new_session"] = True   # its own process group: data loaders die with it
        self._stdout = open(self.dir / STDOUT_FILE, "wb")
        self._stderr = open(self.dir / STDERR_FILE, "wb")
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr,
                                          cwd=str(self.dir), env=_environment(self.env), **kwargs)
        finally:
            self._stdout.close()
            self._stderr.close()
        self.started_at = time.monotonic()
        _running.add(self)
        return self

    def cancel(self) -> None:
        """Ask the job to stop; nothing it produced will be used."""
        if self.done or self._proc is None:
            return
        self.cancelled = True
        (self.dir / CANCEL_FILE).touch()
        grace = CANCEL_GRACE_S.get(self.task, 0.0)
        if grace <= 0:
            self.kill()
        else:
            self._cancel_deadline = time.monotonic() + grace

    def kill(self) -> None:
        """Stop the worker at once (and the processes it started)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._killed = True
        try:
            if os.name == "nt":   # pragma: no cover
                proc.kill()
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # -------------------------------------------------------------- polling

    @property
    def done(self) -> bool:
        return self.returncode is not None

    def poll(self) -> bool:
        """Read new progress; True once the worker has ended and the outcome is set."""
        if self.done:
            return True
        if self._proc is None:
            raise WorkerError("the job was not started")
        self._read_lines()
        if self._cancel_deadline is not None and time.monotonic() > self._cancel_deadline:
            self.kill()
        code = self._proc.poll()
        if code is None:
            return False
        self._read_lines()
        self._finish(code)
        return True

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> bool:
        """Poll until done (scripts and tests; the GUI polls from a timer instead)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(interval)
        return True

    def _read_lines(self) -> None:
        try:
            with open(self.dir / STDOUT_FILE, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            try:
                msg = json.loads(raw.decode("utf-8", "replace"))
            except ValueError:
                continue   # not ours (a library printing to stdout)
            if not isinstance(msg, dict):
                continue
            self.lines.append(msg)
            if "pid" in msg:
                self.worker_pid = int(msg["pid"])
            if "progress" in msg:
                self.fraction = max(self.fraction, float(msg["progress"]))
                self.message = str(msg.get("message", ""))

    def _finish(self, code: int) -> None:
        self.ended_at = time.monotonic()
        _running.discard(self)
        errors = [m["error"] for m in self.lines if "error" in m]
        if self.cancelled:
            self.result = None
        elif code == 0 and (self.dir / RESULT_FILE).is_file():
            try:
                self.result = json.loads((self.dir / RESULT_FILE).read_text(encoding="utf-8"))
            except ValueError as e:
                self.error = f"the LesionSeg worker wrote an unreadable result: {e}"
        elif errors:
            self.error = str(errors[-1])
        elif code == 2 and any(m.get("cancelled") for m in self.lines):
            self.cancelled = True
        else:
            self.error = self._crash_message(code)
        self.returncode = code

    def _crash_message(self, code: int) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            why = {"SIGKILL": "killed — most often by the system because memory ran out",
                   "SIGSEGV": "crashed in native code (segmentation fault)",
                   "SIGABRT": "aborted in native code (e.g. a CUDA or driver error)",
                   "SIGBUS": "crashed in native code (bus error)"}.get(name, "stopped by a signal")
            text = f"the LesionSeg worker process was {why} ({name})"
        else:
            text = f"the LesionSeg worker process ended with exit code {code} without a result"
        tail = self.stderr_tail()
        low = tail.lower()
        if any(w in low for w in ("memory allocation", "out of memory", "cannot allocate", "can't allocate",
                                  "bad_alloc", "memoryerror", "failed to map segment")):
            # native libraries (OpenBLAS, CUDA) often end the process themselves when an allocation fails
            text = f"out of memory: {text}"
        return f"{text}; nothing was changed" + (f". Last message: {tail}" if tail else "")

    def stderr_tail(self) -> str:
        try:
            lines = [ln.strip() for ln in (self.dir / STDERR_FILE).read_text("utf-8", "replace").splitlines()
                     if ln.strip()]
        except FileNotFoundError:
            return ""
        return lines[-1][:300] if lines else ""

    # -------------------------------------------------------------- results

    def path(self, name: str) -> Path:
        return self.dir / name

    def cleanup(self) -> None:
        """Remove the job folder (after its results have been read)."""
        if not self.done:
            self.kill()
            if self._proc is not None:
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:   # pragma: no cover
                    pass
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        state = ("running" if not self.done else "cancelled" if self.cancelled
                 else "failed" if self.error else "done")
        return f"<WorkerJob {self.task} {state} {self.fraction:.0%} {self.dir}>"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m LesionSegLib.slicer.worker JOB_DIR", file=sys.stderr)
        return 2
    return run(argv[0])


if __name__ == "__main__":
    raise SystemExit(main())
