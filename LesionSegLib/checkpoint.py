"""LesionSeg checkpoint files, and loading of the authors' and ImageNet weight files.

A LesionSeg checkpoint is one file holding everything needed to use a trained network:

``{"format": "lesionseg.checkpoint", "format_version": 1, "model": name,
"config": constructor arguments, "card": the model card (with the preset used),
"provenance": {training data, recipe, metrics, date, versions …}, "state_dict": …}``

It is written with ``torch.save`` and read with ``torch.load(weights_only=True)``:
loading never executes code from the file (only tensors, dicts, lists, strings and
numbers are accepted). Writes are atomic (temporary file in the same folder, then
rename), so an interrupted save never destroys the previous file.

:func:`load` also accepts, by content rather than by file name:

* the official M2SNet / MSNet / BSNet ``.pth`` files (plain state dicts, possibly wrapped
  in ``{"state_dict": …}`` or saved from ``DataParallel`` with ``module.`` prefixes);
* the ImageNet backbone files ``res2net50_v1b_26w_4s-3cf99910.pth`` and VGG-16 files in
  torchvision's, the conv-only Caffe and HED's layouts (use :func:`load_pretrained_backbone`
  to put them into a network: a VGG file is converted to the network's input convention,
  see :mod:`LesionSegLib.models.vgg_weights`).

A file that does not fit raises :class:`CheckpointError` naming the missing,
unexpected and mis-shaped keys.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from .fileio import atomic_path

FORMAT = "lesionseg.checkpoint"
FORMAT_VERSION = 1

# keys whose presence identifies a plain state dict of a known family (checked in order)
_SIGNATURES = (
    ("m2snet", ("conv_3.norm.weight", "x5_x4_x3_x2_x1.0.weight", "resnet.layer4.0.conv1.weight")),
    ("msnet", ("x5_x4_x3_x2_x1.0.weight", "resnet.layer4.0.conv1.weight")),
    ("bsnet", ("rfb2_1.branch0.0.conv.weight", "fam45.conv0.weight", "resnet.layer4.0.conv1.weight")),
    ("res2net50_v1b_26w_4s", ("conv1.0.weight", "layer1.0.convs.0.weight", "layer4.2.bn3.running_var")),
    ("vgg16", ("features.0.weight", "features.28.weight")),
)
BACKBONES = ("res2net50_v1b_26w_4s", "vgg16")


class CheckpointError(ValueError):
    """A weight file that cannot be used, with the reason."""


@dataclass
class Checkpoint:
    """What :func:`load` returns."""
    model: Any                      # torch.nn.Module, in eval mode
    name: str                       # registry name, or backbone name
    kind: str                       # "lesionseg", "official" or "backbone"
    card: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None


def _torch():
    import torch
    return torch


def _version() -> str:
    from . import __version__
    return __version__


def describe_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], limit: int = 8) -> str:
    """Human-readable difference between two state dicts (key → tensor or shape)."""
    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} (file {shape(found[k])}, model {shape(expected[k])})"
             for k in expected if k in found and shape(found[k]) != shape(expected[k])]
    parts = []
    for label, items in (("missing key", missing), ("unexpected key", unexpected), ("shape mismatch", wrong)):
        if items:
            more = f", … {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}{'s' if len(items) > 1 else ''}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_state_dict_strict(module, state_dict: Mapping[str, Any], what: str) -> None:
    """``module.load_state_dict(strict=True)`` with a :class:`CheckpointError` that names
    the missing, unexpected and mis-shaped keys instead of PyTorch's wall of text."""
    problem = describe_mismatch(module.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"{what} does not fit: {problem}")
    module.load_state_dict(state_dict, strict=True)


