"""Base class of the five LesionSeg Segment Editor effects (one per network).

The effects are thin: options are stored on the segment editor node (saved with the
scene), and all work goes through ``LesionSegLib.slicer.logic.LesionSegLogic``:

1. Apply: ``saveStateForUndo()``, the source volume is copied out of MRML on the main
   thread (``logic.inputImage``);
2. the network runs on a worker thread (``BackgroundJob`` → ``logic.predict``), with a
   progress bar and Cancel; the GUI stays responsive (torch releases the GIL);
3. back on the main thread, ``logic.writePrediction`` writes each class through the
   effect's modifier labelmap with ``modifySegmentByLabelmap``, so the editor's masking
   settings (editable area, editable intensity range, overwrite of other segments)
   apply; Undo restores the previous state. Single-class networks write into the
   selected segment (a new, named segment when none is selected); multi-class networks
   (L-Seg) write named, coloured, terminology-coded segments.

A cancelled or failing run writes nothing. torch is never imported at file scope.
"""
import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

_HERE = os.path.dirname(os.path.abspath(__file__))
_UI = os.path.join(_HERE, "..", "Resources", "UI", "LesionSegEffect.ui")
_ICONS = os.path.join(_HERE, "..", "Resources", "Icons")
POLL_MS = 100

# one logic for all effect instances: the editor clones effects per widget, and a loaded
# network (hundreds of MB) must not be duplicated per clone
_shared_logic = None


def sharedLogic():
    global _shared_logic
    if _shared_logic is None:
        from LesionSegLib.slicer.logic import LesionSegLogic
        _shared_logic = LesionSegLogic(scene=slicer.mrmlScene)
    return _shared_logic


