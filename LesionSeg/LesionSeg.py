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
from LesionSegUI import jobs as _jobs  # noqa: E402
from LesionSegUI.jobs import JobsPanel  # noqa: E402
from LesionSegUI.panels import TrainingPanel, WeightsPanel  # noqa: E402
from LesionSegUI.selftest import EffectsSelfTest  # noqa: E402

#: polls a worker job from a QTimer (the effects use ``LesionSeg.JobPoller``)
JobPoller = _jobs.JobPoller


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


class LesionSegWidget(ScriptedLoadableModuleWidget, JobsPanel, TrainingPanel, WeightsPanel):
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
        self.ui.useCardThresholdCheckBox.connect("toggled(bool)", self.onUseCardThresholdToggled)
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

    def onUseCardThresholdToggled(self, useCard):
        # the user's threshold and seed threshold only count without the card's
        self.ui.thresholdSliderWidget.enabled = not useCard
        self.ui.seedThresholdSpinBox.enabled = not useCard

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
            "seedThreshold": None if self.ui.useCardThresholdCheckBox.checked else float(self.ui.seedThresholdSpinBox.value),
            "tta": self.ui.ttaCheckBox.checked,
        }


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


class LesionSegTest(EffectsSelfTest, ScriptedLoadableModuleTest):
    """Self-test in the real application (Self Tests module, or ctest ``py_LesionSeg``):
    a synthetic oblique volume with a bright lesion, a random-weight checkpoint of each
    network, and all five effects applied through a qMRMLSegmentEditorWidget — each
    result compared voxel for voxel with the logic's own prediction, then undone;
    masking, cancel and parameter storage checked on the way. Needs torch (skips
    itself, with a message, when it is not installed)."""
