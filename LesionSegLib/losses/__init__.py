"""Training losses of the LesionSeg networks, as their sources define them.

>>> from LesionSegLib.losses import build_loss
>>> loss_fn = build_loss("m2snet", bce_reduction_quirk=False)   # doctest: +SKIP
>>> loss = loss_fn(net(batch["image"]), batch)                  # doctest: +SKIP
>>> loss_fn.last_components                                     # doctest: +SKIP
{'structure': 0.93, 'wbce': 0.61, 'wiou': 0.32, 'lossnet': 0.41, 'total': 0.97}

Modules: :mod:`.composite` (``build_loss`` and one loss class per recipe),
:mod:`.structure` (structure loss, weighted BCE/IoU, morphological edges),
:mod:`.lossnet` (M2SNet's frozen-VGG perceptual loss), :mod:`.binloss` (L-Seg's
multi-channel bin loss), :mod:`.dice` (BCE/CE + soft Dice).

Importing this package does not import torch (Slicer imports LesionSegLib at
startup); the names below load their module on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_loss": "composite", "loss_class": "composite", "SegmentationLoss": "composite",
    "M2SNetLoss": "composite", "BSNetLoss": "composite", "LSegLoss": "composite", "DiceCELoss": "composite",
    "structure_loss": "structure", "boundary_weight": "structure", "morphological_edge": "structure",
    "LossNet": "lossnet", "UntrainedLossNetWarning": "lossnet", "find_vgg16_weights": "lossnet",
    "vgg16_search_paths": "lossnet", "cache_dir": "lossnet",
    "multi_channel_bin_loss": "binloss", "bin_selection": "binloss", "probability_bin": "binloss",
    "bce_dice_loss": "dice", "ce_dice_loss": "dice", "soft_dice": "dice",
}

__all__ = list(_EXPORTS)  # the lazily loaded names


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
