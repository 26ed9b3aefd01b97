"""LesionSeg: lesion segmentation networks in 3D Slicer.

The module panel segments volumes, runs batches of files, trains networks on the scene's
volume/segmentation pairs, manages network weights and shows the model cards. Five
Segment Editor effects (one per network) are registered at startup. All computation is
in ``LesionSegLib`` (Qt-free, usable from the Python console). Networks, batches,
training and downloads run in a worker process (``LesionSegLib.slicer.worker``), never
on a thread of Slicer's process: Slicer's main thread holds the GIL, so a thread would
only advance at the GUI's poll ticks. torch is never imported at startup; it is installed
through the PyTorch extension after the user agrees.
"""
import logging
import os
import sys
import unittest


def _addLibraryToPath():
    """Make ``LesionSegLib`` importable when the module is used from a source checkout
    (only ``SlicerLesionSeg/LesionSeg`` added as a module path): the library is in the
    folder above. An installed extension has it beside the modules already."""
    import importlib.util
    if importlib.util.find_spec("LesionSegLib") is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "LesionSegLib", "__init__.py")) and root not in sys.path:
        sys.path.append(root)


_addLibraryToPath()

import qt  # noqa: E402
import slicer  # noqa: E402
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,  # noqa: E402
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

from LesionSegLib.slicer import torchsupport  # noqa: E402
from LesionSegLib.slicer.logic import LesionSegLogic as _CoreLogic  # noqa: E402

POLL_MS = 100


class LesionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LesionSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["LesionSeg developers"]
        self.parent.helpText = (
            "Lesion segmentation with five published networks (MSE-Net, M2SNet, L-Seg, BSNet, MS-LKSeg): "
            "segment a volume, run batches of files, train on your own cases, manage network weights. "
            "Each network is also a Segment Editor effect. See the model cards for what each network was "
            "built for; results are research use only.")
        self.parent.acknowledgementText = (
            "Networks reconstructed from the publications cited in their model cards. "
            "ISLES'22 test data: Hernandez Petzsche et al., Sci Data 2022 (CC BY-SA 4.0).")
        # effects need the Segment Editor's Python package, which is ready after startup
        slicer.app.connect("startupCompleted()", registerEffects)
        # no worker outlives the application
        slicer.app.connect("aboutToQuit()", stopWorkers)


def registerEffects():
    import LesionSegEffects
    LesionSegEffects.registerEffects()


def stopWorkers():
    from LesionSegLib.slicer import worker_job
    worker_job.stop_all()


def torchAvailable():
    """True when a usable torch is installed (checked without importing it)."""
    return torchsupport.installed_torch_problem() is None


_torchInstall = torchsupport.OneAtATime("installing PyTorch")


