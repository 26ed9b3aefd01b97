"""Fast, geometry-exact inference of LesionSeg networks on volumes and images.

>>> from LesionSegLib.inference import Predictor, CancelToken
>>> p = Predictor("model.lesionseg.pt")                     # doctest: +SKIP
>>> pred = p.predict_volume(sitk.ReadImage("ct.nii.gz"))   # doctest: +SKIP
>>> pred.labels, pred.lesions                              # doctest: +SKIP

The package does not import torch until :class:`Predictor` is first used, so that
Slicer and the command line can import it at start-up; :mod:`LesionSegLib.jobs`,
:mod:`.geometry`, :mod:`.tiling` and :mod:`.postprocess` need only numpy/SimpleITK.
"""
from __future__ import annotations

from ..jobs import CancelToken, Cancelled, Progress
from .postprocess import lesion_table, remove_small_lesions

__all__ = ["Predictor", "Prediction", "CancelToken", "Cancelled", "Progress", "lesion_table",
           "remove_small_lesions"]


def __getattr__(name):  # lazy: importing torch takes seconds
    if name in ("Predictor", "Prediction"):
        from . import predictor
        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
