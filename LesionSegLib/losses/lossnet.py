"""M2SNet's LossNet: a training-free perceptual loss on frozen ImageNet VGG-16 features.

As the MSNet/M2SNet code defines it (``model/miccai_msnet.py`` ``LossNet``, paper Fig. 4):

* the prediction ``σ(logits)`` and the ground-truth mask, each (B, 1, H, W), are
  repeated to three channels, normalised with the ImageNet mean (0.485, 0.456, 0.406)
  and std (0.229, 0.224, 0.225), and bilinearly resized to 224×224
  (``align_corners=False``);
* both go through torchvision's ``vgg16().features`` cut into four blocks, ``[:4]``
  (→ relu1_2), ``[4:9]`` (→ relu2_2), ``[9:16]`` (→ relu3_3), ``[16:23]`` (→ relu4_3);
* the loss is the sum over the four blocks of ``mse_loss(feat_pred, feat_mask)``
  (mean squared error, equal weights).

The VGG-16 needs ImageNet weights, which LesionSeg does not ship. They are looked up
in this order (:func:`find_vgg16_weights`): the ``lossnet_weights`` option; the
LesionSeg cache ``<cache>/weights/vgg16-397923af.pth`` (``<cache>`` is
``$LESIONSEG_CACHE``, default ``~/.cache/lesionseg`` on Linux); torchvision's own download cache
``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth`` (``$TORCH_HOME/hub``), where
``torchvision.models.vgg16(weights=…)`` leaves the very same file. The file is read by
:func:`LesionSegLib.checkpoint.load` (``weights_only``: no code from the file runs).

Without a file, training still runs, but the features are untrained (torchvision's
VGG initialisation, seeded so that runs repeat), which is *not* the published loss.
That is announced loudly when the loss is built, never per step: ``logging.warning``
and ``warnings.warn`` (category :class:`UntrainedLossNetWarning`), and recorded in the
loss's ``config`` so that it reaches the checkpoint's provenance.

The VGG is frozen (``requires_grad`` off) and stays in eval mode whatever ``.train()``
is called on the loss; the mask's features are computed without autograd.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .structure import as_float

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision ``features`` slices of the four LossNet blocks (end indices exclusive)
BLOCKS = ((0, 4), (4, 9), (9, 16), (16, 23))
LOSSNET_SIZE = 224
#: seed of the untrained fallback features (fixed so that two runs see the same loss)
FALLBACK_SEED = 0


class UntrainedLossNetWarning(UserWarning):
    """LossNet runs on random VGG-16 features because no ImageNet weights were found."""


def cache_dir() -> Path:
    """LesionSeg's cache folder: ``$LESIONSEG_CACHE``, else the weight manager's default
    (``~/.cache/lesionseg`` on Linux), so the VGG file sits beside installed checkpoints."""
    try:  # one cache folder for the whole package (platform defaults live there)
        from ..weights import cache_dir as weights_cache_dir
    except ImportError:  # pragma: no cover - LesionSegLib without the weight manager
        env = os.environ.get("LESIONSEG_CACHE", "").strip()
        return Path(env).expanduser() if env else Path.home() / ".cache" / "lesionseg"
    return weights_cache_dir()


def vgg16_search_paths() -> List[Path]:
    """Where the ImageNet VGG-16 file is looked for when no path is given, in order."""
    # torch.hub.get_dir() is where torchvision's vgg16(weights=...) downloads to
    # ($TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub)
    return [cache_dir() / "weights" / VGG16_FILE, Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE]


def find_vgg16_weights(path=None) -> Optional[Path]:
    """The VGG-16 weight file to use: ``path`` if given (it must exist: an explicit
    choice never silently falls back to random features), else the first existing file
    of :func:`vgg16_search_paths`, else None."""
    from ..checkpoint import CheckpointError
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(f"lossnet_weights: no such file: {p}")
        return p
    for p in vgg16_search_paths():
        if p.is_file():
            return p
    return None


def load_vgg16_features(path) -> nn.Sequential:
    """Layers 0–22 (conv1_1 … relu4_3) of an ImageNet VGG-16 file, in torchvision's input
    convention: torchvision's own file as it is, a Caffe/HED file (BGR, 0–255) with its first
    convolution converted (:mod:`LesionSegLib.models.vgg_weights`). Read with
    ``weights_only`` through :mod:`LesionSegLib.checkpoint`; loaded strictly."""
    from .. import checkpoint
    from ..models.vgg import VGG16Features
    state, _ = checkpoint.vgg16_features(path, "torchvision")
    net = VGG16Features()
    checkpoint.load_state_dict_strict(net, state, f"{path} (LossNet VGG-16)")
    return net.features[:BLOCKS[-1][1]]


def random_vgg16_features(seed: int = FALLBACK_SEED) -> nn.Sequential:
    """Untrained layers 0–22 with torchvision's VGG initialisation (Kaiming-normal,
    fan-out, zero bias), from a private seeded generator: the global RNG, and so the
    training run's own randomness, is left untouched."""
    from ..models.vgg import VGG16Features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = VGG16Features().features[:BLOCKS[-1][1]]
        for m in features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return features


class LossNet(nn.Module):
    """Frozen VGG-16 perceptual loss; ``forward(pred_prob, mask)`` with probabilities
    (not logits) and the mask, both (B, 1, H, W) (or already 3 channels).

    ``weights``: a path, or None to search :func:`vgg16_search_paths`; ``features``: an
    ``nn.Sequential`` of torchvision layers 0–22 to use instead (tests, custom weights).
    ``pretrained`` tells whether ImageNet weights are in use; ``weights_path`` which file.
    """

    def __init__(self, weights=None, *, features: Optional[nn.Sequential] = None, size: int = LOSSNET_SIZE,
                 warn: bool = True):
        super().__init__()
        self.size = int(size)
        self.weights_path: Optional[str] = None
        if features is not None:
            self.pretrained = True  # the caller chose the features
        else:
            path = find_vgg16_weights(weights)
            if path is not None:
                features = load_vgg16_features(path)
                self.weights_path = str(path)
                self.pretrained = True
            else:
                features = random_vgg16_features()
                self.pretrained = False
                if warn:
                    announce_untrained()
        if len(features) < BLOCKS[-1][1]:
            raise ValueError(f"LossNet needs torchvision VGG-16 layers 0–{BLOCKS[-1][1] - 1}, got {len(features)}")
        self.features = features[:BLOCKS[-1][1]]
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.features.eval()

    @property
    def device(self) -> torch.device:
        return self.features[0].weight.device

    def train(self, mode: bool = True):
        # the VGG is a fixed measuring instrument: eval mode always, whatever the
        # training loop does to the loss module
        super().train(mode)
        self.features.eval()
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LossNet takes (B, 1, H, W) or (B, 3, H, W) maps, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        # mean/std made in the features' dtype from the decimal constants (not stored as
        # float32 buffers: .double() would then carry float32 rounding into float64 checks)
        w = self.features[0].weight
        mean = torch.tensor(IMAGENET_MEAN, dtype=w.dtype, device=w.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=w.dtype, device=w.device).view(1, 3, 1, 1)
        x = (x.to(w.dtype) - mean) / std
        if self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def block_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """relu1_2, relu2_2, relu3_3, relu4_3 of an already prepared input."""
        outs = []
        for start, end in BLOCKS:
            x = self.features[start:end](x)
            outs.append(x)
        return outs

    def forward(self, pred_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if pred_prob.shape != mask.shape:
            raise ValueError(f"LossNet: prediction {tuple(pred_prob.shape)} and mask {tuple(mask.shape)} differ")
        feats_pred = self.block_features(self._prepare(pred_prob))
        with torch.no_grad():  # the mask's features are a constant target
            feats_mask = self.block_features(self._prepare(mask))
        loss = 0.0
        for fp, fm in zip(feats_pred, feats_mask):
            loss = loss + F.mse_loss(as_float(fp), as_float(fm))
        return loss


def announce_untrained() -> None:
    where = ", ".join(str(p) for p in vgg16_search_paths())
    msg = ("M2SNet/MSNet LossNet: NO ImageNet VGG-16 weights found (option lossnet_weights, then "
           f"{where}). The 0.1 x LossNet term now uses UNTRAINED (random, seeded) VGG-16 features: "
           "this is NOT the published M2SNet loss. Download torchvision's "
           f"{VGG16_URL} and put it at {vgg16_search_paths()[0]}, or pass lossnet_weights=PATH "
           "(lossnet_weight=0 drops the term).")
    log.warning(msg)
    warnings.warn(msg, UntrainedLossNetWarning, stacklevel=3)
