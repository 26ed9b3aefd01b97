"""Base class of the five LesionSeg Segment Editor effects (one per network).

The effects are thin: options are stored on the segment editor node (saved with the
scene; every parameter has a non-empty default), and all work goes through the one
``LesionSegLogic`` of the application (``LesionSeg.sharedLogic()``):

1. Apply: the logic writes the source volume (its exact geometry) to a file and starts
   a worker process (``logic.startSegmentJob``); the segmentation, source volume and
   selected segment of this Apply are pinned;
2. a QTimer polls the worker (progress bar, Cancel kills it); Slicer stays responsive
   because the network runs in another process, not on a thread that would need the GIL;
3. back on the main thread, ``logic.finishSegmentJob`` writes each class through the
   effect's modifier labelmap with ``modifySegmentByLabelmap``, so the editor's masking
   settings (editable area, editable intensity range, overwrite of other segments)
   apply; Undo restores the previous state. Single-class networks write into the
   selected segment (a new, named segment when none is selected); multi-class networks
   (L-Seg) write named, coloured, terminology-coded segments that keep their overlaps.

A cancelled, crashed or failing run writes nothing. torch is never imported at file scope.
"""
import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

_HERE = os.path.dirname(os.path.abspath(__file__))
_UI = os.path.join(_HERE, "..", "Resources", "UI", "LesionSegEffect.ui")
_ICONS = os.path.join(_HERE, "..", "Resources", "Icons")


def sharedLogic():
    import LesionSeg
    return LesionSeg.sharedLogic()


