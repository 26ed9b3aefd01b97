"""L-Seg's multi-channel bin loss (``MultiChannelBinSigmoidCrossEntropyLoss``).

Semantics of the released Caffe layer (guomugong/L-Seg,
``src/multi_channel_bin_sigmoid_ce_loss_layer.cpp``; parameters ``num_label`` = 4,
``key`` = 10 in ``lseg.prototxt``), for one image with logits ``x`` (C, H, W) and a
label map (H, W) whose value ``c+1`` marks class ``c``:

1. positives of class ``c``: pixels with ``label == c+1``; their loss is
   ``Σ CE(x, 1)``;
2. negatives of class ``c``: every other pixel, *including the pixels of the other
   lesion classes*, sorted into five bins by ``σ(x)``: [0, .2), [.2, .4), [.4, .6),
   [.6, .8), [.8, 1] (a probability exactly on a boundary belongs to the upper bin:
   the layer tests ``p >= 0.2`` and so on);
3. hard-negative selection: with ``P = key·#pos``, all negatives when ``P == 0``,
   otherwise the highest bins taken together (bin 4; 4+3; 4+3+2; 4+3+2+1) until their
   count reaches ``P``, and all five bins when even 4+3+2+1 stays below ``P``;
4. class balance pooled over the channels: ``cp = Σ_c #pos_c``,
   ``cn = Σ_c ⌊#selected_neg_c / num_label⌋``, and
   ``loss = Σ_c pos_loss_c · cn/(cp+cn) + Σ_c selneg_loss_c · cp/(cp+cn)``,
   with no normalisation by the pixel count. ``CE`` is the numerically stable sigmoid
   cross-entropy. The Caffe code divides by a literal 4; that is ``num_label`` in the
   prototxt, and here it is the ``num_label`` argument (default: the channel count).

Where LesionSeg differs from the released layer, deliberately:

* **batch**: the Caffe layer reads only the first image of the batch (its pixel index
  has no batch offset; L-Seg trains with batch 1). Here every image is processed on its
  own (its own selection, ``cp`` and ``cn``) and the per-image losses are **summed**,
  which equals the Caffe loss for batch 1 and its gradient accumulation over images;
* **gradient**: here the gradient is autograd's gradient of the forward value, with the
  hard-negative selection treated as a constant mask (it is piecewise constant in
  ``x``): ``(σ−1)·cn/(cp+cn)`` on positives, ``σ·cp/(cp+cn)`` on selected negatives, 0
  elsewhere. That is what the Caffe Backward intends, but its fourth branch repeats the
  third condition (bins 4+3+2 instead of 4+3+2+1), so when bins 4..1 are selected
  Caffe's backward falls through to "all negatives" while its forward used bins 4..1.
  That bug is **not** reproduced: forward and backward here always agree;
* **no positives and ``cp + cn == 0``**: with no positive pixel anywhere in the image,
  ``cp = 0`` and the whole image weighs nothing (the negatives' factor ``cp/(cp+cn)`` is
  0): as in Caffe. When also ``cn == 0`` (fewer than ``num_label`` pixels), Caffe
  divides 0 by 0 (NaN); here the loss of that image is 0;
* ``cp`` counts positive pixels directly (Caffe recovers it as ``key·#pos / key``), so
  ``key = 0`` means "all negatives, always" instead of Caffe's 0/0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .structure import as_float

#: lower edges of bins 1..4 (bin 0 starts at 0); the layer compares ``p >= edge``
BIN_EDGES = (0.2, 0.4, 0.6, 0.8)
NUM_BINS = 5
DEFAULT_KEY = 10.0


def probability_bin(prob: torch.Tensor) -> torch.Tensor:
    """Bin index 0..4 of probabilities, as the layer's ``if`` chain assigns it (a value
    on a boundary goes to the upper bin; 1.0 is in bin 4)."""
    b = torch.zeros(prob.shape, dtype=torch.long, device=prob.device)
    for edge in BIN_EDGES:
        b += (prob >= edge).long()
    return b


@dataclass
class BinSelection:
    """What the bin loss decided for a batch, per image and class (constants for autograd)."""
    positives: torch.Tensor   # (B, C, H, W) bool
    selected: torch.Tensor    # (B, C, H, W) bool: negatives that enter the loss
    bins: torch.Tensor        # (B, C, H, W) long: bin of every pixel
    bin_counts: torch.Tensor  # (B, C, 5) long: negatives per bin
    lowest_bin: torch.Tensor  # (B, C) long: selected negatives are those in bins >= this
    num_pos: torch.Tensor     # (B, C) long
    num_selected: torch.Tensor  # (B, C) long
    count_pos: torch.Tensor   # (B,) float: cp
    count_neg: torch.Tensor   # (B,) float: cn
    weight_pos: torch.Tensor  # (B,) float: cn/(cp+cn), 0 when cp+cn == 0
    weight_neg: torch.Tensor  # (B,) float: cp/(cp+cn), 0 when cp+cn == 0


def positives_from_label(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class-index map → (B, C, H, W) bool, channel c true where label == c+1.
    Values outside 1..C (0 background, an ignore value such as 255) are negatives of
    every class, as in the layer."""
    if label.dim() != 3:
        raise ValueError(f"bin loss: the label map must be (B, H, W), got {tuple(label.shape)}")
    classes = torch.arange(1, num_classes + 1, device=label.device).view(1, num_classes, 1, 1)
    return label.unsqueeze(1).long() == classes


@torch.no_grad()
def bin_selection(logits: torch.Tensor, positives: torch.Tensor, key: float = DEFAULT_KEY,
                  num_label: Optional[int] = None) -> BinSelection:
    """The layer's statistics and hard-negative selection for logits (B, C, H, W)."""
    C = logits.shape[1]
    num_label = C if num_label is None else int(num_label)
    if num_label < 1:
        raise ValueError(f"bin loss: num_label must be >= 1, got {num_label}")
    pos = positives.bool()
    neg = ~pos
    bins = probability_bin(torch.sigmoid(logits))
    num_pos = pos.flatten(2).sum(-1)                                           # (B, C)
    bin_counts = torch.stack([(neg & (bins == b)).flatten(2).sum(-1) for b in range(NUM_BINS)], -1)
    from_top = bin_counts.flip(-1).cumsum(-1).flip(-1)                         # [..., b] = Σ bins >= b
    # P = key · #pos, compared in integers (counts are integers, so count >= P ⇔ count >=
    # ceil(P)); float32 would round counts above 2^24 and float64 is missing on some devices
    if float(key).is_integer():
        wanted = int(key) * num_pos
    else:
        wanted = torch.ceil(float(key) * num_pos.double().cpu()).long().to(num_pos.device)
    # bins 4, 4+3, 4+3+2, 4+3+2+1 reach P for b = 1 … lowest, and the counts grow as b
    # falls, so the number of b in 1..4 that reach P *is* the lowest bin to take (0 = all)
    reaches = from_top[..., 1:] >= wanted.unsqueeze(-1)
    lowest_bin = torch.where(wanted == 0, torch.zeros_like(num_pos), reaches.sum(-1))
    selected = neg & (bins >= lowest_bin[..., None, None])
    num_selected = from_top.gather(-1, lowest_bin.unsqueeze(-1)).squeeze(-1)
    count_pos = num_pos.sum(1).to(logits.dtype)
    count_neg = torch.div(num_selected, num_label, rounding_mode="floor").sum(1).to(logits.dtype)
    total = count_pos + count_neg
    safe = torch.where(total > 0, total, torch.ones_like(total))
    weight_pos = torch.where(total > 0, count_neg / safe, torch.zeros_like(total))
    weight_neg = torch.where(total > 0, count_pos / safe, torch.zeros_like(total))
    return BinSelection(pos, selected, bins, bin_counts, lowest_bin, num_pos, num_selected,
                        count_pos, count_neg, weight_pos, weight_neg)


def multi_channel_bin_loss(logits: torch.Tensor, label: Optional[torch.Tensor] = None, *,
                           positives: Optional[torch.Tensor] = None, key: float = DEFAULT_KEY,
                           num_label: Optional[int] = None, return_selection: bool = False):
    """Multi-channel bin loss of logits (B, C, H, W), summed over the images.

    Positives come from ``label`` (B, H, W) (class ``c`` ↔ value ``c+1``, the layer's
    input) or, for multi-label targets that overlap, from ``positives`` (B, C, H, W)
    bool. ``num_label`` is the divisor of the negative count (Caffe's literal 4;
    default: C)."""
    if logits.dim() != 4:
        raise ValueError(f"bin loss: logits must be (B, C, H, W), got {tuple(logits.shape)}")
    logits = as_float(logits)
    if positives is None:
        if label is None:
            raise ValueError("bin loss needs a label map or a positives mask")
        if label.shape[0] != logits.shape[0] or label.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"bin loss: label {tuple(label.shape)} does not match logits {tuple(logits.shape)} "
                             "(the layer requires the same spatial size)")
        positives = positives_from_label(label, logits.shape[1])
    elif positives.shape != logits.shape:
        raise ValueError(f"bin loss: positives {tuple(positives.shape)} do not match logits {tuple(logits.shape)}")
    sel = bin_selection(logits.detach(), positives, key=key, num_label=num_label)
    target = sel.positives.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # stable sigmoid CE
    pos_loss = (ce * sel.positives).flatten(1).sum(1)     # Σ_c pos_loss_c, per image
    neg_loss = (ce * sel.selected).flatten(1).sum(1)      # Σ_c selneg_loss_c, per image
    loss = (sel.weight_pos * pos_loss + sel.weight_neg * neg_loss).sum()
    if return_selection:
        return loss, sel
    return loss
