"""The network of a training run: its configuration resolved from the recipe, the network
built for the device and started from pretrained weights, and its preset as trained (for
the checkpoint's card)."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from .. import models
from ..data.sources import TargetSpec, target_spec
from .data_prep import input_spec_for
from .recipes import RecipeError
from .result import TrainingError


@dataclass
class RunConfig:
    """A recipe resolved for one network: what :class:`.loop.Trainer` builds and trains."""
    name: str
    preset: str
    recipe: Dict[str, Any]
    input_spec: Dict[str, Any]  # the preset's input as trained (2.5D context, size)
    spec: TargetSpec
    full_config: Dict[str, Any]  # the network's constructor arguments
    sizes: List[Tuple[int, int]]  # the training sizes (several with multiscale)
    size: Tuple[int, ...]  # the validation size, recorded in the card
    seed: int


def resolve_config(name: str, recipe: Dict[str, Any], seed: int) -> Tuple[RunConfig, Dict[str, Any]]:
    """``(run configuration, the preset)`` of ``recipe``; sizes the network cannot take and
    2.5D context for a network without ``in_channels`` are refused here."""
    preset = recipe["preset"]
    preset_dict = models.preset(name, preset)
    context = int((recipe.get("slices") or {}).get("context", 0) or 0)
    input_spec = input_spec_for(name, preset_dict, context)

    model_config = dict(preset_dict.get("config", {}))
    model_config.update(recipe.get("model_config") or {})
    if context:
        if "in_channels" not in models.config(name):
            raise RecipeError(f"{name} has no in_channels option; slices.context needs one")
        model_config["in_channels"] = 2 * context + 1
    full_config = models.config(name, **model_config)
    spec = target_spec(name, preset_dict, full_config)

    size = tuple(int(s) for s in recipe["size"])
    ms = recipe.get("multiscale") or None
    sizes = [tuple(s) if isinstance(s, (list, tuple)) else (int(s), int(s)) for s in ms["sizes"]] if ms else [size]
    _check_sizes(name, input_spec, sizes + [size])
    # the checkpoint's card records the size the network was trained (and validated) at, so
    # the predictor resizes to it; a run at a non-card size must not be fed card-size slices
    # (tiles: the image size the tiles were cut from, which is what the network sees whole)
    input_spec["size"] = list(recipe["tile_from"]) if recipe.get("tile_from") else list(size)
    return RunConfig(name, preset, recipe, input_spec, spec, full_config, sizes, size, seed), preset_dict


def _check_sizes(name: str, spec_in: Dict[str, Any], sizes: Sequence[Sequence[int]]) -> None:
    div, low = int(spec_in.get("size_divisor", 1)), int(spec_in.get("min_size", 1))
    for s in sizes:
        for v in s:
            if v % div or v < low:
                raise RecipeError(f"{name}: training size {list(s)} does not fit the network (sides must be "
                                  f"multiples of {div} and at least {low})")


def build_model(cfg: RunConfig, dev: torch.device, dist, pretrained, printer) -> Tuple[nn.Module, bool]:
    """``(network, channels_last)``: ``cfg``'s network on ``dev``, initialised from
    ``pretrained`` when given, with SyncBatchNorm under DDP on CUDA when the recipe asks."""
    name = cfg.name
    model = models.create(name, **cfg.full_config)
    if pretrained:
        printer.line(f"starting from {load_pretrained(model, name, pretrained)}")
    if cfg.recipe.get("sync_bn") and dist.enabled:
        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif dist.is_main:  # PyTorch's SyncBatchNorm runs on GPUs only
            warnings.warn("sync_bn ignored: SyncBatchNorm needs CUDA; each CPU process keeps its own batch "
                          "statistics")
    model.to(dev)
    if dev.type == "cpu":
        # oneDNN computes depthwise kernels above 13×13 on a slow generic path (MS-LKSeg's
        # 21×21 Re-DWConv: 3-4× the whole step); the FFT computes the same map and shares
        # the parameters, so optimiser, state dict and checkpoints are unchanged
        from ..inference.fastconv import replace_large_depthwise
        replace_large_depthwise(model, trainable=True)
    channels_last = cfg.recipe.get("channels_last", "auto")
    channels_last = (dev.type == "cuda") if channels_last == "auto" else bool(channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, channels_last


def trained_preset(preset: Dict[str, Any], input_spec: Dict[str, Any], spec: TargetSpec) -> Dict[str, Any]:
    """The preset as trained, for the checkpoint's card: the input (2.5D context) and, for a
    network built with more classes than the preset lists (``model_config.num_classes``),
    softmax outputs and the extra classes (named "Class k"; rename them in the card)."""
    p = json.loads(json.dumps(preset))
    p["input"] = input_spec
    classes = list(p.get("classes", []))
    if spec.softmax and (not models.Outputs.of(p).softmax or len(classes) != spec.n_classes):
        palette = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (80, 200, 120), (200, 80, 255), (255, 128, 0)]
        while len(classes) < spec.n_classes:
            v = len(classes) + 1
            classes.append({"value": v, "name": f"Class {v}", "color": list(palette[(v - 1) % len(palette)])})
        p["classes"] = classes[:spec.n_classes]
        p["outputs"] = dict(p["outputs"], channels=spec.channels, activation="softmax")
    return p


def load_pretrained(model: nn.Module, name: str, path) -> str:
    """Load an ImageNet backbone or a checkpoint into ``model``; says what was loaded."""
    path = Path(path)
    sd = ckpt._unwrap_state_dict(ckpt._read(path)) if path.is_file() else None
    if sd is None:
        raise TrainingError(f"pretrained weights {path}: no such file")
    kind = ckpt.identify(sd)
    if kind in ckpt.BACKBONES:
        try:
            return f"{path.name}: backbone {ckpt.load_pretrained_backbone(model, path)}"
        except ckpt.CheckpointError as e:
            raise TrainingError(f"pretrained weights {path}: {e}") from None
    try:
        ck = ckpt.load(path, model=name)
    except ckpt.CheckpointError as e:
        raise TrainingError(f"pretrained weights {path}: {e}") from None
    ckpt.load_state_dict_strict(model, ck.model.state_dict(), f"{path} (fine-tuning {name})")
    return f"{path.name}: all weights ({ck.kind} {ck.name})"