class AbstractLesionSegEffect(AbstractScriptedSegmentEditorEffect):
    """Subclasses only define a __file__-based clone(); their network, effect name and
    title come from ``LesionSegLib.slicer.EFFECTS``, the one list of the five effects."""

    def __init__(self, scriptedEffect):
        from LesionSegLib.slicer import effect_for_class
        self.MODEL, self.EFFECT_NAME, self.TITLE = effect_for_class(self.__class__.__name__)
        scriptedEffect.name = self.EFFECT_NAME
        scriptedEffect.title = self.TITLE
        # multi-class networks write several segments; single-class ones choose the
        # selected segment themselves (or create one), so no segment is required
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.poller = None
        self.ui = None

    @property
    def job(self):
        return self.poller.job if self.poller is not None else None

    # ------------------------------------------------------------------ identity

    def icon(self):
        path = os.path.join(_ICONS, self.__class__.__name__ + ".png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        from LesionSegLib import models
        card = models.card(self.MODEL)
        return (f"<html>{card['display_name']}: {card.get('summary', '')}<br>"
                "<p>Runs the network on the source volume and writes the lesion classes into the segmentation. "
                "Single-class networks write into the selected segment (or a new named segment); multi-class "
                "networks write one named segment per class. The editor's masking settings apply, and Undo "
                "restores the previous segmentation.</p>"
                "<p>Weights: manage them in the <b>LesionSeg</b> module (import, download with SHA-256 check, "
                "train).</p></html>")

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    # ------------------------------------------------------------------ GUI

    def setupOptionsFrame(self):
        self.ui = slicer.util.loadUI(_UI)
        self.ui.setObjectName(self.__class__.__name__ + "Options")
        self.scriptedEffect.addOptionsWidget(self.ui)
        self.w = slicer.util.childWidgetVariables(self.ui)
        from LesionSegLib.slicer.logic import LesionSegLogic
        for p in LesionSegLogic.presets(self.MODEL):
            self.w.presetComboBox.addItem(p, p)
        self.w.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.w.weightsComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.w.deviceComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.w.useCardThresholdCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.w.thresholdSliderWidget.connect("valueChanged(double)", self.updateMRMLFromGUI)
        self.w.seedThresholdSpinBox.connect("valueChanged(double)", self.updateMRMLFromGUI)
        self.w.ttaCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.w.probabilityCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.w.segmentsListWidget.connect("itemChanged(QListWidgetItem*)", self.updateMRMLFromGUI)
        self.w.importWeightsButton.connect("clicked()", self.onImportWeights)
        self.w.applyButton.connect("clicked()", self.onApply)
        self.w.cancelButton.connect("clicked()", self.onCancel)
        self.w.modelCardButton.connect("clicked()", self.onModelCard)
        self.fillWeights()
        self.fillSegments()

    def setMRMLDefaults(self):
        from LesionSegLib.slicer.logic import LesionSegLogic
        for name, value in LesionSegLogic.effectParameterDefaults(self.MODEL).items():
            self.scriptedEffect.setParameterDefault(name, value)

    def _param(self, name):
        """A parameter's string, "" before the editor has a parameter node (never an
        undefined-parameter lookup: every parameter has a non-empty default)."""
        p = self.scriptedEffect
        if not p.parameterSetNode() or not p.parameterDefined(name):
            return ""
        return p.parameter(name)

    def _options(self):
        from LesionSegLib.slicer.logic import LesionSegLogic
        return LesionSegLogic.effectOptions(self.MODEL, self._param)

    def _preset(self):
        return self._options()["preset"]

    def fillWeights(self):
        import LesionSeg
        checkpoint = self._options()["checkpoint"] or ""
        LesionSeg.fillWeightsCombo(self.w.weightsComboBox, self.MODEL, self._preset(), checkpoint)

    def fillSegments(self):
        from LesionSegLib.slicer.logic import LesionSegLogic
        lst = self.w.segmentsListWidget
        blocked = lst.blockSignals(True)
        lst.clear()
        chosen = self._options()["classes"]
        for cls in LesionSegLogic.modelCard(self.MODEL, self._preset())["classes"]:
            item = qt.QListWidgetItem(cls["name"])
            item.setData(qt.Qt.UserRole, int(cls["value"]))
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if chosen is None or int(cls["value"]) in chosen else qt.Qt.Unchecked)
            color = cls.get("color", [128, 128, 128])
            item.setForeground(qt.QBrush(qt.QColor(*color)))
            lst.addItem(item)
        lst.blockSignals(blocked)

    def updateGUIFromMRML(self):
        if self.ui is None or not self.scriptedEffect.parameterSetNode():
            return
        w = self.w
        o = self._options()
        widgets = (w.presetComboBox, w.deviceComboBox, w.useCardThresholdCheckBox, w.thresholdSliderWidget,
                   w.seedThresholdSpinBox, w.ttaCheckBox, w.probabilityCheckBox)
        for widget in widgets:
            widget.blockSignals(True)
        w.presetComboBox.setCurrentIndex(max(0, w.presetComboBox.findData(o["preset"])))
        w.deviceComboBox.setCurrentText(o["device"])
        use_card = o["threshold"] is None
        w.useCardThresholdCheckBox.setChecked(use_card)
        w.thresholdSliderWidget.enabled = not use_card
        w.thresholdSliderWidget.value = float(self._param("Threshold") or 0.5)
        w.seedThresholdSpinBox.enabled = not use_card
        w.seedThresholdSpinBox.value = float(self._param("SeedThreshold") or 0.0)
        w.ttaCheckBox.setChecked(o["tta"])
        w.probabilityCheckBox.setChecked(o["probabilities"])
        for widget in widgets:
            widget.blockSignals(False)
        self.fillWeights()
        self.fillSegments()
        running = self.poller is not None
        source = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        w.applyButton.enabled = not running and source is not None
        w.applyButton.toolTip = ("Run the network on the source volume" if source is not None
                                 else "Select a source volume first")
        w.cancelButton.enabled = running

    def updateMRMLFromGUI(self, *unused):
        if self.ui is None or not self.scriptedEffect.parameterSetNode():
            return
        from LesionSegLib.slicer.logic import LesionSegLogic
        w = self.w
        with slicer.util.NodeModify(self.scriptedEffect.parameterSetNode()):
            self.scriptedEffect.setParameter("Preset", w.presetComboBox.currentData or "default")
            self.scriptedEffect.setParameter("Checkpoint", w.weightsComboBox.currentData or LesionSegLogic.NEWEST_WEIGHTS)
            self.scriptedEffect.setParameter("Device", w.deviceComboBox.currentText)
            self.scriptedEffect.setParameter("UseCardThreshold", 1 if w.useCardThresholdCheckBox.checked else 0)
            self.scriptedEffect.setParameter("Threshold", float(w.thresholdSliderWidget.value))
            self.scriptedEffect.setParameter("SeedThreshold", float(w.seedThresholdSpinBox.value))
            self.scriptedEffect.setParameter("TTA", 1 if w.ttaCheckBox.checked else 0)
            self.scriptedEffect.setParameter("ProbabilityMap", 1 if w.probabilityCheckBox.checked else 0)
            values = [str(w.segmentsListWidget.item(i).data(qt.Qt.UserRole))
                      for i in range(w.segmentsListWidget.count)
                      if w.segmentsListWidget.item(i).checkState() == qt.Qt.Checked]
            everything = len(values) == w.segmentsListWidget.count
            self.scriptedEffect.setParameter("Segments", LesionSegLogic.ALL_CLASSES if everything else ",".join(values))

    def onPresetChanged(self, *unused):
        self.updateMRMLFromGUI()
        self.fillWeights()
        self.fillSegments()

    def onImportWeights(self):
        import LesionSeg
        entry = LesionSeg.importWeightsDialog(self.ui, self.MODEL, self._preset())
        if entry is not None:
            self.scriptedEffect.setParameter("Checkpoint", entry.id)
            self.fillWeights()

    def onModelCard(self):
        from LesionSegLib.slicer.cardhtml import model_card_html
        dialog = qt.QDialog(self.ui)
        dialog.setWindowTitle(f"Model card: {self.TITLE}")
        layout = qt.QVBoxLayout(dialog)
        browser = qt.QTextBrowser()
        browser.setOpenExternalLinks(True)
        browser.setHtml(model_card_html(self.MODEL, self._preset()))
        layout.addWidget(browser)
        dialog.resize(640, 520)
        dialog.exec_()

    # ------------------------------------------------------------------ running

    def onApply(self):
        """Start the network in a worker process (returns at once)."""
        import LesionSeg
        if self.poller is not None:
            return
        editor = self.scriptedEffect.parameterSetNode()
        volume = editor.GetSourceVolumeNode() if editor else None
        segmentation = editor.GetSegmentationNode() if editor else None
        if volume is None or segmentation is None:
            slicer.util.errorDisplay("Select a segmentation and a source volume first.")
            return
        if not LesionSeg.ensureTorch():
            return
        options = self._options()
        options.pop("classes")
        try:
            run = sharedLogic().startSegmentJob(volume, segmentation, selectedSegmentId=editor.GetSelectedSegmentID(),
                                                allowRandomWeights=getattr(self, "allowRandomWeights", False),
                                                **options)
        except Exception as e:
            slicer.util.errorDisplay(str(e))
            return
        self.w.progressBar.value = 0
        self.w.progressBar.visible = True
        self.w.statusLabel.text = "starting"
        self.poller = LesionSeg.JobPoller(run, self._progress, self._finished)
        self.updateGUIFromMRML()

    def _progress(self, fraction, message):
        self.w.progressBar.value = int(round(fraction * 100))
        self.w.statusLabel.text = message

    def onCancel(self):
        if self.poller is not None:
            self.poller.cancel()
            self.w.statusLabel.text = "cancelling…"

    def isRunning(self):
        return self.poller is not None

    def _finished(self, run):
        """Main thread: write the result into the nodes of the Apply through the modifier
        labelmap (masking, undo), or report why nothing was written."""
        from LesionSegLib.slicer import bridge
        self.poller = None
        self.w.progressBar.visible = False
        effect = self.scriptedEffect

        def writer(segmentationNode, segmentId, mask, volumeNode):
            labelmap = bridge.mask_labelmap(mask, volumeNode, segmentationNode)
            modifier = effect.defaultModifierLabelmap()
            modifier.DeepCopy(bridge.resample_to(labelmap, modifier))
            effect.modifySegmentByLabelmap(segmentationNode, segmentId, modifier,
                                           slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

        try:
            with slicer.util.WaitCursor():
                segmentation = sharedLogic().finishSegmentJob(
                    run, editorNode=effect.parameterSetNode(), writer=writer,
                    saveStateForUndo=effect.saveStateForUndo, classes=self._options()["classes"])
            if segmentation is None:
                self.w.statusLabel.text = "Cancelled: the segmentation was not changed."
                return
            prediction = sharedLogic().lastPrediction
            classes = list(prediction.classes)
            if run.selectedSegmentId is None and len(classes) == 1:
                from LesionSegLib.slicer import bridge as b
                sid = b.find_class_segment(segmentation, classes[0], self.MODEL)
                if sid:
                    effect.parameterSetNode().SetSelectedSegmentID(sid)
            n = sum(int(m.sum()) for m in prediction.masks.values())
            self.w.statusLabel.text = f"Done: {n} voxels in {len(classes)} segment(s)."
        except Exception as e:
            self.w.statusLabel.text = "Failed: the segmentation was not changed."
            slicer.util.errorDisplay(f"{self.TITLE}: {e}")
        finally:
            self.updateGUIFromMRML()

    def waitForCompletion(self, timeout_s=600):
        """For scripts and the self-test: process events until the run has finished."""
        import time
        start = time.time()
        while self.poller is not None and time.time() - start < timeout_s:
            slicer.app.processEvents()
            time.sleep(0.02)
        return self.poller is None

    def deactivate(self):
        # switching to another effect stops a run: its result would have nowhere to go
        # (the C++ effect does its own deactivation; the Python base class has no deactivate)
        self.onCancel()

    def cleanup(self):
        if self.poller is not None:
            self.poller.stop()
            self.poller.cancel()
            self.poller = None
        AbstractScriptedSegmentEditorEffect.cleanup(self)