class AbstractLesionSegEffect(AbstractScriptedSegmentEditorEffect):
    """Subclasses set MODEL (registry name), EFFECT_NAME, TITLE and __file__-based clone()."""

    MODEL = ""
    EFFECT_NAME = ""
    TITLE = ""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = self.EFFECT_NAME
        scriptedEffect.title = self.TITLE
        # multi-class networks write several segments; single-class ones choose the
        # selected segment themselves (or create one), so no segment is required
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.job = None
        self.timer = None
        self.ui = None
        self._running = None

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
        from LesionSegLib import models
        card = models.card(self.MODEL)
        self.scriptedEffect.setParameterDefault("Preset", card.get("default_preset", ""))
        self.scriptedEffect.setParameterDefault("Checkpoint", "")
        self.scriptedEffect.setParameterDefault("Device", "auto")
        self.scriptedEffect.setParameterDefault("UseCardThreshold", 1)
        self.scriptedEffect.setParameterDefault("Threshold", float(card["outputs"].get("threshold", 0.5)))
        self.scriptedEffect.setParameterDefault("TTA", 0)
        self.scriptedEffect.setParameterDefault("ProbabilityMap", 0)
        self.scriptedEffect.setParameterDefault("Segments", "")   # empty: all classes

    def _preset(self):
        return self.scriptedEffect.parameter("Preset") or None

    def fillWeights(self):
        logic = sharedLogic()
        combo = self.w.weightsComboBox
        blocked = combo.blockSignals(True)
        combo.clear()
        entries = [e for e in logic.installedWeights(self.MODEL)
                   if e.preset in (None, self._preset())] if self.scriptedEffect.parameterSetNode() else []
        combo.addItem("newest installed" if entries else "(no weights installed)", "")
        for e in entries:
            combo.addItem(e.label, e.id)
        current = self.scriptedEffect.parameter("Checkpoint") if self.scriptedEffect.parameterSetNode() else ""
        if current and combo.findData(current) < 0:
            combo.addItem(os.path.basename(current), current)   # a file chosen earlier, kept in the scene
        combo.setCurrentIndex(max(0, combo.findData(current)))
        combo.blockSignals(blocked)

    def fillSegments(self):
        from LesionSegLib.slicer.logic import LesionSegLogic
        lst = self.w.segmentsListWidget
        blocked = lst.blockSignals(True)
        lst.clear()
        preset = self._preset() if self.scriptedEffect.parameterSetNode() else None
        chosen = self._chosen_classes()
        for cls in LesionSegLogic.modelCard(self.MODEL, preset)["classes"]:
            item = qt.QListWidgetItem(cls["name"])
            item.setData(qt.Qt.UserRole, int(cls["value"]))
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if chosen is None or int(cls["value"]) in chosen else qt.Qt.Unchecked)
            color = cls.get("color", [128, 128, 128])
            item.setForeground(qt.QBrush(qt.QColor(*color)))
            lst.addItem(item)
        lst.blockSignals(blocked)

    def _chosen_classes(self):
        if not self.scriptedEffect.parameterSetNode():
            return None
        text = self.scriptedEffect.parameter("Segments")
        return None if not text else [int(v) for v in text.split(",") if v.strip()]

    def updateGUIFromMRML(self):
        if self.ui is None or not self.scriptedEffect.parameterSetNode():
            return
        w = self.w
        for widget in (w.presetComboBox, w.deviceComboBox, w.useCardThresholdCheckBox, w.thresholdSliderWidget,
                       w.ttaCheckBox, w.probabilityCheckBox):
            widget.blockSignals(True)
        w.presetComboBox.setCurrentIndex(max(0, w.presetComboBox.findData(self._preset())))
        w.deviceComboBox.setCurrentText(self.scriptedEffect.parameter("Device") or "auto")
        use_card = bool(self.scriptedEffect.integerParameter("UseCardThreshold"))
        w.useCardThresholdCheckBox.setChecked(use_card)
        w.thresholdSliderWidget.enabled = not use_card
        w.thresholdSliderWidget.value = self.scriptedEffect.doubleParameter("Threshold")
        w.ttaCheckBox.setChecked(bool(self.scriptedEffect.integerParameter("TTA")))
        w.probabilityCheckBox.setChecked(bool(self.scriptedEffect.integerParameter("ProbabilityMap")))
        for widget in (w.presetComboBox, w.deviceComboBox, w.useCardThresholdCheckBox, w.thresholdSliderWidget,
                       w.ttaCheckBox, w.probabilityCheckBox):
            widget.blockSignals(False)
        self.fillWeights()
        self.fillSegments()
        running = self.job is not None
        source = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        w.applyButton.enabled = not running and source is not None
        w.applyButton.toolTip = ("Run the network on the source volume" if source is not None
                                 else "Select a source volume first")
        w.cancelButton.enabled = running

    def updateMRMLFromGUI(self, *unused):
        if self.ui is None or not self.scriptedEffect.parameterSetNode():
            return
        w = self.w
        with slicer.util.NodeModify(self.scriptedEffect.parameterSetNode()):
            self.scriptedEffect.setParameter("Preset", w.presetComboBox.currentData or "")
            self.scriptedEffect.setParameter("Checkpoint", w.weightsComboBox.currentData or "")
            self.scriptedEffect.setParameter("Device", w.deviceComboBox.currentText)
            self.scriptedEffect.setParameter("UseCardThreshold", 1 if w.useCardThresholdCheckBox.checked else 0)
            self.scriptedEffect.setParameter("Threshold", float(w.thresholdSliderWidget.value))
            self.scriptedEffect.setParameter("TTA", 1 if w.ttaCheckBox.checked else 0)
            self.scriptedEffect.setParameter("ProbabilityMap", 1 if w.probabilityCheckBox.checked else 0)
            values = [str(w.segmentsListWidget.item(i).data(qt.Qt.UserRole))
                      for i in range(w.segmentsListWidget.count)
                      if w.segmentsListWidget.item(i).checkState() == qt.Qt.Checked]
            everything = len(values) == w.segmentsListWidget.count
            self.scriptedEffect.setParameter("Segments", "" if everything else ",".join(values))

    def onPresetChanged(self, *unused):
        self.updateMRMLFromGUI()
        self.fillWeights()
        self.fillSegments()

    def onImportWeights(self):
        path = qt.QFileDialog.getOpenFileName(self.ui, "Import network weights", "",
                                              "Weights (*.pt *.pth *.ckpt *.safetensors);;All files (*)")
        if not path:
            return
        if not self._ensure_torch():
            return
        try:
            with slicer.util.WaitCursor():
                entry = sharedLogic().importCheckpoint(path, model=self.MODEL, preset=self._preset())
        except Exception as e:
            slicer.util.errorDisplay(f"Could not import {path}:\n{e}")
            return
        self.scriptedEffect.setParameter("Checkpoint", entry.id)
        self.fillWeights()

    def onModelCard(self):
        from LesionSegLib.slicer.logic import LesionSegLogic
        dialog = qt.QDialog(self.ui)
        dialog.setWindowTitle(f"Model card: {self.TITLE}")
        layout = qt.QVBoxLayout(dialog)
        browser = qt.QTextBrowser()
        browser.setOpenExternalLinks(True)
        browser.setHtml(LesionSegLogic.modelCardText(self.MODEL, self._preset()))
        layout.addWidget(browser)
        dialog.resize(640, 520)
        dialog.exec_()

    # ------------------------------------------------------------------ running

    def _ensure_torch(self):
        import LesionSeg
        return LesionSeg.ensureTorch()

    def _options(self):
        p = self.scriptedEffect
        return {
            "model": self.MODEL,
            "checkpoint": p.parameter("Checkpoint") or None,
            "preset": self._preset(),
            "device": p.parameter("Device") or "auto",
            "threshold": None if p.integerParameter("UseCardThreshold") else p.doubleParameter("Threshold"),
            "tta": bool(p.integerParameter("TTA")),
            "probabilities": bool(p.integerParameter("ProbabilityMap")),
        }

    def onApply(self):
        """Start the network on a worker thread (returns at once)."""
        if self.job is not None:
            return
        editor = self.scriptedEffect.parameterSetNode()
        volume = editor.GetSourceVolumeNode() if editor else None
        segmentation = editor.GetSegmentationNode() if editor else None
        if volume is None or segmentation is None:
            slicer.util.errorDisplay("Select a segmentation and a source volume first.")
            return
        if not self._ensure_torch():
            return
        logic = sharedLogic()
        options = self._options()
        try:
            # resolve weights now, on the main thread, so that a missing file is reported at once
            if logic.resolveCheckpoint(self.MODEL, options["checkpoint"], options["preset"]) is None \
                    and not getattr(self, "allowRandomWeights", False):
                raise ValueError("No weights are installed for this network. Import or download weights in "
                                 "the LesionSeg module (Weights section), or train the network there.")
            image = logic.inputImage(volume)
        except Exception as e:
            slicer.util.errorDisplay(str(e))
            return
        from LesionSegLib.slicer.logic import BackgroundJob
        self._running = {"volume": volume, "segmentation": segmentation,
                         "selected": editor.GetSelectedSegmentID(), "options": options}
        self.job = BackgroundJob(logic.predict, image, allowRandomWeights=getattr(self, "allowRandomWeights", False),
                                 **options).start()
        self.w.progressBar.value = 0
        self.w.progressBar.visible = True
        self.w.statusLabel.text = "starting"
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self._poll)
        self.timer.start()
        self.updateGUIFromMRML()

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()
            self.w.statusLabel.text = "cancelling…"

    def isRunning(self):
        return self.job is not None

    def _poll(self):
        job = self.job
        if job is None:
            return
        self.w.progressBar.value = int(round(job.fraction * 100))
        self.w.statusLabel.text = job.message
        if not job.done:
            return
        self.timer.stop()
        self.job = None
        running, self._running = self._running, None
        self.w.progressBar.visible = False
        try:
            if job.cancelled:
                self.w.statusLabel.text = "Cancelled: the segmentation was not changed."
            elif job.error is not None:
                self.w.statusLabel.text = "Failed: the segmentation was not changed."
                slicer.util.errorDisplay(f"{self.TITLE} failed: {job.error}")
            else:
                self._write(job.result, running)
        finally:
            self.updateGUIFromMRML()

    def _write(self, prediction, running):
        """Main thread: write the prediction through the modifier labelmap (masking, undo)."""
        from LesionSegLib.slicer import bridge
        volume, segmentation = running["volume"], running["segmentation"]
        if volume.GetScene() is None or segmentation.GetScene() is None:
            self.w.statusLabel.text = "The volume or segmentation was removed while the network was running."
            return
        logic = sharedLogic()
        options = running["options"]
        chosen = self._chosen_classes()
        segment_ids = None
        classes = list(prediction.classes)
        if len(classes) == 1 and running["selected"] and segmentation.GetSegmentation().GetSegment(running["selected"]):
            segment_ids = {int(classes[0]["value"]): running["selected"]}

        effect = self.scriptedEffect

        def writer(segmentationNode, segmentId, mask, volumeNode):
            labelmap = bridge.mask_labelmap(mask, volumeNode, segmentationNode)
            modifier = effect.defaultModifierLabelmap()
            modifier.DeepCopy(bridge.resample_to(labelmap, modifier))
            effect.modifySegmentByLabelmap(segmentationNode, segmentId, modifier,
                                           slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

        effect.saveStateForUndo()
        try:
            with slicer.util.WaitCursor():
                logic.writePrediction(
                    prediction, volume, segmentation, model=self.MODEL, classes=chosen, segmentIds=segment_ids,
                    probabilityVolume=options["probabilities"], writer=writer,
                    provenance={"model": self.MODEL, "preset": options["preset"] or "",
                                "checkpoint": logic.resolveCheckpoint(self.MODEL, options["checkpoint"],
                                                                      options["preset"]) or "random weights"})
        except Exception as e:
            slicer.util.errorDisplay(f"{self.TITLE}: writing the result failed, the segmentation was restored: {e}")
            return
        if segment_ids is None and len(classes) == 1:
            sid = bridge.find_class_segment(segmentation, classes[0], self.MODEL)
            if sid:
                effect.parameterSetNode().SetSelectedSegmentID(sid)
        n = sum(int(prediction.masks[int(c["value"])].sum()) for c in classes if int(c["value"]) in prediction.masks)
        self.w.statusLabel.text = f"Done: {n} voxels in {len(chosen or classes)} segment(s)."

    def waitForCompletion(self, timeout_s=600):
        """For scripts and the self-test: process events until the run has finished."""
        import time
        start = time.time()
        while self.job is not None and time.time() - start < timeout_s:
            slicer.app.processEvents()
            time.sleep(0.02)
        return self.job is None

    def deactivate(self):
        # switching to another effect stops a run: its result would have nowhere to go
        # (the C++ effect does its own deactivation; the Python base class has no deactivate)
        self.onCancel()

    def cleanup(self):
        if self.timer is not None:
            self.timer.stop()
        if self.job is not None:
            self.job.cancel()
        AbstractScriptedSegmentEditorEffect.cleanup(self)