def _read(path) -> Any:
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - optional dependency
            raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package") from e
        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; corrupt files fail here too
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text:
            # name what the file wants to run, never PyTorch's advice to turn the check off
            import re
            found = re.findall(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", text)
            what = f" ({', '.join(dict.fromkeys(found))})" if found else ""
            raise CheckpointError(
                f"{path}: the file contains Python objects other than weights{what}, and LesionSeg never "
                f"executes code from checkpoint files. Re-save it as a state dict.") from None
        msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weight file ({msg})") from None


def _unwrap_state_dict(obj: Any) -> Dict[str, Any]:
    torch = _torch()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net", "params"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file holds no state dict (a mapping of parameter names to tensors)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def identify(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Registry or backbone name of a plain state dict, from its keys; None if unknown."""
    from .models import vgg_weights
    if vgg_weights.layout(state_dict) is not None:
        return "vgg16"
    for name, keys in _SIGNATURES:
        if all(k in state_dict for k in keys):
            return name
    return None


def build_backbone(name: str):
    from .models.res2net import res2net50_v1b_26w_4s
    from .models.vgg import VGG16Features
    if name == "res2net50_v1b_26w_4s":
        return res2net50_v1b_26w_4s()
    if name == "vgg16":
        return VGG16Features()
    raise CheckpointError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")


def _backbone_state(name: str, sd: Mapping[str, Any]) -> Dict[str, Any]:
    if name == "vgg16":  # the 13 convolutions; a classifier or HED's side outputs are not the backbone
        from .models import vgg_weights
        return vgg_weights.features_state(sd)[0]
    return dict(sd)


def vgg16_features(path, convention: str) -> Tuple[Dict[str, Any], str]:
    """The convolutions of a VGG-16 file (torchvision, conv-only Caffe or HED layout) as a
    ``features.N`` state dict in the input ``convention`` asked for ("caffe" or
    "torchvision"), and the convention the file was in."""
    from .models import vgg_weights
    sd = _unwrap_state_dict(_read(path))
    if vgg_weights.layout(sd) is None:
        raise CheckpointError(f"{path}: not a VGG-16 weight file (torchvision, conv-only Caffe or HED layout)")
    features, source = vgg_weights.features_state(sd)
    return vgg_weights.convert(features, source, convention), source


def load(path, model: Optional[str] = None, preset: Optional[str] = None) -> Checkpoint:
    """Load a LesionSeg checkpoint, an official M2SNet/MSNet/BSNet file or an ImageNet
    backbone file. ``model`` forces the registry name for a plain state dict (otherwise
    it is recognised from its keys). The returned network is in eval mode."""
    from . import models
    obj = _read(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this "
                                  f"LesionSeg supports ({FORMAT_VERSION}); update LesionSeg")
        name = obj["model"]
        if model and models.registry_name(model) != models.registry_name(name):
            raise CheckpointError(f"{path}: holds a {name!r} network, not {model!r}")
        try:
            net = models.create(name, **obj.get("config", {}))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot build network {name!r}: {e}") from e
        load_state_dict_strict(net, obj["state_dict"], f"{path} ({name})")
        net.eval()
        return Checkpoint(net, models.registry_name(name), "lesionseg", obj.get("card", {}), obj.get("config", {}),
                          obj.get("provenance", {}), str(path))

    sd = _unwrap_state_dict(obj)
    name = models.registry_name(model) if model else identify(sd)
    if name is None:
        raise CheckpointError(
            f"{path}: not a LesionSeg checkpoint and not a known official file "
            f"(M2SNet, MSNet, BSNet, Res2Net-50 v1b, VGG16); pass the model name to load it; "
            f"first keys: {', '.join(list(sd)[:5])}")
    if name in BACKBONES:
        net = build_backbone(name)
        load_state_dict_strict(net, _backbone_state(name, sd), f"{path} (backbone {name})")
        prov = {"source": "ImageNet-pretrained backbone file", "file": Path(path).name}
        if name == "vgg16":  # weights as in the file; vgg16_features() converts conventions
            from .models import vgg_weights
            prov["input_convention"] = vgg_weights.features_state(sd)[1]
        return Checkpoint(net.eval(), name, "backbone", path=str(path), provenance=prov)
    net = models.create(name)
    load_state_dict_strict(net, sd, f"{path} (official {name})")
    card = models.card(name)
    return Checkpoint(net.eval(), name, "official", card, models.config(name), path=str(path),
                      provenance={"source": "official release of the authors", "file": Path(path).name,
                                  "preset": preset or card.get("default_preset")})


def load_pretrained_backbone(model, path) -> str:
    """Load an ImageNet backbone file into a LesionSeg network's backbone, strictly.

    The backbone attribute comes from the network's card (``architecture.backbone_prefix``).
    A VGG-16 file is converted to the network's input convention (its card's
    ``input.normalization``): L-Seg takes Caffe BGR 0-255 input, so torchvision's RGB file
    has its first convolution re-expressed. Returns the backbone name, with the conversion
    when one was made ("vgg16 (torchvision -> caffe input convention)"). Raises
    :class:`CheckpointError` when the file is not the backbone that network uses, naming
    the differing keys."""
    from . import models
    name = getattr(model, "lesionseg_name", None)
    if name is None:
        raise CheckpointError("the network was not built by LesionSegLib.models.create; its backbone is unknown")
    arch = models.card(name)["architecture"]
    wanted, prefix = arch.get("backbone"), arch.get("backbone_prefix")
    if not wanted or not prefix:
        raise CheckpointError(f"network {name!r} has no pretrained backbone")
    sd = _unwrap_state_dict(_read(path))
    found = identify(sd)
    if found != wanted:
        raise CheckpointError(f"{path}: network {name!r} needs a {wanted} backbone file, "
                              f"but this file is {found or 'not a known backbone'}")
    target = model.get_submodule(prefix.rstrip("."))
    what = wanted
    state = _backbone_state(wanted, sd)
    if wanted == "vgg16":
        from .models import vgg_weights
        goal = vgg_weights.convention_of_input(models.card(name).get("input", {}).get("normalization", {}))
        state, source = vgg16_features(path, goal)
        what = f"vgg16 ({source} input convention)" if source == goal else f"vgg16 ({source} -> {goal} input convention)"
    load_state_dict_strict(target, state, f"{path} (backbone {wanted} of {name})")
    return what


def save(path, model, *, card: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None,
         provenance: Optional[Dict[str, Any]] = None, preset: Optional[str] = None,
         extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` as a LesionSeg checkpoint, atomically. ``config`` defaults to the
    card's configuration (pass the overrides the network was built with); ``provenance``
    records training data, recipe, metrics … (JSON-like values only); ``extra`` adds
    further top-level entries (e.g. optimiser state for resuming)."""
    from . import models
    torch = _torch()
    name = getattr(model, "lesionseg_name", None)
    if name is None:
        raise CheckpointError("save() needs a network built by LesionSegLib.models.create")
    card = card if card is not None else models.card(name)
    if preset:
        card = dict(card, preset=models.preset(name, preset))
    prov = {"saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "lesionseg_version": _version(), "torch_version": str(torch.__version__)}
    prov.update(provenance or {})
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": name,
               "config": _plain(dict(config) if config is not None else models.config(name)),
               "card": _plain(card), "provenance": _plain(prov),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if extra:
        clash = set(extra) & set(payload)
        if clash:
            raise ValueError(f"extra entries would overwrite {sorted(clash)}")
        payload.update(extra)
    return atomic_torch_save(payload, path)


def _plain(obj: Any) -> Any:
    """JSON-typed copy (dict/list/str/number/bool/None): what ``weights_only`` loading
    accepts, so that metadata can never make a checkpoint unreadable. Other objects
    (paths, numpy scalars, version strings) become their ``str``."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def atomic_torch_save(obj: Any, path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    torch = _torch()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def read_metadata(path) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(model name, card, provenance) of a LesionSeg checkpoint without building the network."""
    obj = _read(path)
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT):
        raise CheckpointError(f"{path}: not a LesionSeg checkpoint")
    return obj["model"], obj.get("card", {}), obj.get("provenance", {})
