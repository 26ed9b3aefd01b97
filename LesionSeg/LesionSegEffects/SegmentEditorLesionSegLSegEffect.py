"""Segment Editor effect "LesionSeg L-Seg": the L-Seg network (exudates, haemorrhages, microaneurysms and soft exudates in fundus photographs (four segments)).
All behaviour is in AbstractLesionSegEffect; this file only names the network
(its effect name and title are in LesionSegLib.slicer.EFFECTS)."""
import qSlicerSegmentationsEditorEffectsPythonQt as effects

from .AbstractLesionSegEffect import AbstractLesionSegEffect


class SegmentEditorLesionSegLSegEffect(AbstractLesionSegEffect):
    def clone(self):
        # the editor widget clones registered effects; the class is found again by file name
        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned
