"""The training loss of every registered network, chosen from its model card.

``build_loss(model_name, preset=None, **options)`` returns an ``nn.Module`` called as
``loss_fn(outputs, batch)`` with the network's raw forward result (a tensor, or the
tuple of deep-supervision outputs in the card's order) and a batch dict (``"mask"``
(B, K, H, W) float, ``"label"`` (B, H, W) int64, optional ``"edge"`` (B, 1, H, W)).
It returns a scalar; ``loss_fn.last_components`` holds the named terms of the last call
as floats (for logs), and ``loss_fn.config`` a JSON-ready description (for provenance).

Which loss (from the card: architecture class M2SNet, then ``outputs.multi_label``, then
``outputs.edge_output``, else the activation; each class gives the exact definition):

==========================  =================================================================
card                        loss
==========================  =================================================================
M2SNet, MSNet               structure loss + 0.1 × LossNet (the released ``train.py``)
BSNet (has edge_output)     structure loss on lateral maps 5, 4, 3, 2 + BCE on the edge map
                            (Inf-Net's recipe; BSNet released no training code: inferred)
L-Seg (multi_label)         multi-channel bin loss on all six outputs, summed (the prototxt)
MSE-Net, MS-LKSeg, U-Net    BCE + Dice (one sigmoid channel) or CE + Dice (softmax channels)
==========================  =================================================================

torch is imported here; :mod:`LesionSegLib.losses` itself imports this module lazily.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from .binloss import DEFAULT_KEY, multi_channel_bin_loss
from .dice import bce_dice_loss, ce_dice_loss
from .lossnet import LossNet
from .structure import as_float, morphological_edge, structure_loss


def _bool(v):
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {v!r}")
    return v


def _nonneg(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise TypeError(f"expected a number >= 0, got {v!r}")
    return float(v)


def _pos_int_or_none(v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise TypeError(f"expected an integer >= 1, got {v!r}")
    return v


def _path_or_none(v):
    if v is None:
        return None
    if not isinstance(v, (str, Path)):
        raise TypeError(f"expected a file path, got {v!r}")
    return str(v)


class SegmentationLoss(nn.Module):
    """Common part: option checking, output splitting, target fetching, components."""

    #: option name -> (default, validator)
    OPTIONS: ClassVar[Dict[str, tuple]] = {}
    RECIPE: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    NOTES: ClassVar[Sequence[str]] = ()

    def __init__(self, model_name: str, preset_name: Optional[str], outputs: Mapping[str, Any], options):
        super().__init__()
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise TypeError(f"loss of {model_name!r}: unknown option(s) {', '.join(unknown)}; "
                            f"accepted: {', '.join(sorted(self.OPTIONS)) or 'none'}")
        opts = {}
        for key, (default, check) in self.OPTIONS.items():
            value = options.get(key)
            if value is None:
                value = default
            try:
                opts[key] = check(value)
            except TypeError as e:
                raise TypeError(f"loss of {model_name!r}: option {key}: {e}") from None
        self.options = opts
        self.model_name = model_name
        self.output_names: List[str] = list(outputs["names"])
        spec = models.Outputs.of(outputs)
        self.channels = spec.channels_for(1)
        self.activation = spec.activation
        self.multi_label = spec.multi_label
        self.config: Dict[str, Any] = {"model": model_name, "preset": preset_name, "recipe": self.RECIPE,
                                       "description": self.DESCRIPTION, "options": dict(opts),
                                       "notes": list(self.NOTES)}
        self._components: Dict[str, torch.Tensor] = {}

    @property
    def last_components(self) -> Dict[str, float]:
        """Named terms of the last call as floats. Kept as detached tensors until read, so
        that a training step that does not log them never waits for the device."""
        return {k: float(v) for k, v in self._components.items()}

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, recipe={self.RECIPE!r}, options={self.options}"

    # -- helpers -------------------------------------------------------------------------------
    def _split(self, outputs) -> List[torch.Tensor]:
        outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if len(outs) != len(self.output_names):
            raise ValueError(f"loss of {self.model_name!r}: expected {len(self.output_names)} output(s) "
                             f"({', '.join(self.output_names)}) from the network's forward, got {len(outs)}")
        for name, o in zip(self.output_names, outs):
            if not isinstance(o, torch.Tensor) or o.dim() != 4:
                shape = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                raise ValueError(f"loss of {self.model_name!r}: output {name!r} must be a (B, C, H, W) "
                                 f"tensor of logits, got {shape}")
        return outs

    def _target(self, batch: Mapping[str, Any], key: str, like: torch.Tensor, what: str) -> torch.Tensor:
        t = batch[key]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if t.dim() == 3:  # (B, H, W) single-channel target
            t = t.unsqueeze(1)
        t = t.to(device=like.device, dtype=as_float(like).dtype)
        if t.shape != like.shape:
            raise ValueError(f"loss of {self.model_name!r}: batch[{key!r}] has shape {tuple(t.shape)} but "
                             f"{what} has shape {tuple(like.shape)}; the target needs one channel per "
                             f"output channel at the output's size")
        return t

    def _with_components(self, total: torch.Tensor, comps: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Keep the detached parts of the loss (and the total) for the log; return the total."""
        self._components = {k: v.detach() for k, v in {**comps, "total": total}.items()}
        return total

    def _mask(self, batch, like: torch.Tensor, what: str) -> torch.Tensor:
        if "mask" in batch and batch["mask"] is not None:
            return self._target(batch, "mask", like, what)
        if batch.get("label") is not None and like.shape[1] == 1:
            # a binary net trained from a class-index map: every lesion class is "lesion"
            return self._target({"mask": (torch.as_tensor(batch["label"]) > 0)}, "mask", like, what)
        raise ValueError(f"loss of {self.model_name!r}: the batch has no 'mask' (keys: {', '.join(batch)})")

    def _label(self, batch, like: torch.Tensor) -> Optional[torch.Tensor]:
        label = batch.get("label")
        if label is None:
            return None
        label = torch.as_tensor(label).to(like.device)
        if label.dim() == 4 and label.shape[1] == 1:
            label = label[:, 0]
        if label.dim() != 3 or label.shape[0] != like.shape[0] or label.shape[-2:] != like.shape[-2:]:
            raise ValueError(f"loss of {self.model_name!r}: batch['label'] has shape {tuple(label.shape)}; "
                             f"expected (B, H, W) = {(like.shape[0],) + tuple(like.shape[-2:])}")
        if label.is_floating_point():
            label = label.round()
        return label.long()


class M2SNetLoss(SegmentationLoss):
    """``structure_loss(x, m) + lossnet_weight · LossNet(σ(x), m)`` (M2SNet/MSNet ``train.py``).

    Options: ``bce_reduction_quirk`` (False: per-pixel weighted BCE as the PraNet paper
    describes; True: the released code's plain mean BCE, see
    :mod:`LesionSegLib.losses.structure`); ``lossnet_weights`` (torchvision vgg16 file;
    None searches the caches, see :mod:`LesionSegLib.losses.lossnet`); ``lossnet_weight``
    (0.1; 0 drops LossNet and builds no VGG).
    """
    OPTIONS: ClassVar[Dict[str, tuple]] = {
        "bce_reduction_quirk": (False, _bool), "lossnet_weights": (None, _path_or_none),
        "lossnet_weight": (0.1, _nonneg)}
    RECIPE = "structure+lossnet"
    DESCRIPTION = ("structure loss (boundary-weighted BCE + weighted IoU, weight 1+5|avgpool31(m)-m|) "
                   "+ lossnet_weight x LossNet (frozen ImageNet VGG-16 relu1_2/2_2/3_3/4_3 MSE), as the "
                   "released M2SNet/MSNet train.py")

    def __init__(self, model_name, preset_name, outputs, options):
        super().__init__(model_name, preset_name, outputs, options)
        self.lossnet = LossNet(self.options["lossnet_weights"]) if self.options["lossnet_weight"] > 0 else None
        self.lossnet_pretrained = bool(self.lossnet is not None and self.lossnet.pretrained)
        self.config["lossnet"] = {
            "used": self.lossnet is not None, "pretrained": self.lossnet_pretrained,
            "weights": self.lossnet.weights_path if self.lossnet is not None else None}
        notes = ["bce_reduction_quirk=True: wBCE is the plain mean BCE of the released code"
                 if self.options["bce_reduction_quirk"] else
                 "bce_reduction_quirk=False: per-pixel boundary-weighted BCE (the released code's "
                 "reduce='none' actually gives plain mean BCE)"]
        if self.lossnet is not None and not self.lossnet_pretrained:
            notes.append("LossNet used UNTRAINED (random, seeded) VGG-16 features: no ImageNet weights found")
        self.config["notes"] += notes

    def forward(self, outputs, batch) -> torch.Tensor:
        (pred,) = self._split(outputs)
        mask = self._mask(batch, pred, f"output {self.output_names[0]!r}")
        s, wbce, wiou = structure_loss(pred, mask, bce_reduction_quirk=self.options["bce_reduction_quirk"],
                                       return_parts=True)
        comps = {"structure": s, "wbce": wbce, "wiou": wiou}
        loss = s
        if self.lossnet is not None:
            if self.lossnet.device != pred.device:  # follow the network if .to() was forgotten
                self.lossnet.to(pred.device)
            ln = self.lossnet(torch.sigmoid(as_float(pred)), mask)
            comps["lossnet"] = ln
            loss = loss + self.options["lossnet_weight"] * ln
        return self._with_components(loss, comps)


class BSNetLoss(SegmentationLoss):
    """Deep supervision of BSNet: ``Σ structure_loss(lateral_map_k, m)`` over k = 5, 4, 3, 2
    ``+ edge_weight · BCE(lateral_edge, edge)`` (mean BCE with logits).

    BSNet's authors released no training code; this is Inf-Net's recipe (Fan et al.,
    IEEE TMI 2020: a PraNet-style COVID-19 infection net with lateral maps and an edge
    head supervised by edge GT, the layout BSNet's ``data.py`` also reads): equal weights,
    structure loss on every lateral map, plain mean BCE on the edge map. Inferred, not
    verified (networks.md section 4). When the batch has no ``"edge"``, the edge target is derived from the mask
    (3×3 dilation − erosion by max-pooling), a band that contains Inf-Net's released
    edge maps on COVID-SemiSeg.
    """
    OPTIONS: ClassVar[Dict[str, tuple]] = {"bce_reduction_quirk": (False, _bool),
                                           "edge_weight": (1.0, _nonneg)}
    RECIPE = "deep-structure+edge-bce"
    DESCRIPTION = ("sum of structure losses on lateral_map_5/4/3/2 + edge_weight x BCE on lateral_edge "
                   "(Inf-Net recipe; BSNet released no training code, so this is inferred)")
    NOTES = ("loss inferred (Inf-Net recipe): BSNet's release has no training code or loss",
             "edge target: batch['edge'] when given, else 3x3 morphological gradient of the mask")

    def __init__(self, model_name, preset_name, outputs, options):
        super().__init__(model_name, preset_name, outputs, options)
        edge_name = outputs.get("edge_output")
        if edge_name not in self.output_names:
            raise ValueError(f"loss of {model_name!r}: card edge_output {edge_name!r} is not among the outputs")
        self.edge_index = self.output_names.index(edge_name)

    def forward(self, outputs, batch) -> torch.Tensor:
        outs = self._split(outputs)
        quirk = self.options["bce_reduction_quirk"]
        comps: Dict[str, torch.Tensor] = {}
        structure = 0.0
        for i, (name, pred) in enumerate(zip(self.output_names, outs)):
            if i == self.edge_index:
                continue
            mask = self._mask(batch, pred, f"output {name!r}")
            s = structure_loss(pred, mask, bce_reduction_quirk=quirk)
            comps[name] = s
            structure = structure + s
        edge_pred = as_float(outs[self.edge_index])
        edge_name = self.output_names[self.edge_index]
        if batch.get("edge") is not None:
            edge = self._target(batch, "edge", edge_pred, f"output {edge_name!r}")
        else:
            edge = morphological_edge(self._mask(batch, edge_pred, f"output {edge_name!r}"))
        e = F.binary_cross_entropy_with_logits(edge_pred, edge)
        comps["structure"] = structure
        comps["edge"] = e
        total = structure + self.options["edge_weight"] * e
        return self._with_components(total, comps)


