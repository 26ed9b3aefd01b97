"""What export and sessions share: names and constants of the graph and its metadata,
the error type, optional imports, and the network, card and input size of a source."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, Tuple

METADATA_PREFIX = "lesionseg."
METADATA_FORMAT_VERSION = 1
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INSTALL_HINT = 'install it with: pip install "LesionSegLib[onnx]" (onnx and onnxruntime)'


class OnnxError(RuntimeError):
    """An export or ONNX session problem, with the reason."""


def import_optional(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OnnxError(f"{module} is not installed; {INSTALL_HINT}") from e


def available() -> bool:
    """True when onnxruntime can be imported (sessions can run)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------- network
def resolve_network(model, *, preset: Optional[str] = None, checkpoint=None):
    """``(module, name, card, provenance, config)`` from a registry name (random weights
    unless ``checkpoint`` is given), a checkpoint path, a :class:`Checkpoint`, or an
    ``nn.Module`` built by ``models.create`` — the resolver's answer
    (:mod:`LesionSegLib.resolver`)."""
    from ... import checkpoint as ckpt
    from ... import resolver
    source = model
    if checkpoint is not None:
        source = checkpoint if isinstance(checkpoint, ckpt.Checkpoint) else ckpt.load(
            checkpoint, model=model if isinstance(model, str) else None, preset=preset)
    try:
        loaded = resolver.load_network(source, preset)
    except ckpt.CheckpointError as e:
        raise OnnxError(str(e)) from None
    if loaded.is_onnx_file:
        raise OnnxError(f"{source}: is already an ONNX graph")
    card = resolver.network_card(loaded.name, loaded.card, preset, loaded.provenance)
    return loaded.model, loaded.name, card, loaded.provenance, dict(loaded.config or {})


def _preset_input(card: Dict[str, Any]) -> Dict[str, Any]:
    spec = dict(card.get("input", {}))
    spec.update((card.get("preset") or {}).get("input", {}))
    return spec


def input_channels(card: Dict[str, Any], config: Optional[Dict[str, Any]] = None) -> int:
    """Input channels of the network: the constructor's ``in_channels`` when known (a
    preset may build a 3-channel U-Net), else the preset's / card's ``input.channels``."""
    if config and "in_channels" in config:
        return int(config["in_channels"])
    from ... import models
    return models.Inputs.of(_preset_input(card)).channels


def default_size(card: Dict[str, Any]) -> Tuple[int, int]:
    from ... import models
    size = models.Inputs.of(_preset_input(card)).size
    if size is None:
        raise OnnxError(f"model {card.get('name')!r} has no input size in its card or preset; pass size=(H, W)")
    return size


def check_size(card: Dict[str, Any], size: Sequence[int]) -> Tuple[int, int]:
    """(H, W) checked against the card's ``size_divisor`` and ``min_size``."""
    if len(size) != 2:
        raise OnnxError(f"size must be (H, W), got {tuple(size)}")
    h, w = int(size[0]), int(size[1])
    from ... import models
    spec = models.Inputs.of(_preset_input(card))
    div, low = spec.size_divisor, spec.min_size
    if h % div or w % div or min(h, w) < low:
        raise OnnxError(f"{card.get('name')}: size {h}×{w} is not allowed; H and W must be multiples of "
                        f"{div} and at least {low}")
    return h, w


def inference_wrapper(module, name: str):
    import torch.nn as nn
    from ... import models

    class InferenceOutput(nn.Module):
        """The network with only its inference output, the graph ONNX should contain."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            return models.inference_output(name, self.net(image))

    return InferenceOutput(module).eval()


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    # the TorchScript exporter appends the offending graph value after " [Caused by"
    return (text[0] if text else "").split(" [Caused by")[0][:limit]


def with_metadata(data: bytes, meta: Dict[str, str]) -> bytes:
    onnx = import_optional("onnx")
    proto = onnx.load_from_string(data)
    keep = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = f"LesionSeg {meta.get(METADATA_PREFIX + 'model', '')}: inference output " \
                       f"{meta.get(METADATA_PREFIX + 'output', '')} (logits)"
    return proto.SerializeToString()

def decode_metadata(props: Dict[str, str]) -> Dict[str, Any]:
    meta: Dict[str, Any] = {}
    for k, text in props.items():
        if not k.startswith(METADATA_PREFIX):
            continue
        key = k[len(METADATA_PREFIX):]
        meta[key] = text
        if key in ("card", "provenance"):
            try:
                meta[key] = json.loads(text)
            except ValueError:  # written by someone else: keep the text
                pass
    return meta
