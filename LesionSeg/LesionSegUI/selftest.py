"""Self-test methods of the LesionSeg module, mixed into ``LesionSeg.LesionSegTest``
(Slicer's Self Tests module, or ctest ``py_LesionSeg``)."""
import os
import unittest

import slicer

from LesionSegLib.slicer import torchsupport


def _module():
    import LesionSeg
    return LesionSeg


class EffectsSelfTest:
    """The test methods of ``LesionSeg.LesionSegTest`` (mixed into it there)."""

    from LesionSegLib.slicer import EFFECTS as _EFFECTS
    EFFECTS = tuple((name, model) for model, _cls, name, _title in _EFFECTS)

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def requireTorch(self):
        """Every test that runs a network starts with this: ctest calls test_* methods
        directly (never runTest), so the guard must be in each of them."""
        if not _module().torchAvailable():
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
        _module().registerEffects()   # idempotent
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
        logic = _module().LesionSegLogic()
        path = self._random_checkpoint("msenet", folder)
        seg = logic.segment(volume, model="msenet", checkpoint=path, probabilityVolume=True)
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)
        segment = seg.GetSegmentation().GetNthSegment(0)
        cls = logic.modelCard("msenet")["classes"][0]
        self.assertEqual(segment.GetName(), cls["name"])
        self.assertEqual(len(logic.lastProbabilityVolumes), 1)
        self.assertTrue(np.allclose(bridge.ijk_to_ras(logic.lastProbabilityVolumes[0]), bridge.ijk_to_ras(volume)))
