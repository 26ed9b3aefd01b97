"""Test of the LesionSeg module panel in the real Slicer application (ctest
``py_LesionSegWidgetTest``): the panel loads, lists networks and presets, shows model
cards, lists imported weights, and segments a volume in a worker process. Each test that runs a
network checks for torch itself: ctest calls the test_* methods directly."""
import os
import tempfile
import time

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class LesionSegWidgetTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        import unittest
        for test in (self.test_panel, self.test_panel_segments):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as e:
                self.delayDisplay(str(e))

    def _wait(self, widget, timeout_s=600):
        start = time.time()
        while widget.job is not None and time.time() - start < timeout_s:
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertIsNone(widget.job, "the background job did not finish")

    def test_panel(self):
        import LesionSeg
        slicer.util.selectModule("LesionSeg")
        widget = slicer.modules.lesionseg.widgetRepresentation().self()
        ui = widget.ui
        models = [ui.modelComboBox.itemData(i) for i in range(ui.modelComboBox.count)]
        for name in ("msenet", "m2snet", "lseg", "bsnet", "mslkseg"):
            self.assertIn(name, models)
        ui.modelComboBox.setCurrentIndex(models.index("lseg"))
        self.assertIn("Microaneurysm", ui.modelCardBrowser.toPlainText())
        self.assertIn(str(widget.logic.weightsCacheDir()), ui.cacheDirLabel.text)
        # one logic for the panel, the effects and getModuleLogic
        self.assertIs(widget.logic, LesionSeg.sharedLogic())
        # colour photographs (vector volumes) can be chosen as input
        self.assertIn("vtkMRMLVectorVolumeNode", list(ui.inputVolumeSelector.nodeTypes))

    def test_panel_segments(self):
        import LesionSeg
        if not LesionSeg.torchAvailable():
            self.skipTest("PyTorch is not installed: skipping the panel's segmentation test")
        slicer.util.selectModule("LesionSeg")
        widget = slicer.modules.lesionseg.widgetRepresentation().self()
        ui = widget.ui
        models = [ui.modelComboBox.itemData(i) for i in range(ui.modelComboBox.count)]

        # weights: a random-weight MSE-Net checkpoint, imported the way a user does it
        os.environ.setdefault("LESIONSEG_CACHE", tempfile.mkdtemp(prefix="LesionSegCache"))
        from LesionSegLib import checkpoint
        from LesionSegLib import models as registry
        path = os.path.join(tempfile.mkdtemp(prefix="LesionSegTest"), "msenet-random.pt")
        checkpoint.save(path, registry.create("msenet"), preset="atlas-t1")
        entry = widget.logic.importCheckpoint(path)
        widget.refreshWeights()
        ids = [ui.weightsTable.item(r, 0).data(qt.Qt.UserRole) for r in range(ui.weightsTable.rowCount)]
        self.assertIn(entry.id, ids)

        # segment through the panel: worker process, then results on the main thread
        test = LesionSeg.LesionSegTest()
        volume, _ = test._volume(size=(64, 64, 3))
        ui.inputVolumeSelector.setCurrentNode(volume)
        ui.modelComboBox.setCurrentIndex(models.index("msenet"))
        ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findData("atlas-t1"))
        ui.weightsComboBox.setCurrentIndex(ui.weightsComboBox.findData(entry.id))
        widget.onSegment()
        self._wait(widget)
        segmentation = ui.outputSegmentationSelector.currentNode()
        self.assertIsNotNone(segmentation)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(segmentation.GetAttribute("LesionSeg.model"), "msenet")
        widget.logic.removeWeights(entry.id)
        self.delayDisplay("LesionSeg panel test passed")
