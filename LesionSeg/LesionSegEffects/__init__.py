"""LesionSeg's Segment Editor effects, one per network.

``qSlicerSegmentEditorScriptedEffect.setPythonSource`` takes the parent folder name
(``LesionSegEffects``) as the Python module and the file name as the class; it first
looks the class up in ``sys.modules["LesionSegEffects"]``, which is why this package
re-exports every effect class. :func:`registerEffects` is called by the LesionSeg module
at ``startupCompleted``. Nothing here imports torch.
"""
import os

from .AbstractLesionSegEffect import AbstractLesionSegEffect
from .SegmentEditorLesionSegMSENetEffect import SegmentEditorLesionSegMSENetEffect
from .SegmentEditorLesionSegM2SNetEffect import SegmentEditorLesionSegM2SNetEffect
from .SegmentEditorLesionSegLSegEffect import SegmentEditorLesionSegLSegEffect
from .SegmentEditorLesionSegBSNetEffect import SegmentEditorLesionSegBSNetEffect
from .SegmentEditorLesionSegMSLKSegEffect import SegmentEditorLesionSegMSLKSegEffect

__all__ = ["AbstractLesionSegEffect", "SegmentEditorLesionSegMSENetEffect", "SegmentEditorLesionSegM2SNetEffect",
           "SegmentEditorLesionSegLSegEffect", "SegmentEditorLesionSegBSNetEffect",
           "SegmentEditorLesionSegMSLKSegEffect", "EFFECT_CLASSES", "registerEffects"]

#: effect file (= class) names, in the order they appear in the editor (from the one list
#: of the five effects, LesionSegLib.slicer.EFFECTS)
from LesionSegLib.slicer import EFFECTS as _EFFECTS  # noqa: E402

EFFECT_CLASSES = [cls for _model, cls, _name, _title in _EFFECTS]


def registerEffects():
    """Register the five effects with the Segment Editor (idempotent: the factory
    ignores names that are already registered)."""
    import logging
    import traceback

    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    folder = os.path.dirname(os.path.abspath(__file__)).replace("\\", "/")
    for name in EFFECT_CLASSES:
        try:
            instance = effects.qSlicerSegmentEditorScriptedEffect(None)
            instance.setPythonSource(f"{folder}/{name}.py")
            instance.self().register()
        except Exception:
            logging.error(f"LesionSeg: could not register effect {name}:\n{traceback.format_exc()}")
