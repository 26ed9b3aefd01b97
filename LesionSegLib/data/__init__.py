"""Training data: 2D image/mask folders, 3D volumes, in-memory cases, case-level splits.

>>> from LesionSegLib.data import folder_pairs, case_split
>>> pairs = folder_pairs("covid-semiseg/train")            # doctest: +SKIP
>>> train, val = case_split(pairs, val_fraction=0.2)       # doctest: +SKIP

Modules: :mod:`.folders` (2D layouts, pairing, case ids), :mod:`.volumes` (3D pairs,
canonical orientation), :mod:`.splits` (case split, k-fold), :mod:`.images` (reading
images and masks), :mod:`.dataset` (tensors, augmentation, epoch sampler; imports torch).
Importing this package does not import torch.
"""
from __future__ import annotations

import importlib

from .errors import DataError
from .folders import ImagePair, case_ids, detect_layout, folder_pairs
from .splits import case_split, kfold_splits
from .volumes import VolumeCase, VolumePair, load_case, volume_pairs

_LAZY = {"SegmentationDataset": "dataset", "FolderSource": "sources", "VolumeSource": "sources",
         "EpochBatchSampler": "dataset", "TargetSpec": "sources", "target_spec": "sources", "warp": "dataset",
         "read_image": "images", "read_mask": "images", "derive_edge": "images", "mask_to_label": "images"}

__all__ = ["DataError", "ImagePair", "VolumeCase", "VolumePair", "case_ids", "case_split", "detect_layout",
           "folder_pairs", "kfold_splits", "load_case", "volume_pairs", *sorted(_LAZY)]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
