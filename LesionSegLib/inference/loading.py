"""The Predictor's loading step: any accepted source (a network, a checkpoint, a weight
file, an exported ``.onnx`` file, a registry name) → :class:`LoadedNetwork`, and the
card with the preset in use (:func:`merge_card`)."""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch.nn as nn

from .. import models
from ..checkpoint import Checkpoint, CheckpointError

log = logging.getLogger("LesionSeg")

#: suffixes taken for weight files when a string could also be a registry name
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".tar")


@dataclass
class LoadedNetwork:
    """``model`` is None for an ``.onnx`` file (``name`` and ``card`` then come from its
    metadata, read by the onnxruntime runner's module)."""
    model: Optional[nn.Module]
    name: Optional[str]
    card: Optional[Dict[str, Any]]
    config: Optional[Dict[str, Any]]
    provenance: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def is_onnx_file(self) -> bool:
        return self.name is None


def load_network(source, preset: Optional[str] = None) -> LoadedNetwork:
    """The network of ``source`` with its stored card, config and provenance."""
    from ..checkpoint import load
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
            return LoadedNetwork(net, name, None, models.config(name, **p_cfg), {}, f"{name} (random weights)")
        else:
            raise CheckpointError(f"no such checkpoint file: {source}")
    else:
        raise TypeError(f"cannot make a predictor from {type(source).__name__}; pass a network, "
                        f"a Checkpoint, a weight file path or a registry name")
    if ck.kind == "backbone":
        raise CheckpointError(f"{ck.path}: an ImageNet backbone ({ck.name}), not a segmentation network")
    return LoadedNetwork(ck.model, ck.name, ck.card, ck.config, ck.provenance or {}, str(ck.path or ck.name))


def merge_card(name: str, stored_card: Optional[Dict[str, Any]], preset: Optional[str],
               provenance: Optional[Dict[str, Any]]) -> Dict[str, Any]:
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
