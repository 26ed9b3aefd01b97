"""The Training and Weights sections of the LesionSeg panel, mixed into
``LesionSeg.LesionSegWidget`` (which provides ``self.ui``, ``self.logic``, ``startJob``,
``model``, ``preset``, ``fillWeightsCombo`` and ``updateButtons``)."""
import os

import qt
import slicer


def _module():
    import LesionSeg
    return LesionSeg


class TrainingPanel:
    """Training pairs from the scene, and a training job in a worker process."""

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
        if not _module().ensureTorch():
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


class WeightsPanel:
    """Installed weights (table, import, remove, download, cache) and PyTorch's status."""

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
        entry = _module().importWeightsDialog(self.parent, self.model(), self.preset())
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
        if not _module().ensureTorch():   # the downloaded file is checked by loading it
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
        ok = _module().torchAvailable()
        self.ui.torchStatusLabel.text = "installed" if ok else "not installed"
        self.ui.installTorchButton.enabled = not ok

    def onInstallTorch(self):
        _module().ensureTorch()
        self.updateTorchStatus()
