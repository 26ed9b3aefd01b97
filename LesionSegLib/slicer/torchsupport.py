"""Which torch LesionSeg needs, checked without importing it, and a guard so that only
one installation runs at a time (a second Apply click must not start another).

torch ≥ 2.4: Slicer 5.10 ships numpy 2, which older torch wheels were not built for,
and the trainer uses the ``torch.amp`` API. ``pyproject.toml`` states the same minimum
(Testing/test_slicer_torch.py checks that they agree).
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

TORCH_MINIMUM = (2, 4)
TORCH_REQUIREMENT = ">=2.4"
NOT_INSTALLED = "PyTorch is not installed"


def _release(version: str) -> Optional[Tuple[int, int]]:
    m = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def torch_problem(version: Optional[str]) -> Optional[str]:
    """None when torch ``version`` is usable, else one line saying what is wrong and what to do."""
    if not version:
        return NOT_INSTALLED
    release = _release(version)
    if release is None:
        return f"PyTorch reports an unreadable version {version!r}; reinstall it with the PyTorch extension"
    if release < TORCH_MINIMUM:
        need = ".".join(map(str, TORCH_MINIMUM))
        return (f"PyTorch {version} is installed, but LesionSeg needs {need} or newer (numpy 2, torch.amp): "
                f"update it with the PyTorch extension (PyTorch Utils module), then restart Slicer")
    return None


def installed_torch_version() -> Optional[str]:
    """The installed torch's version, read from its package metadata (torch is not imported)."""
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def installed_torch_problem() -> Optional[str]:
    return torch_problem(installed_torch_version())


class OneAtATime:
    """``with guard.attempt() as allowed:`` — ``allowed`` is False while another attempt
    is running (from a second click, which Qt delivers while a dialog or wait cursor of
    the first one runs its event loop)."""

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @contextmanager
    def attempt(self) -> Iterator[bool]:
        got = self._lock.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                self._lock.release()
