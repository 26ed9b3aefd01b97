"""Segment Editor effect "LesionSeg M2SNet": the M2SNet network (polyps, COVID-19 lung infection, breast lesions).
All behaviour is in AbstractLesionSegEffect; this file only names the network
(its effect name and title are in LesionSegLib.slicer.EFFECTS)."""
import qSlicerSegmentationsEditorEffectsPythonQt as effects

from .AbstractLesionSegEffect import AbstractLesionSegEffect


class SegmentEditorLesionSegM2SNetEffect(AbstractLesionSegEffect):
    def clone(self):
        # the editor widget clones registered effects; the class is found again by file name
        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned
