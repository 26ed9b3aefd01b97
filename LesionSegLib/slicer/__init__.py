"""The Slicer-facing part of LesionSegLib, in one package:

* :mod:`.logic` — ``LesionSegLogic``, what the module panel, the Segment Editor effects
  and the Python console call (Qt-free), with its parts :mod:`.logic_weights`,
  :mod:`.logic_jobs` (worker jobs), :mod:`.logic_batch` (files) and :mod:`.logic_training`;
* :mod:`.bridge` — MRML nodes ⇄ numpy / SimpleITK, segments, terminology, editor writes;
* :mod:`.segnrrd` — Slicer ``.seg.nrrd`` files without Slicer;
* :mod:`.worker` — the worker process that runs networks, batches and training outside
  Slicer's process; :mod:`.worker_job` — the job object the GUI polls.

Nothing here imports ``slicer``, torch or Qt at import time: Slicer loads it at startup.
"""
from __future__ import annotations

#: the five published networks, one Segment Editor effect each, in editor order:
#: (registry name, effect class = file name, effect name, title)
EFFECTS = (
    ("msenet", "SegmentEditorLesionSegMSENetEffect", "LesionSeg MSE-Net", "MSE-Net"),
    ("m2snet", "SegmentEditorLesionSegM2SNetEffect", "LesionSeg M2SNet", "M2SNet"),
    ("lseg", "SegmentEditorLesionSegLSegEffect", "LesionSeg L-Seg", "L-Seg"),
    ("bsnet", "SegmentEditorLesionSegBSNetEffect", "LesionSeg BSNet", "BSNet"),
    ("mslkseg", "SegmentEditorLesionSegMSLKSegEffect", "LesionSeg MS-LKSeg", "MS-LKSeg"),
)
EFFECT_MODELS = tuple(e[0] for e in EFFECTS)


def effect_for_class(class_name: str):
    """(model, effect name, title) of an effect class name."""
    for model, cls, name, title in EFFECTS:
        if cls == class_name:
            return model, name, title
    raise KeyError(f"{class_name} is not a LesionSeg effect; the effects are {[e[1] for e in EFFECTS]}")
