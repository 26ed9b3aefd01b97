"""Worker jobs as the LesionSeg panel and effects see them: :class:`JobPoller` polls a
job from a QTimer (the work runs in a worker process, the GUI stays live), and
:class:`JobsPanel`, mixed into ``LesionSeg.LesionSegWidget``, starts one job at a time and
shows its progress, cancel and outcome (each kind finished by the widget's ``finish_<kind>``)."""
import logging

import qt
import slicer

POLL_MS = 100


class JobPoller:
    """Polls a worker job (``poll()`` never blocks) from a QTimer every POLL_MS and calls
    ``progress(fraction, message)`` while it runs and ``finished(job)`` once."""

    def __init__(self, job, progress, finished):
        self.job, self._progress, self._finished = job, progress, finished
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self._tick)
        self.timer.start()

    def _tick(self):
        try:
            done = self.job.poll()
        except Exception as e:   # never leave a timer firing on a broken job
            logging.error(f"LesionSeg: polling the worker failed: {e}")
            done = True
        inner = getattr(self.job, "job", self.job)
        self._progress(inner.fraction, inner.message)
        if done:
            self.stop()
            self._finished(self.job)

    def cancel(self):
        self.job.cancel()

    def stop(self):
        self.timer.stop()


class JobsPanel:
    """One worker job at a time for the panel (``self.poller``, ``self.jobKind``, ``self.jobContext``)."""

    def startJob(self, kind, starter, *args, context=None, **kwargs):
        """Start a worker job (``starter`` is one of the logic's ``start…Job``); a bad
        request is reported at once and nothing starts."""
        if self.poller is not None:
            return
        try:
            job = starter(*args, **kwargs)
        except Exception as e:
            slicer.util.errorDisplay(str(e))
            return
        self.jobKind, self.jobContext = kind, context
        bar = self.progressBar(kind)
        bar.value = 0
        bar.visible = True
        self.poller = JobPoller(job, lambda f, m: self.onProgress(bar, f, m), self.onFinished)
        self.updateButtons()

    def progressBar(self, kind):
        return {"segment": self.ui.progressBar, "batch": self.ui.batchProgressBar, "train": self.ui.trainProgressBar,
                "download": self.ui.downloadProgressBar}[kind]

    def onCancel(self):
        if self.poller is not None:
            self.poller.cancel()
            self.ui.statusLabel.text = "cancelling…"

    @staticmethod
    def onProgress(bar, fraction, message):
        bar.value = int(round(fraction * 100))
        bar.format = f"%p%  {message}"

    def onFinished(self, job):
        kind, context = self.jobKind, self.jobContext
        self.poller = self.jobKind = self.jobContext = None
        self.progressBar(kind).visible = False
        inner = getattr(job, "job", job)
        try:
            if inner.cancelled:
                self.report(kind, "Cancelled; nothing was changed.")
            elif inner.error is not None:
                self.report(kind, f"Failed: {inner.error}")
                slicer.util.errorDisplay(f"LesionSeg: {inner.error}")
            else:
                getattr(self, f"finish_{kind}")(job, context)
        except Exception as e:
            self.report(kind, f"Failed: {e}")
            slicer.util.errorDisplay(f"LesionSeg: {e}")
        finally:
            inner.cleanup()   # the job's files (finishSegmentJob has read the result already)
            self.updateButtons()

    def report(self, kind, text):
        if kind == "segment":
            self.ui.statusLabel.text = text
        elif kind == "batch":
            self.ui.batchSummaryText.setPlainText(text)
        elif kind == "train":
            self.ui.trainLogText.appendPlainText(text)
        else:
            self.ui.statusLabel.text = text