def ensureTorch(askUser=True):
    """Make a usable torch importable: install it through the PyTorch extension
    (PyTorchUtils), which picks the wheel matching the computer's GPU, after the user
    agrees. A torch older than LesionSeg needs is reported, with what to do. Only one
    installation runs at a time. Returns True when torch is available."""
    problem = torchsupport.installed_torch_problem()
    if problem is None:
        return True
    if problem != torchsupport.NOT_INSTALLED:
        slicer.util.errorDisplay(problem)
        return False
    if slicer.app.testingEnabled():
        logging.error("LesionSeg: PyTorch is not installed (not installing it while testing)")
        return False
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay("LesionSeg needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                                 "Manager, restart Slicer, then try again.")
        return False
    with _torchInstall.attempt() as allowed:
        if not allowed:
            slicer.util.warningDisplay("PyTorch is being installed already; wait until it has finished.")
            return False
        if askUser and not slicer.util.confirmOkCancelDisplay(
                "LesionSeg needs PyTorch, which is not installed yet.\n\n"
                "Install it now? The PyTorch extension chooses the build for your GPU (or CPU); "
                "the download is large (up to a few GB) and may take several minutes.",
                "LesionSeg: install PyTorch"):
            return False
        logic = PyTorchUtils.PyTorchUtilsLogic()
        try:
            with slicer.util.WaitCursor():
                torch = logic.installTorch(askConfirmation=False,
                                           torchVersionRequirement=torchsupport.TORCH_REQUIREMENT)
        except Exception as e:
            slicer.util.errorDisplay(f"PyTorch installation failed: {e}")
            return False
    if torch is None:
        slicer.util.errorDisplay("PyTorch was not installed. You can retry from the LesionSeg module (Weights section).")
        return False
    problem = torchsupport.installed_torch_problem()
    if problem is not None:
        slicer.util.errorDisplay(problem)
        return False
    return True


_sharedLogic = None


def sharedLogic():
    """The one LesionSegLogic of the application: the module panel, the five effects and
    ``slicer.util.getModuleLogic("LesionSeg")`` all use it."""
    global _sharedLogic
    if _sharedLogic is None:
        _sharedLogic = LesionSegLogic()
    return _sharedLogic


def importWeightsDialog(parent, model=None, preset=None):
    """Ask for a weight file and install it (the module's and the effects' Import button).
    Returns the installed entry, or None."""
    logic = sharedLogic()
    path = qt.QFileDialog.getOpenFileName(parent, "Import network weights", "", logic.weightsFileFilter())
    if not path or not ensureTorch():
        return None
    try:
        with slicer.util.WaitCursor():
            return logic.importCheckpoint(path, model=None)
    except Exception as first:
        # plain state dicts are recognised by their keys only for official files: then the
        # network (and preset) chosen in the panel says what the file is
        if model is not None:
            try:
                with slicer.util.WaitCursor():
                    return logic.importCheckpoint(path, model=model, preset=preset)
            except Exception:
                pass
        slicer.util.errorDisplay(f"Could not import {path}: {first}")
        return None


def fillWeightsCombo(combo, model, preset, current=""):
    """The weights selector of the panel and the effects, from ``logic.weightsChoices``."""
    blocked = combo.blockSignals(True)
    combo.clear()
    for label, value in sharedLogic().weightsChoices(model, preset):
        combo.addItem(label, value)
    if current and combo.findData(current) < 0:
        combo.addItem(os.path.basename(current), current)   # a file chosen earlier, kept in the scene
    combo.setCurrentIndex(max(0, combo.findData(current)))
    combo.blockSignals(blocked)


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


class LesionSegLogic(ScriptedLoadableModuleLogic, _CoreLogic):
    """The Qt-free ``LesionSegLib.slicer.logic.LesionSegLogic`` on Slicer's scene.

    Console::

        logic = slicer.util.getModuleLogic("LesionSeg")   # or LesionSeg.LesionSegLogic()
        seg = logic.segment(getNode("MRBrainTumor1"), model="msenet", preset="isles-dwi")
        print(logic.segmentFiles(["/data/cases"], "/data/out", model="m2snet", preset="covid-ct"))
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        _CoreLogic.__init__(self, scene=slicer.mrmlScene)


class LesionSegWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.poller = None
        self.jobKind = None
        self.jobContext = None

    @property
    def job(self):
        return self.poller.job if self.poller is not None else None

    # ------------------------------------------------------------------ setup

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LesionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = sharedLogic()

        for combo in (self.ui.modelComboBox, self.ui.trainModelComboBox):
            from LesionSegLib import models
            for name in self.logic.models(all=True):
                combo.addItem(models.card(name)["display_name"], name)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.trainModelComboBox.connect("currentIndexChanged(int)", self.onTrainModelChanged)
        self.ui.useCardThresholdCheckBox.connect("toggled(bool)",
                                                 lambda on: setattr(self.ui.thresholdSliderWidget, "enabled", not on))
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.applyButton.connect("clicked()", self.onSegment)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.batchAddFilesButton.connect("clicked()", self.onBatchAddFiles)
        self.ui.batchAddFolderButton.connect("clicked()", self.onBatchAddFolder)
        self.ui.batchClearButton.connect("clicked()", lambda: (self.ui.batchFilesList.clear(), self.updateButtons()))
        self.ui.batchOutputPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)
        self.ui.batchRunButton.connect("clicked()", self.onBatch)
        self.ui.batchCancelButton.connect("clicked()", self.onCancel)
        self.ui.findPairsButton.connect("clicked()", self.onFindPairs)
        self.ui.addPairButton.connect("clicked()", lambda: self.addPairRow())
        self.ui.removePairButton.connect("clicked()", self.onRemovePairs)
        self.ui.trainOutputPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)
        self.ui.trainButton.connect("clicked()", self.onTrain)
        self.ui.trainCancelButton.connect("clicked()", self.onCancel)
        self.ui.importWeightsButton.connect("clicked()", self.onImportWeights)
        self.ui.removeWeightsButton.connect("clicked()", self.onRemoveWeights)
        self.ui.refreshWeightsButton.connect("clicked()", self.refreshWeights)
        self.ui.downloadUrlLineEdit.connect("textChanged(QString)", self.updateButtons)
        self.ui.downloadSha256LineEdit.connect("textChanged(QString)", self.updateButtons)
        self.ui.downloadButton.connect("clicked()", self.onDownload)
        self.ui.downloadCancelButton.connect("clicked()", self.onCancel)
        self.ui.openCacheButton.connect("clicked()", self.onOpenCache)
        self.ui.clearCacheButton.connect("clicked()", self.onClearCache)
        self.ui.installTorchButton.connect("clicked()", self.onInstallTorch)
        self.ui.trainingPairsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.weightsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)

        self.onModelChanged()
        self.onTrainModelChanged()
        self.refreshWeights()
        self.updateTorchStatus()
        self.updateButtons()

    def cleanup(self):
        if self.poller is not None:
            self.poller.stop()
            self.poller.cancel()
        ScriptedLoadableModuleWidget.cleanup(self)

    # ------------------------------------------------------------------ state

    def model(self):
        return self.ui.modelComboBox.currentData

    def preset(self):
        return self.ui.presetComboBox.currentData

    def onModelChanged(self, *unused):
        combo = self.ui.presetComboBox
        blocked = combo.blockSignals(True)
        combo.clear()
        from LesionSegLib import models
        card = models.card(self.model())
        for p in self.logic.presets(self.model()):
            combo.addItem(p, p)
        combo.setCurrentIndex(max(0, combo.findData(card.get("default_preset"))))
        combo.blockSignals(blocked)
        self.onPresetChanged()

    def onPresetChanged(self, *unused):
        from LesionSegLib.slicer.cardhtml import model_card_html
        self.ui.modelCardBrowser.setHtml(model_card_html(self.model(), self.preset()))
        from LesionSegLib import models
        card = self.logic.modelCard(self.model(), self.preset())
        self.ui.thresholdSliderWidget.value = models.Outputs.of(card).threshold
        self.fillWeightsCombo()

    def onTrainModelChanged(self, *unused):
        combo = self.ui.trainPresetComboBox
        combo.clear()
        name = self.ui.trainModelComboBox.currentData
        for p in self.logic.presets(name):
            combo.addItem(p, p)

    def fillWeightsCombo(self):
        fillWeightsCombo(self.ui.weightsComboBox, self.model(), self.preset())

    def updateButtons(self, *unused):
        busy = self.job is not None
        self.ui.applyButton.enabled = not busy and self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.cancelButton.enabled = busy and self.jobKind == "segment"
        self.ui.batchRunButton.enabled = (not busy and self.ui.batchFilesList.count > 0
                                          and bool(self.ui.batchOutputPathLineEdit.currentPath))
        self.ui.batchCancelButton.enabled = busy and self.jobKind == "batch"
        self.ui.trainButton.enabled = (not busy and self.ui.trainingPairsTable.rowCount > 0
                                       and bool(self.ui.trainOutputPathLineEdit.currentPath))
        self.ui.trainCancelButton.enabled = busy and self.jobKind == "train"
        sha = self.ui.downloadSha256LineEdit.text.strip()
        self.ui.downloadButton.enabled = (not busy and bool(self.ui.downloadUrlLineEdit.text.strip())
                                          and len(sha) == 64)
        self.ui.downloadCancelButton.enabled = busy and self.jobKind == "download"

    def segmentOptions(self):
        return {
            "model": self.model(),
            "checkpoint": self.ui.weightsComboBox.currentData or None,
            "preset": self.preset(),
            "device": self.ui.deviceComboBox.currentText,
            "threshold": None if self.ui.useCardThresholdCheckBox.checked else float(self.ui.thresholdSliderWidget.value),
            "tta": self.ui.ttaCheckBox.checked,
        }

    # ------------------------------------------------------------------ worker jobs

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

    # ------------------------------------------------------------------ segment

    def onSegment(self):
        if not ensureTorch():
            return
        options = self.segmentOptions()
        self.startJob("segment", self.logic.startSegmentJob, self.ui.inputVolumeSelector.currentNode(),
                      self.ui.outputSegmentationSelector.currentNode(),
                      probabilities=self.ui.probabilityCheckBox.checked,
                      minLesionSizeMm3=self.ui.minLesionSizeSpinBox.value, **options)

    def finish_segment(self, run, context):
        with slicer.util.WaitCursor():
            node = self.logic.finishSegmentJob(run)
        self.ui.outputSegmentationSelector.setCurrentNode(node)
        n = len(getattr(self.logic.lastPrediction, "lesions", []) or [])
        self.ui.statusLabel.text = f"Done: {n} lesion(s) in {node.GetName()}."

    # ------------------------------------------------------------------ batch

    def onBatchAddFiles(self):
        paths = qt.QFileDialog.getOpenFileNames(self.parent, "Images to segment", "",
                                                "Images (*.nii *.nii.gz *.nrrd *.mha *.mhd *.png *.jpg *.jpeg *.tif);;"
                                                "All files (*)")
        for p in paths:
            self.ui.batchFilesList.addItem(p)
        self.updateButtons()

    def onBatchAddFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Folder of images to segment")
        if folder:
            self.ui.batchFilesList.addItem(folder)
        self.updateButtons()

    def onBatch(self):
        if not ensureTorch():
            return
        paths = [self.ui.batchFilesList.item(i).text() for i in range(self.ui.batchFilesList.count)]
        options = self.segmentOptions()
        self.ui.batchSummaryText.setPlainText("running…")
        self.startJob("batch", self.logic.startBatchJob, paths, self.ui.batchOutputPathLineEdit.currentPath,
                      outputFormat=self.ui.batchFormatComboBox.currentText,
                      overwrite=self.ui.batchOverwriteCheckBox.checked,
                      minLesionSizeMm3=self.ui.minLesionSizeSpinBox.value, **options)

    def finish_batch(self, job, context):
        self.ui.batchSummaryText.setPlainText(job.result["text"])

    # ------------------------------------------------------------------ training

    def addPairRow(self, volume=None, segmentation=None):
        table = self.ui.trainingPairsTable
        row = table.rowCount
        table.insertRow(row)
        for col, (types, node) in enumerate(((["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"], volume),
                                             (["vtkMRMLSegmentationNode"], segmentation))):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = types
            combo.noneEnabled = False
            combo.addEnabled = False
            combo.removeEnabled = False
            combo.setMRMLScene(slicer.mrmlScene)
            if node is not None:
                combo.setCurrentNode(node)
            table.setCellWidget(row, col, combo)
        self.updateButtons()

    def onFindPairs(self):
        """Each segmentation with its reference volume (the volume it was drawn on)."""
        self.ui.trainingPairsTable.setRowCount(0)
        for seg in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            volume = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
            if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and seg.GetSegmentation().GetNumberOfSegments():
                self.addPairRow(volume, seg)
        if self.ui.trainingPairsTable.rowCount == 0:
            slicer.util.warningDisplay("No segmentation with a reference volume was found in the scene.")

    def onRemovePairs(self):
        rows = sorted({i.row() for i in self.ui.trainingPairsTable.selectedIndexes()}, reverse=True)
        for r in rows:
            self.ui.trainingPairsTable.removeRow(r)
        self.updateButtons()

    def trainingPairs(self):
        table = self.ui.trainingPairsTable
        pairs = []
        for r in range(table.rowCount):
            v, s = table.cellWidget(r, 0).currentNode(), table.cellWidget(r, 1).currentNode()
            if v is not None and s is not None:
                pairs.append((v, s))
        return pairs

    def onTrain(self):
        if not ensureTorch():
            return
        model = self.ui.trainModelComboBox.currentData
        preset = self.ui.trainPresetComboBox.currentData
        pairs = self.trainingPairs()
        epochs = self.ui.trainEpochsSpinBox.value or None
        self.ui.trainLogText.appendPlainText(f"Training {model} ({preset}) on {len(pairs)} case(s)…")
        # MRML is read on the main thread into files of the job; the worker process trains on them
        self.startJob("train", self.logic.startTrainJob, pairs, self.ui.trainOutputPathLineEdit.currentPath,
                      model=model, preset=preset, epochs=epochs, device=self.ui.trainDeviceComboBox.currentText,
                      resume=self.ui.trainResumeCheckBox.checked)

    def finish_train(self, job, context):
        self.ui.trainLogText.appendPlainText(f"Finished. Best checkpoint: {job.result.get('best_checkpoint')} "
                                             "(installed: choose it under Weights).")
        self.refreshWeights()

    # ------------------------------------------------------------------ weights

    def refreshWeights(self):
        from LesionSegLib import models
        table = self.ui.weightsTable
        entries = self.logic.installedWeights()
        table.setRowCount(len(entries))
        for r, e in enumerate(entries):
            values = (models.card(e.model)["display_name"], e.preset or "", os.path.basename(e.path),
                      f"{e.size / 1e6:.1f} MB", e.source)
            for c, v in enumerate(values):
                item = qt.QTableWidgetItem(v)
                item.setData(qt.Qt.UserRole, e.id)
                item.setToolTip(f"{e.path}\nSHA-256 {e.sha256}\ninstalled {e.installed}")
                table.setItem(r, c, item)
        self.ui.cacheDirLabel.text = str(self.logic.weightsCacheDir())
        if hasattr(self.ui, "weightsComboBox"):
            self.fillWeightsCombo()

    def onImportWeights(self):
        entry = importWeightsDialog(self.parent, self.model(), self.preset())
        if entry is not None:
            slicer.util.infoDisplay(f"Installed {entry.id}")
            self.refreshWeights()

    def onRemoveWeights(self):
        ids = {self.ui.weightsTable.item(i.row(), 0).data(qt.Qt.UserRole)
               for i in self.ui.weightsTable.selectedIndexes()}
        if not ids or not slicer.util.confirmYesNoDisplay(f"Delete {len(ids)} installed weight file(s)?"):
            return
        for entry_id in ids:
            self.logic.removeWeights(entry_id)
        self.refreshWeights()

    def onDownload(self):
        if not ensureTorch():   # the downloaded file is checked by loading it
            return
        url = self.ui.downloadUrlLineEdit.text.strip()
        sha = self.ui.downloadSha256LineEdit.text.strip()
        self.startJob("download", self.logic.startDownloadJob, url, sha, model=None)

    def finish_download(self, job, context):
        self.ui.statusLabel.text = f"Installed {job.result['id']}"
        self.refreshWeights()

    def onOpenCache(self):
        folder = self.logic.weightsCacheDir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearCache(self):
        if not slicer.util.confirmYesNoDisplay(
                f"Delete every installed weight file in\n{self.logic.weightsCacheDir()}?"):
            return
        freed = self.logic.clearWeightsCache()
        slicer.util.infoDisplay(f"Freed {freed / 1e6:.1f} MB.")
        self.refreshWeights()

    def updateTorchStatus(self):
        ok = torchAvailable()
        self.ui.torchStatusLabel.text = "installed" if ok else "not installed"
        self.ui.installTorchButton.enabled = not ok

    def onInstallTorch(self):
        ensureTorch()
        self.updateTorchStatus()


class LesionSegTest(ScriptedLoadableModuleTest):
    """Self-test in the real application (Self Tests module, or ctest ``py_LesionSeg``):
    a synthetic oblique volume with a bright lesion, a random-weight checkpoint of each
    network, and all five effects applied through a qMRMLSegmentEditorWidget — each
    result compared voxel for voxel with the logic's own prediction, then undone;
    masking, cancel and parameter storage checked on the way. Needs torch (skips
    itself, with a message, when it is not installed)."""

    from LesionSegLib.slicer import EFFECTS as _EFFECTS
    EFFECTS = tuple((name, model) for model, _cls, name, _title in _EFFECTS)

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def requireTorch(self):
        """Every test that runs a network starts with this: ctest calls test_* methods
        directly (never runTest), so the guard must be in each of them."""
        if not torchAvailable():
            self.skipTest(f"LesionSeg: {torchsupport.installed_torch_problem()}; skipping the inference tests")

    def runTest(self):
        for test in (self.test_effects_registered, self.test_effects_apply_undo_mask_cancel, self.test_console_logic):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as e:
                self.delayDisplay(str(e))
        self.delayDisplay("LesionSeg tests passed")

    # -------------------------------------------------------------- helpers

    def _volume(self, name="LesionSegTestVolume", size=(160, 160, 3)):
        """Oblique, anisotropic volume with one bright ellipsoid lesion."""
        import numpy as np
        import vtk
        nx, ny, nz = size
        z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        lesion = ((x - 0.65 * nx) / 14.0) ** 2 + ((y - 0.4 * ny) / 10.0) ** 2 <= 1.0
        arr = (100.0 + 20.0 * x / nx).astype("float32")
        arr[lesion] = 400.0
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, arr)
        node.SetSpacing(0.8, 0.9, 3.0)
        node.SetOrigin(12.5, -30.0, 47.0)
        directions = vtk.vtkMatrix4x4()
        transform = vtk.vtkTransform()
        transform.RotateZ(30)
        transform.RotateX(-15)
        transform.GetMatrix(directions)
        node.SetIJKToRASDirectionMatrix(directions)
        node.CreateDefaultDisplayNodes()
        return node, lesion

    def _rgb_image(self, name="LesionSegTestPhoto", size=(96, 64)):
        """A one-slice RGB vector volume (a photograph) with three coloured spots."""
        import numpy as np
        nx, ny = size
        y, x = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        rgb = np.zeros((1, ny, nx, 3), np.uint8)
        rgb[0] = (150, 60, 30)
        for cx, cy, colour in ((20, 20, (250, 240, 120)), (60, 40, (120, 20, 20)), (80, 15, (255, 255, 200))):
            rgb[0][(x - cx) ** 2 + (y - cy) ** 2 <= 36] = colour
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, rgb)
        node.CreateDefaultDisplayNodes()
        return node

    def _random_checkpoint(self, model, folder):
        from LesionSegLib import checkpoint, models
        net = models.create(model)
        path = os.path.join(folder, f"{model}-random.pt")
        checkpoint.save(path, net, provenance={"note": "random weights for the LesionSeg self-test"})
        return path

    def _editor(self, segmentation, volume):
        widget = slicer.qMRMLSegmentEditorWidget()
        widget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        widget.setMRMLSegmentEditorNode(editorNode)
        widget.setSegmentationNode(segmentation)
        widget.setSourceVolumeNode(volume)
        return widget, editorNode

    def _run_effect(self, widget, name, params):
        widget.setActiveEffectByName(name)
        effect = widget.activeEffect()
        self.assertIsNotNone(effect, f"effect {name} is not available")
        for key, value in params.items():
            effect.setParameter(key, value)
        effect.self().onApply()
        self.assertTrue(effect.self().waitForCompletion(900), f"{name} did not finish")
        return effect

    # -------------------------------------------------------------- tests

    def test_effects_registered(self):
        self.delayDisplay("LesionSeg effects are registered")
        registerEffects()   # idempotent
        widget = slicer.qMRMLSegmentEditorWidget()
        widget.setMRMLScene(slicer.mrmlScene)
        names = list(widget.availableEffectNames())
        for name, _ in self.EFFECTS:
            self.assertIn(name, names)
        factory_names = [e.name for e in slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()]
        self.assertEqual(len(factory_names), len(set(factory_names)))

    def test_effects_apply_undo_mask_cancel(self):
        self.requireTorch()
        import tempfile

        import numpy as np

        from LesionSegLib.slicer import bridge
        from LesionSegLib.slicer.logic import LesionSegLogic as CoreLogic

        folder = tempfile.mkdtemp(prefix="LesionSegTest")
        volume, lesion = self._volume()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LesionSegTestSegmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        # L-Seg reads colour fundus photographs: it gets an RGB image and its own segmentation
        photo = self._rgb_image()
        photoSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LesionSegTestPhotoSeg")
        photoSegmentation.CreateDefaultDisplayNodes()
        photoSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(photo)
        widget, editorNode = self._editor(segmentation, volume)
        core = CoreLogic(scene=slicer.mrmlScene)

        for name, model in self.EFFECTS:
            self.delayDisplay(f"Effect {name}")
            if model == "lseg":
                widget.setSegmentationNode(photoSegmentation)
                widget.setSourceVolumeNode(photo)
                source, target_seg = photo, photoSegmentation
            else:
                widget.setSegmentationNode(segmentation)
                widget.setSourceVolumeNode(volume)
                source, target_seg = volume, segmentation
            path = self._random_checkpoint(model, folder)
            reference = core.predict(core.inputImage(source), model=model, checkpoint=path, threshold=0.5)
            target = target_seg.GetSegmentation().AddEmptySegment(f"target-{model}", f"target {model}")
            editorNode.SetSelectedSegmentID(target)
            before = {sid: bridge.segment_mask(target_seg, sid, source).copy()
                      for sid in bridge.segment_ids(target_seg)}
            effect = self._run_effect(widget, name, {"Checkpoint": path, "UseCardThreshold": 0, "Threshold": 0.5})
            # parameters live on the segment editor node, so they are saved with the scene
            self.assertEqual(editorNode.GetAttribute(f"{name}.Checkpoint"), path)
            classes = list(reference.classes)
            if len(classes) == 1:
                got = bridge.segment_mask(target_seg, target, source)
                self.assertTrue(np.array_equal(got, reference.masks[int(classes[0]["value"])]),
                                f"{name}: selected segment differs from the logic's prediction")
            else:
                for cls in classes:
                    sid = bridge.find_class_segment(target_seg, cls, model)
                    self.assertIsNotNone(sid, f"{name}: no segment named {cls['name']}")
                    segment = target_seg.GetSegmentation().GetSegment(sid)
                    self.assertEqual(segment.GetName(), cls["name"])
                    self.assertEqual(segment.GetTerminology(), bridge.terminology_entry(cls["terminology"]))
                    self.assertTrue(np.array_equal(bridge.segment_mask(target_seg, sid, source),
                                                   reference.masks[int(cls["value"])]))
            widget.undo()
            for sid, mask in before.items():
                self.assertTrue(np.array_equal(bridge.segment_mask(target_seg, sid, source), mask),
                                f"{name}: undo did not restore segment {sid}")

        self.delayDisplay("Masking: editable area inside a segment")
        widget.setSegmentationNode(segmentation)
        widget.setSourceVolumeNode(volume)
        path = self._random_checkpoint("msenet", folder)
        region = segmentation.GetSegmentation().AddEmptySegment("region", "region")
        box = np.zeros(lesion.shape, bool)
        box[:, : lesion.shape[1] // 2, :] = True
        bridge.set_segment_mask(segmentation, region, box, volume)
        target = segmentation.GetSegmentation().AddEmptySegment("masked", "masked")
        editorNode.SetSelectedSegmentID(target)
        editorNode.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        editorNode.SetMaskSegmentID(region)
        self._run_effect(widget, "LesionSeg MSE-Net", {"Checkpoint": path, "UseCardThreshold": 0, "Threshold": 0.01})
        got = bridge.segment_mask(segmentation, target, volume)
        self.assertFalse((got & ~box).any(), "voxels were written outside the editable area")
        editorNode.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)

        self.delayDisplay("Cancel leaves the segmentation unchanged")
        before = {sid: bridge.segment_mask(segmentation, sid, volume).copy() for sid in bridge.segment_ids(segmentation)}
        widget.setActiveEffectByName("LesionSeg BSNet")
        effect = widget.activeEffect()
        effect.setParameter("Checkpoint", self._random_checkpoint("bsnet", folder))
        effect.self().onApply()
        effect.self().onCancel()
        self.assertTrue(effect.self().waitForCompletion(900))
        after = {sid: bridge.segment_mask(segmentation, sid, volume) for sid in bridge.segment_ids(segmentation)}
        self.assertEqual(sorted(before), sorted(after))
        for sid in before:
            self.assertTrue(np.array_equal(before[sid], after[sid]))
        widget.setActiveEffectByName("")

    def test_console_logic(self):
        self.requireTorch()
        import tempfile

        import numpy as np

        from LesionSegLib.slicer import bridge
        self.delayDisplay("Console: LesionSegLogic().segment on the scene")
        folder = tempfile.mkdtemp(prefix="LesionSegTest")
        volume, lesion = self._volume(size=(64, 64, 4))
        logic = LesionSegLogic()
        path = self._random_checkpoint("msenet", folder)
        seg = logic.segment(volume, model="msenet", checkpoint=path, probabilityVolume=True)
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)
        segment = seg.GetSegmentation().GetNthSegment(0)
        cls = logic.modelCard("msenet")["classes"][0]
        self.assertEqual(segment.GetName(), cls["name"])
        self.assertEqual(len(logic.lastProbabilityVolumes), 1)
        self.assertTrue(np.allclose(bridge.ijk_to_ras(logic.lastProbabilityVolumes[0]), bridge.ijk_to_ras(volume)))
