"""Segment Editor effect "LesionSeg MSE-Net": the MSE-Net network (stroke lesions on T1/DWI MRI).
All behaviour is in AbstractLesionSegEffect; this file only names the network
(its effect name and title are in LesionSegLib.slicer.EFFECTS)."""
import qSlicerSegmentationsEditorEffectsPythonQt as effects

from .AbstractLesionSegEffect import AbstractLesionSegEffect


class SegmentEditorLesionSegMSENetEffect(AbstractLesionSegEffect):
    def clone(self):
        # the editor widget clones registered effects; the class is found again by file name
        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned
