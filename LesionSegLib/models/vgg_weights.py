"""ImageNet VGG-16 weight files in their three common layouts, and their input conventions.

Two input conventions exist for the same architecture, and a weight file only works with
the one it was trained for:

``caffe``
    BGR channel order, pixel values 0–255 with a per-channel mean subtracted, no std
    division. The original Oxford VGG-16 (Caffe), HED's ``5stage-vgg`` / ``hed_bsds``
    models, Keras' ``VGG16`` and the project's ``vgg16-imagenet-caffe.pth`` use it.
    ImageNet mean (B, G, R) = (103.939, 116.779, 123.68).
``torchvision``
    RGB channel order, values in [0, 1], normalised with mean (0.485, 0.456, 0.406) and
    std (0.229, 0.224, 0.225): torchvision's ``vgg16-397923af.pth``.

Only the first convolution sees the input, so a file is re-expressed in the other
convention by reversing its three input channels and scaling them by ``255·std``
(torchvision → Caffe: divide; Caffe → torchvision: multiply). The two ImageNet means are
the same colour to within half a grey level (R 0.485·255 = 123.675 vs 123.68, G 116.28 vs
116.779, B 103.53 vs 103.939), so the biases are left unchanged, and a zero-padded border
means "the mean pixel" in both: with the mean taken as ``255·mean`` the conversion is exact.

Layouts recognised (all become torchvision's ``features.N`` keys):

* torchvision: ``features.N.weight`` with ``classifier.*`` → convention ``torchvision``;
* ``features.N.weight`` without a classifier (a conv-only export of the Caffe/Keras
  weights, like the file shipped to these machines) → convention ``caffe``;
* HED conversions: Caffe layer names ``conv1_1.weight`` … ``conv5_3.bias`` (caffemodel →
  PyTorch converters), or sniklaus' ``pytorch-hed`` names ``netVggOne.0.weight`` …
  (older releases: ``moduleVggOne``) → convention ``caffe`` (HED was trained in Caffe
  with mean (104.00699, 116.66877, 122.67892)). HED's side-output and fusion layers are
  not part of the backbone and are skipped.

A file whose layout says nothing about its convention (a stripped torchvision file) is
taken as Caffe unless ``convention`` is given: the choice is always reported.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
CONVENTIONS = {
    "caffe": "BGR, 0-255, mean subtracted, no std division",
    "torchvision": "RGB, 0-1, ImageNet mean/std normalised",
}

#: torchvision ``features`` index of each Caffe conv layer (conv1_1 … conv5_3)
CAFFE_LAYER_INDEX = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
    "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
    "conv5_1": 24, "conv5_2": 26, "conv5_3": 28,
}
# sniklaus/pytorch-hed: nn.Sequential blocks; block 1 starts with its conv, blocks 2-5
# with a max-pool, so the convs sit at 0, 2 (block 1) and 1, 3(, 5) (blocks 2-5)
_HED_BLOCKS = {"One": 1, "Two": 2, "Thr": 3, "Fou": 4, "Fiv": 5}
_HED_KEY = re.compile(r"^(?:net|module)Vgg(One|Two|Thr|Fou|Fiv)\.(\d+)\.(weight|bias)$")
_CAFFE_KEY = re.compile(r"^(conv\d_\d)\.(weight|bias)$")
_FEATURE_KEY = re.compile(r"^features\.(\d+)\.(weight|bias)$")


def _hed_index(block: str, position: int) -> Optional[int]:
    b = _HED_BLOCKS[block]
    convs = sorted(i for name, i in CAFFE_LAYER_INDEX.items() if name.startswith(f"conv{b}_"))
    offset = 0 if b == 1 else 1
    order = (position - offset) // 2
    if (position - offset) % 2 or not 0 <= order < len(convs):
        return None
    return convs[order]


def layout(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``"torchvision"``, ``"features"`` (conv-only, torchvision names), ``"hed-caffe"``,
    ``"hed-pytorch"`` or None when ``sd`` is not a VGG-16 weight file."""
    keys = set(sd)
    if {"features.0.weight", "features.28.weight"} <= keys:
        return "torchvision" if any(k.startswith("classifier.") for k in keys) else "features"
    if {"conv1_1.weight", "conv5_3.weight"} <= keys:
        return "hed-caffe"
    if any(_HED_KEY.match(k) for k in keys) and any(k.endswith("VggFiv.5.weight") for k in keys):
        return "hed-pytorch"
    return None


def features_state(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """The 13 convolutions of ``sd`` under torchvision's ``features.N`` names, and the
    file's convention (see :data:`CONVENTIONS`). Raises ValueError for other files."""
    kind = layout(sd)
    if kind is None:
        raise ValueError("not a VGG-16 weight file (torchvision, conv-only or HED layout)")
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        index, part = None, None
        if kind in ("torchvision", "features"):
            m = _FEATURE_KEY.match(key)
            if m:
                index, part = int(m.group(1)), m.group(2)
        elif kind == "hed-caffe":
            m = _CAFFE_KEY.match(key)
            if m and m.group(1) in CAFFE_LAYER_INDEX:
                index, part = CAFFE_LAYER_INDEX[m.group(1)], m.group(2)
        else:
            m = _HED_KEY.match(key)
            if m:
                index, part = _hed_index(m.group(1), int(m.group(2))), m.group(3)
        if index is not None:
            out[f"features.{index}.{part}"] = value
    return out, ("torchvision" if kind == "torchvision" else "caffe")


def convert(features: Mapping[str, torch.Tensor], source: str, target: str) -> Dict[str, torch.Tensor]:
    """Re-express VGG-16 ``features`` weights from the ``source`` to the ``target`` input
    convention (only ``features.0.weight`` changes; see the module notes)."""
    for c in (source, target):
        if c not in CONVENTIONS:
            raise ValueError(f"unknown VGG input convention {c!r}; known: {', '.join(CONVENTIONS)}")
    out = dict(features)
    if source == target:
        return out
    w = out["features.0.weight"]
    if w.shape[1] != 3:
        raise ValueError(f"the first convolution has {w.shape[1]} input channels; only RGB/BGR files convert")
    scale = (255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float64)).view(1, 3, 1, 1)
    if source == "torchvision":   # RGB weights per normalised unit → BGR weights per grey level
        w = (w.double() / scale).flip(1)
    else:                         # BGR per grey level → RGB per normalised unit
        w = w.double().flip(1) * scale
    out["features.0.weight"] = w.to(features["features.0.weight"].dtype)
    return out


def convention_of_input(normalization: Mapping) -> str:
    """The VGG convention matching a network card's ``input.normalization``."""
    return "caffe" if str(normalization.get("kind", "")).startswith("caffe") else "torchvision"
