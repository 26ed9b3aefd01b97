"""Segment Editor effect "LesionSeg MS-LKSeg": the MS-LKSeg network (general lesions in 2D medical images).
All behaviour is in AbstractLesionSegEffect; this file only names the network
(its effect name and title are in LesionSegLib.slicer.EFFECTS)."""
import qSlicerSegmentationsEditorEffectsPythonQt as effects

from .AbstractLesionSegEffect import AbstractLesionSegEffect


class SegmentEditorLesionSegMSLKSegEffect(AbstractLesionSegEffect):
    def clone(self):
        # the editor widget clones registered effects; the class is found again by file name
        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned
