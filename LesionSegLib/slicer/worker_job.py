"""The GUI side of the worker process (:mod:`.worker`): :class:`WorkerJob`, started with
:mod:`subprocess`, polled without blocking (no threads: progress is read from the file
the worker's stdout goes to), so that a QTimer in Slicer or a plain loop in a test drive
it the same way."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional

from .worker import (CANCEL_FILE, CANCEL_GRACE_S, JOB_FILE, PROTOCOL, RESULT_FILE, STDERR_FILE, STDOUT_FILE, TASKS,
                     WorkerError)

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
