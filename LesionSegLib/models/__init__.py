"""Model registry: every LesionSeg network by name, its model card, and its factory.

The cards are JSON files in ``cards/`` beside this file: configuration as data. This
module does not import torch, so Slicer can list networks and show their cards at
startup; torch is imported by :func:`create` when a network is actually built.

>>> from LesionSegLib import models
>>> models.list_models()
['bsnet', 'lseg', 'm2snet', 'msenet', 'mslkseg', 'msnet', 'unet']
>>> net = models.create("m2snet")                     # doctest: +SKIP
>>> models.card("m2snet")["parameters"]["trainable"]  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

CARDS_DIR = Path(__file__).with_name("cards")

__all__ = ["list_models", "registry_name", "card", "create", "config", "preset", "output_names",
           "inference_output", "lesion_size_levels", "Inputs", "Outputs", "UnknownModelError", "UnknownPresetError"]


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


class UnknownPresetError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


@lru_cache(maxsize=None)
def _load_cards() -> Dict[str, Dict[str, Any]]:
    cards = {}
    for path in sorted(CARDS_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("name") != path.stem:
            raise RuntimeError(f"model card {path} has name {data.get('name')!r}, expected {path.stem!r}")
        cards[path.stem] = data
    return cards


def registry_name(name: str) -> str:
    """The registry name of ``name``, a registry name or an alias in any case and hyphenation
    (``M2SNet``, ``ms-lkseg``, ``L-Seg``); :class:`UnknownModelError` lists the networks."""
    key = name.strip().lower().replace("-", "").replace("_", "").replace("²", "2")
    cards = _load_cards()
    if key in cards:
        return key
    for n, c in cards.items():
        aliases = [c.get("display_name", "")] + c.get("aliases", [])
        if key in (a.lower().replace("-", "").replace("_", "").replace("²", "2") for a in aliases):
            return n
    raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(cards)}")


@dataclass(frozen=True)
class Inputs:
    """A card's or preset's ``input`` sizes, typed, with the defaults of keys a card leaves
    out (normalisation and channel handling are read by :mod:`LesionSegLib.preprocessing`)."""
    channels: int = 1
    dims: int = 2
    size: Optional[Tuple[int, int]] = None
    size_divisor: int = 1
    min_size: int = 1

    @classmethod
    def of(cls, card_or_input: Mapping[str, Any]) -> "Inputs":
        """From a card or preset (its ``input`` entry) or from the ``input`` entry itself."""
        spec = card_or_input["input"] if isinstance(card_or_input.get("input"), Mapping) else card_or_input
        read = {"channels": int, "dims": int, "size": lambda v: (int(v[0]), int(v[1])), "size_divisor": int,
                "min_size": int}
        return cls(**{k: f(spec[k]) for k, f in read.items() if spec.get(k)})


@dataclass(frozen=True)
class Outputs:
    """A card's or preset's ``outputs``, typed: the one place where a key a card leaves
    out gets its default (cards written by older versions, official files)."""
    activation: str = "sigmoid"
    threshold: float = 0.5
    channels: Optional[int] = None  # None: one per class (sigmoid), one more for background (softmax)
    multi_label: bool = False
    edge_output: bool = False
    names: Tuple[str, ...] = ()
    inference: Optional[str] = None
    # hysteresis: a lesion (connected region above ``threshold``) is kept only where one of
    # its pixels reaches ``seed_threshold``; None keeps every region
    seed_threshold: Optional[float] = None

    @classmethod
    def of(cls, card_or_outputs: Mapping[str, Any]) -> "Outputs":
        """From a card or preset (its ``outputs`` entry) or from the ``outputs`` entry itself."""
        out = card_or_outputs.get("outputs", card_or_outputs)
        read = {"activation": str, "threshold": float, "channels": int, "multi_label": bool, "edge_output": bool,
                "names": tuple, "inference": str, "seed_threshold": float}
        return cls(**{k: f(out[k]) for k, f in read.items() if out.get(k) is not None and (k != "activation" or out[k])})

    @property
    def softmax(self) -> bool:
        return self.activation == "softmax"

    def channels_for(self, n_classes: int) -> int:
        """Output channels of a network with ``n_classes`` classes."""
        if self.channels is not None:
            return self.channels
        return n_classes + 1 if self.softmax else n_classes


def list_models() -> List[str]:
    """Names of all registered networks, sorted."""
    return sorted(_load_cards())


def card(name: str) -> Dict[str, Any]:
    """A copy of the model card of ``name`` (case, '-' and '_' are ignored)."""
    return copy.deepcopy(_load_cards()[registry_name(name)])


def config(name: str, **overrides) -> Dict[str, Any]:
    """The constructor arguments of ``name``: the card's defaults updated by ``overrides``.
    Unknown keys are rejected with the list of accepted ones."""
    arch = _load_cards()[registry_name(name)]["architecture"]
    cfg = dict(arch.get("config", {}))
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(sorted(cfg)) or 'none'}")
    cfg.update(overrides)
    return cfg


def preset(name: str, preset_name: str = None) -> Dict[str, Any]:
    """The task preset (modality, classes, normalisation …) of a model; the card's
    default preset when ``preset_name`` is None. Preset keys override the card's
    top-level ``input``/``classes``/``outputs`` entries."""
    c = card(name)
    presets = c.get("presets", {})
    preset_name = preset_name or c.get("default_preset")
    if preset_name not in presets:
        raise UnknownPresetError(f"model {c['name']!r} has no preset {preset_name!r}; "
                                 f"available: {', '.join(presets) or 'none'}")
    p = presets[preset_name]
    merged = {"name": preset_name, "input": dict(c["input"]), "classes": c["classes"], "outputs": c["outputs"]}
    for k, v in p.items():
        if k == "input":
            merged["input"].update(v)
        else:
            merged[k] = v
    return merged


_task_preset = preset  # create() takes a parameter named "preset"


def create(name: str, preset: str = None, **overrides):
    """Build network ``name`` (random initialisation) with the card's configuration,
    updated by the task preset's ``config`` (e.g. U-Net's polyp preset takes RGB) and
    then by ``overrides`` (e.g. ``in_channels=1``). Imports torch."""
    key = registry_name(name)
    arch = _load_cards()[key]["architecture"]
    module = importlib.import_module(f"{__name__}.{arch['module']}")
    cls = getattr(module, arch["class"])
    preset_config = _task_preset(key, preset).get("config", {}) if preset else {}
    model = cls(**config(key, **{**preset_config, **overrides}))
    model.lesionseg_name = key
    return model


def lesion_size_levels(card: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The lesion size levels (small/medium/large) of a card with its preset in use: the
    preset's, else the network's; a network name stands for that network's levels (U-Net's
    stroke presets use MSE-Net's). None: lesions are not graded."""
    levels = (card.get("preset") or {}).get("lesion_size_levels", card.get("lesion_size_levels"))
    if isinstance(levels, str):
        levels = _load_cards()[registry_name(levels)].get("lesion_size_levels")
    return copy.deepcopy(levels) if levels else None


def output_names(name: str) -> List[str]:
    return list(_load_cards()[registry_name(name)]["outputs"]["names"])


def inference_output(name: str, outputs):
    """The output that inference uses, from a network's raw forward result (a tensor, or
    a tuple of deep-supervision outputs in the order of ``card['outputs']['names']``)."""
    out = _load_cards()[registry_name(name)]["outputs"]
    if not isinstance(outputs, (tuple, list)):
        return outputs
    return outputs[out["names"].index(out["inference"])]
