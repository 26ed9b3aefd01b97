"""Which network, card, preset and weights a run uses: the one answer for ``lesionseg
predict``, the :class:`~LesionSegLib.inference.Predictor`, ONNX export and the Slicer logic.

1. :func:`choose_weights` — the weight file: the one the user named (a path or an
   installed entry's id), else the newest installed weights of the network and preset,
   else the weights shipped with LesionSeg (:func:`LesionSegLib.weights.find`); random
   weights only when asked for. :class:`NoWeightsError` says what can be done.
2. :func:`load_network` — any accepted source (a network, a checkpoint, a weight file,
   an exported ``.onnx`` file, a registry name) → :class:`LoadedNetwork`.
3. :func:`network_card` — the card with the preset in use (the checkpoint's own preset
   unless another is asked for); its ``outputs`` read through
   :class:`LesionSegLib.models.Outputs`.

Importing this module does not import torch (the Slicer module imports it at startup).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from . import models
from .weights import WeightsError

log = logging.getLogger("LesionSeg")

#: suffixes taken for weight files when a string could also be a registry name
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".tar")


class NoWeightsError(WeightsError):
    """Neither named, installed nor shipped weights for a network and preset."""


@dataclass(frozen=True)
class WeightsChoice:
    """The weights a run uses. ``path`` None: random initialisation."""
    path: Optional[str]
    kind: str  # "file", "installed", "release" (shipped with LesionSeg) or "random"
    preset: Optional[str] = None  # the preset the weights were trained for, when recorded

    @property
    def description(self) -> str:
        what = {"file": "the weight file", "installed": "the installed weights",
                "release": "the shipped weights"}.get(self.kind)
        if what is None:
            return "random weights"
        return f"{what} {self.path}" + (f" ({self.preset})" if self.preset else "")

    def source(self, model: Optional[str], preset: Optional[str] = None):
        """What the Predictor and ONNX export take: a loaded checkpoint (checked to hold
        ``model`` when given), the path of an exported ``.onnx`` graph, or a random network."""
        if self.path is None:
            return models.create(model, preset=preset)
        if self.path.lower().endswith(".onnx"):
            return self.path
        from .checkpoint import load
        return load(self.path, model=model, preset=preset or self.preset)


RANDOM_WEIGHTS = WeightsChoice(None, "random")


def choose_weights(model: Optional[str], preset: Optional[str] = None, checkpoint=None, *,
                   allow_random: bool = False) -> WeightsChoice:
    """The weights for ``model``/``preset``: ``checkpoint`` (a file, or an installed
    entry's id) when given, else installed, else shipped weights; else random weights when
    ``allow_random``, else :class:`NoWeightsError`. A shipped file is checked against its
    SHA-256 first (:class:`WeightsError` when it does not match)."""
    from . import weights
    if checkpoint:
        path = Path(str(checkpoint)).expanduser()
        if path.is_file():
            return WeightsChoice(str(path), "file")
        looks_like_a_path = any(c in str(checkpoint) for c in "/\\") or str(checkpoint).lower().endswith(WEIGHT_SUFFIXES)
        try:
            entry = weights.get(str(checkpoint))
        except WeightsError:
            if looks_like_a_path:
                raise WeightsError(f"no such checkpoint file: {checkpoint}") from None
            raise WeightsError(f"checkpoint {checkpoint!r} is neither a file nor installed weights") from None
        return WeightsChoice(entry.path, "installed", entry.preset)
    if not model:
        raise WeightsError("give a checkpoint (trained weights) or a network name")
    entry = weights.find(model, preset)
    if entry is not None:
        return WeightsChoice(entry.path, "release" if entry.kind == "release" else "installed", entry.preset)
    if preset is not None:
        from . import models
        models.preset(model, preset)  # a misspelt preset is named as such, not as "no weights"
    if allow_random:
        return RANDOM_WEIGHTS
    from .releases import no_weights_message
    raise NoWeightsError(no_weights_message(model, preset))


@dataclass
class LoadedNetwork:
    """``model`` is None for an ``.onnx`` file (``name`` and ``card`` then come from its
    metadata, read by the onnxruntime runner's module)."""
    model: Any  # torch.nn.Module, or None
    name: Optional[str]
    card: Optional[Dict[str, Any]]
    config: Optional[Dict[str, Any]]
    provenance: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def is_onnx_file(self) -> bool:
        return self.name is None


def load_network(source, preset: Optional[str] = None) -> LoadedNetwork:
    """The network of ``source`` with its stored card, config and provenance (the
    checkpoint's file name recorded under ``"checkpoint"``)."""
    import torch.nn as nn

    from .checkpoint import Checkpoint, CheckpointError, load
    if isinstance(source, Checkpoint):
        ck = source
    elif isinstance(source, nn.Module):
        name = getattr(source, "lesionseg_name", None)
        if name is None:
            raise CheckpointError("the network was not built by LesionSegLib.models.create; pass a "
                                  "checkpoint, a weight file or a registry name instead")
        return LoadedNetwork(source, name, None, getattr(source, "lesionseg_config", None), {},
                             f"{name} (in-memory network)")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            if path.suffix == ".onnx":
                return LoadedNetwork(None, None, None, None, {}, str(path))
            ck = load(path)
        elif isinstance(source, str) and os.sep not in source and "/" not in source \
                and not source.lower().endswith(WEIGHT_SUFFIXES):
            name = models.registry_name(source)
            p_cfg = models.preset(name, preset).get("config", {}) if preset else {}
            net = models.create(name, preset=preset)
            log.warning("%s: no weights given, the network has random weights (pipeline tests only)", name)
            return LoadedNetwork(net, name, None, models.config(name, **p_cfg),
                                 {"weights": "random initialisation (no checkpoint given)"}, f"{name} (random weights)")
        else:
            raise CheckpointError(f"no such checkpoint file: {source}")
    else:
        raise TypeError(f"cannot make a predictor from {type(source).__name__}; pass a network, "
                        f"a Checkpoint, a weight file path or a registry name")
    if ck.kind == "backbone":
        raise CheckpointError(f"{ck.path}: an ImageNet backbone ({ck.name}), not a segmentation network")
    provenance = dict(ck.provenance or {})
    card = ck.card
    if ck.path:
        provenance.setdefault("checkpoint", Path(ck.path).name)
        from .releases import shipped_entry, with_release_outputs
        entry = shipped_entry(ck.path)
        card = with_release_outputs(card, entry)
        if entry and entry.get("outputs"):
            provenance["release_outputs"] = entry["outputs"]
        if entry and entry.get("precision_agreement"):
            # measured after the file was committed, or again on another CPU
            provenance["precision_agreement"] = entry["precision_agreement"]
    return LoadedNetwork(ck.model, ck.name, card, ck.config, provenance, str(ck.path or ck.name))


def network_card(name: str, stored_card: Optional[Dict[str, Any]], preset: Optional[str],
                 provenance: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The card with ``input``/``classes``/``outputs`` of the preset in use, and
    ``card["preset"]`` = that preset. A checkpoint's stored preset (what the network was
    trained with) wins unless another preset is asked for explicitly."""
    base = models.card(name)
    if stored_card:
        base.update(copy.deepcopy(stored_card))
    stored = base.get("preset") if isinstance(base.get("preset"), dict) else None
    if stored is not None and (preset is None or preset == stored.get("name")):
        chosen = stored
    else:
        if stored is not None:
            log.warning("the checkpoint was trained with preset %r; using preset %r as asked",
                        stored.get("name"), preset)
        from_prov = (provenance or {}).get("preset")
        chosen = models.preset(name, preset or (from_prov if isinstance(from_prov, str) else None))
    merged = dict(base)
    merged.update(input=dict(chosen["input"]), classes=list(chosen["classes"]), outputs=dict(chosen["outputs"]),
                  preset=chosen)
    return merged
