"""Progress and cancellation of long jobs (inference, batches, training, downloads).

A :class:`CancelToken` is shared between the caller (a Slicer button, a CLI signal
handler) and the worker, which checks it between batches. A cancelled run raises
:class:`Cancelled` and returns nothing: partial label maps are never handed out, so a
user cannot mistake half a volume for a finished result. :class:`Progress` turns a
caller's ``progress(fraction, message)`` callback into monotone reports on stages.
Needs nothing but the standard library (Slicer imports it at start-up).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """The run was cancelled through its :class:`CancelToken`; nothing was produced."""


class CancelToken:
    """Thread-safe cancellation flag (``cancel()`` may be called from any thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


class Progress:
    """Wraps a user's ``progress(fraction, message)`` callback so that it is only ever
    called with fractions in [0, 1] that never decrease, and checks the cancel token at
    each report (reports happen between batches, which is where a run may stop).

    ``span(start, end, prefix)`` gives a child reporter whose 0…1 maps onto start…end of
    this one (its messages prefixed with ``prefix``), so that stages (inference,
    post-processing, the files of a batch) can report on their own scale.
    """

    def __init__(self, callback: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                 start: float = 0.0, end: float = 1.0, _root: "Progress" = None, prefix: str = "") -> None:
        self.callback = callback
        self.cancel = cancel
        self.prefix = prefix
        self.start, self.end = float(start), float(end)
        self._root = _root or self
        if _root is None:
            self._last = -1.0

    def span(self, start: float, end: float, prefix: str = "") -> "Progress":
        a = self.start + (self.end - self.start) * start
        b = self.start + (self.end - self.start) * end
        return Progress(self.callback, self.cancel, a, b, _root=self._root, prefix=self.prefix + prefix)

    def check(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def __call__(self, fraction: float, message: str = "") -> None:
        self.check()
        value = self.start + (self.end - self.start) * min(max(float(fraction), 0.0), 1.0)
        root = self._root
        value = max(value, root._last)  # monotone even if a stage reports out of order
        root._last = value
        if self.callback is not None:
            self.callback(value, self.prefix + message)

    def done(self, message: str = "done") -> None:
        """The final report: exactly 1.0 (called once the result is complete)."""
        root = self._root
        root._last = 1.0
        if self.callback is not None:
            self.callback(1.0, self.prefix + message)


def is_cancelled(error: BaseException) -> bool:
    """True for the exception a cancelled job raises."""
    return isinstance(error, Cancelled)


class TerminalProgress:
    """A progress callback for the command line: a tqdm bar per item on a terminal; on a
    pipe or a log file nothing (the caller prints one line per finished item instead).
    The Slicer GUI shows the same callbacks with its own progress bars."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        import sys
        self.stream = stream or sys.stderr
        self.bar = None
        self._tqdm = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
                self._tqdm = tqdm
            except ImportError:  # an installation without tqdm: no bar, the lines remain
                pass

    def start(self, description: str) -> None:
        self.end()
        if self._tqdm is not None:
            self.bar = self._tqdm(total=100, desc=description, leave=False, file=self.stream,
                                  bar_format="{desc} [{bar:30}] {percentage:5.1f}% {postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.n = round(min(max(float(fraction), 0.0), 1.0) * 100, 1)
            self.bar.set_postfix_str(message[:30], refresh=True)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