class LSegLoss(SegmentationLoss):
    """Multi-channel bin loss (``key`` 10, ``num_label`` = channels) on each of the six
    outputs (dsn1 … dsn5, fuse), summed with weight 1 each, as ``lseg.prototxt``; see
    :mod:`LesionSegLib.losses.binloss` for the exact definition and where it departs from
    the Caffe layer (batch summed, consistent backward, 0/0 → 0).

    Positives come from ``batch["label"]`` (value c+1 = class c, the layer's input);
    without a label map, from ``batch["mask"] >= 0.5`` per channel (allows overlapping
    classes, which a label map cannot express). The loss is a sum over pixels, not a mean:
    learning rates must be small (HED-style, ~1e-6…1e-8 with SGD)."""
    OPTIONS: ClassVar[Dict[str, tuple]] = {"key": (DEFAULT_KEY, _nonneg), "num_label": (None, _pos_int_or_none)}
    RECIPE = "multi-channel-bin-loss"
    DESCRIPTION = ("multi-channel bin sigmoid CE (hard negatives by probability bins, key x #pos, "
                   "class balance pooled over channels) on dsn1..dsn5 and fuse, summed")
    NOTES = ("every image of the batch is processed and the losses summed (Caffe: first image only)",
             ("backward = autograd of the forward with the selection as a constant mask (the Caffe "
              "backward branch bug for bins 4..1 is not reproduced)"),
             "negative-count divisor = num_label (Caffe: literal 4)")

    def __init__(self, model_name, preset_name, outputs, options):
        super().__init__(model_name, preset_name, outputs, options)
        self.config["options"]["num_label"] = self.options["num_label"] or self.channels

    def forward(self, outputs, batch) -> torch.Tensor:
        outs = self._split(outputs)
        # the per-channel mask keeps overlapping classes (an MA inside an exudate), which a
        # label map cannot; for non-overlapping targets both give the same positives
        positives, label = None, None
        if isinstance(batch.get("mask"), torch.Tensor) and batch["mask"].shape[1] == outs[0].shape[1]:
            positives = self._mask(batch, outs[0], f"output {self.output_names[0]!r}") >= 0.5
        else:
            label = self._label(batch, outs[0])
            if label is None:
                positives = self._mask(batch, outs[0], f"output {self.output_names[0]!r}") >= 0.5
        comps: Dict[str, torch.Tensor] = {}
        total = 0.0
        for name, pred in zip(self.output_names, outs):
            if pred.shape[1] != outs[0].shape[1] or pred.shape[-2:] != outs[0].shape[-2:]:
                raise ValueError(f"loss of {self.model_name!r}: output {name!r} has shape {tuple(pred.shape)}, "
                                 f"unlike {self.output_names[0]!r} {tuple(outs[0].shape)}")
            l_ = multi_channel_bin_loss(pred, label, positives=positives, key=self.options["key"],
                                        num_label=self.options["num_label"])
            comps[name] = l_
            total = total + l_
        return self._with_components(total, comps)


class DiceCELoss(SegmentationLoss):
    """BCE + Dice for one sigmoid channel, CE + Dice for softmax channels (see
    :mod:`LesionSegLib.losses.dice`). The activation follows the card/preset
    (``outputs.activation``); a network built with several output channels whose card
    says sigmoid (U-Net, MS-LKSeg with ``num_classes > 1``) is a softmax net (U-Net card:
    "softmax over channels for num_classes > 1"). ``num_classes`` (option) pins the
    expected channel count; ``dice_weight`` weights the Dice term (1)."""
    OPTIONS: ClassVar[Dict[str, tuple]] = {"dice_weight": (1.0, _nonneg),
                                           "num_classes": (None, _pos_int_or_none)}
    RECIPE = "ce+dice"
    DESCRIPTION = ("BCE + soft Dice (sigmoid, one channel) or CE + soft Dice over the foreground "
                   "classes (softmax); Dice per image with smoothing 1")
    NOTES = ("no loss was released for this network (or it is the baseline): LesionSeg's choice",)

    def forward(self, outputs, batch) -> torch.Tensor:
        (pred,) = self._split(outputs)
        C = pred.shape[1]
        expected = self.options["num_classes"]
        if expected is not None and C != expected:
            raise ValueError(f"loss of {self.model_name!r}: num_classes={expected} but output "
                             f"{self.output_names[0]!r} has {C} channels")
        what = f"output {self.output_names[0]!r}"
        if C == 1 and self.activation != "softmax":
            loss, a, d = bce_dice_loss(pred, self._mask(batch, pred, what),
                                       dice_weight=self.options["dice_weight"], return_parts=True)
            comps = {"bce": a, "dice": d}
        else:
            label = self._label(batch, pred)
            if label is None:  # one-hot (or soft) mask with one channel per class
                label = self._mask(batch, pred, what).argmax(1)
            loss, a, d = ce_dice_loss(pred, label, dice_weight=self.options["dice_weight"], return_parts=True)
            comps = {"ce": a, "dice": d}
        return self._with_components(loss, comps)


def loss_class(card: Mapping[str, Any], outputs: Mapping[str, Any]):
    """The loss class for a card (with its preset's outputs)."""
    if card.get("architecture", {}).get("class") == "M2SNet":  # M2SNet and its MSNet variant
        return M2SNetLoss
    if outputs.get("multi_label"):
        return LSegLoss
    if outputs.get("edge_output"):
        return BSNetLoss
    return DiceCELoss


def build_loss(model_name: str, preset: Optional[str] = None, **options) -> SegmentationLoss:
    """The training loss of ``model_name`` (registry name or alias) for task ``preset``
    (default: the card's default preset). Options depend on the network (an unknown
    option is an error that lists the accepted ones); None means "the default"."""
    from .. import models
    card = models.card(model_name)
    spec = models.preset(card["name"], preset)
    return loss_class(card, spec["outputs"])(card["name"], spec["name"], spec["outputs"], options)
