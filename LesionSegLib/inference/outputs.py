"""From probabilities to labels, masks and the lesion table: the output rules of a
card (:class:`OutputRules`), shared by every runner and by volumes and images, and
what a prediction returns (:class:`Prediction`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import models
from ..preprocessing import InputError
from ..jobs import Progress
from .postprocess import lesion_table, remove_small_lesions, remove_unseeded_lesions


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict_volume` / :meth:`Predictor.predict_image`.

    ``labels``: uint8 label map on the input grid (a ``SimpleITK.Image`` for volumes, a
    numpy (H, W) array for images): 0 background, else a class ``value``; where classes
    of a multi-label network overlap, the most probable one. ``masks``: {class value:
    bool array (z, y, x) / (H, W)}, overlapping for multi-label networks (L-Seg).
    ``probabilities``: None, or float32 (C, z, y, x) / (C, H, W), one map per class in
    ``classes`` order. ``lesions``: rows of :func:`~.postprocess.lesion_table` for all
    classes. ``info``: how the run went (device, precision, batch size, orientation,
    seconds …).
    """
    labels: Any
    masks: Dict[int, np.ndarray]
    probabilities: Optional[np.ndarray]
    classes: List[Dict[str, Any]]
    lesions: List[Dict[str, Any]]
    info: Dict[str, Any] = field(default_factory=dict)


class OutputRules:
    """The card's ``outputs`` and ``classes`` of one network: activation, threshold,
    channels, and the class value of each channel (checked against each other)."""

    def __init__(self, name: str, preset: Optional[str], outputs: Dict[str, Any], classes: List[Dict[str, Any]],
                 device: torch.device) -> None:
        self.name, self.preset, self.classes = name, preset, classes
        spec = models.Outputs.of(outputs)
        self.activation = spec.activation
        if self.activation not in ("sigmoid", "softmax"):
            raise InputError(f"{name}: unsupported output activation {self.activation!r}")
        self.threshold = spec.threshold
        self.seed_threshold = spec.seed_threshold
        n_cls = len(classes)
        self.channels = spec.channels_for(n_cls)
        expected = n_cls + 1 if self.activation == "softmax" else n_cls
        if self.channels != expected:
            raise InputError(f"{name}: preset {preset!r} lists {n_cls} class(es) but the network has "
                             f"{self.channels} {self.activation} output channel(s) (expected {expected})")
        self.multi_label = self.activation == "sigmoid" and n_cls > 1
        self.values = [int(c["value"]) for c in classes]
        if any(not 0 < v < 256 for v in self.values) or len(set(self.values)) != len(self.values):
            raise InputError(f"{name}: class values must be distinct numbers 1…255, got {self.values}")
        lut = ([0] + self.values) if self.activation == "softmax" else self.values
        self._lut = torch.tensor(lut, dtype=torch.uint8, device=device)

    def decision(self, threshold: Optional[float] = None,
                 seed_threshold: Optional[float] = None) -> Tuple[float, Optional[float]]:
        """(threshold, seed threshold or None) of a run: the card's (or the weights'
        rules) unless given; :func:`LesionSegLib.validation.threshold_pair`."""
        from ..validation import OptionError, threshold_pair
        try:
            return threshold_pair(threshold, seed_threshold, self.threshold, self.seed_threshold)
        except OptionError as e:
            raise InputError(str(e)) from None

    def check(self, logits: torch.Tensor) -> None:
        if logits.shape[1] != self.channels:
            raise InputError(f"{self.name}: the network produced {logits.shape[1]} output channel(s), "
                             f"preset {self.preset!r} expects {self.channels}")

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)

    def decide(self, probs: torch.Tensor, threshold: float, keep_probs: bool,
               seed_threshold: Optional[float] = None) -> Dict[str, Optional[torch.Tensor]]:
        """Labels (B, …) uint8, multi-label masks (K, B, …), class probabilities (C, B, …)
        and, with ``seed_threshold``, the seeds of hysteresis (C, B, …) bool, on the device."""
        masks = None
        if self.activation == "softmax":
            labels = self._lut[probs.argmax(1)]
            class_probs = probs[:, 1:]
        elif not self.multi_label:
            labels = (probs[:, 0] > threshold).to(torch.uint8) * self._lut[0]
            class_probs = probs
        else:
            above = probs > threshold
            best = probs.masked_fill(~above, -1.0).argmax(1)
            labels = torch.where(above.any(1), self._lut[best], torch.zeros((), dtype=torch.uint8,
                                                                             device=probs.device))
            masks = above.transpose(0, 1)
            class_probs = probs
        seeds = (class_probs >= seed_threshold).transpose(0, 1) if seed_threshold else None
        return {"labels": labels, "masks": masks, "seeds": seeds,
                "probs": class_probs.transpose(0, 1).float() if keep_probs else None}

    def postprocess(self, labels: np.ndarray, ml_masks: Optional[np.ndarray], spacing, min_size: float,
                    prog: Progress, *, seeds: Optional[np.ndarray] = None, origin=None, direction=None,
                    slice_axis: int = 0, levels=None):
        """(class value → mask, lesion rows): lesions without a seed (``seeds``: (C, …)
        bool, hysteresis) and lesions below ``min_size`` removed (from ``labels`` too),
        then the lesion table of every class."""
        values = self.values
        masks: Dict[int, np.ndarray] = {}
        removed_any = False
        for i, v in enumerate(values):
            prog.check()
            m = ml_masks[i] if ml_masks is not None else labels == v
            removed = remove_unseeded_lesions(m, seeds[i]) if seeds is not None else 0
            if min_size and min_size > 0:
                removed += remove_small_lesions(m, spacing, min_size)
            if removed:
                removed_any = True
                if ml_masks is None:
                    labels[(labels == v) & ~m] = 0
            masks[v] = m
            prog((i + 0.5) / (2 * len(values)), "removing small lesions")
        if removed_any and ml_masks is not None:
            # a voxel whose chosen class was removed falls back to another class still
            # present there (lowest value first: probabilities are not kept), else background
            for v in values:
                stale = (labels == v) & ~masks[v]
                if stale.any():
                    labels[stale] = 0
                    for u in values:
                        fill = stale & masks[u] & (labels == 0)
                        labels[fill] = u
        lesions: List[Dict[str, Any]] = []
        for i, v in enumerate(values):
            prog.check()
            lesions += lesion_table(masks[v], spacing, v, levels, origin=origin, direction=direction,
                                    slice_axis=slice_axis)
            prog(0.5 + (i + 1) / (2 * len(values)), "lesion table")
        return masks, lesions
