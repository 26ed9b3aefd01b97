"""L-Seg: unified multi-lesion segmentation of fundus images.

Guo, Li, Kang, Li, Zhang, Wang, "L-Seg: An end-to-end unified framework for
multi-lesion segmentation of fundus images", Neurocomputing 349 (2019) 52–63,
doi:10.1016/j.neucom.2019.04.019. Official release: github.com/guomugong/L-Seg
(a Caffe ``prototxt/lseg.prototxt`` and the loss layer; no weights, no solver).

The layer graph follows ``lseg.prototxt``; it is the HED network (Xie & Tu, ICCV 2015)
with four output channels and a per-class fusion:

* VGG-16 conv1_1 … conv5_3 (no pool5, no FC), Caffe max-pooling (output size rounded
  up, hence ``ceil_mode=True``);
* five side outputs, ``Conv1×1 → num_classes`` on relu1_2, relu2_2, relu3_3, relu4_3,
  relu5_3 (the prototxt's ``new-score-dsn1…5``). Side 1 is at full resolution; sides
  2–5 are upsampled by fixed bilinear ``Deconvolution`` (kernel 2s, stride s, ``lr_mult
  0``) and ``Crop``-ped to the input size. The crop offset is Caffe's default 0: the
  ``caffe.proto`` shipped with L-Seg is BVLC's (``CropParameter{axis, offset}``), which,
  unlike HED's own Caffe fork, does not compute alignment offsets. Side ``s`` is
  therefore shifted by about s/2 pixels towards the bottom-right relative to HED's
  aligned crop; this is kept because it is what the released prototxt computes;
* per-class fusion: for class c the c-th channel of the five side outputs is
  concatenated and fused by ``Conv1×1 5→1`` (weights initialised to the constant 0.2,
  as the prototxt's ``weight_filler``); the four fused maps are concatenated.

Outputs, all logits at the input size: ``dsn1 … dsn5, fuse``; inference uses ``fuse``.
Each channel is an independent (multi-label) sigmoid. Channel order EX, HE, MA, SE is
inferred from the released predictions (see the model card).

Reconstructed (not in the release): the bilinear values of the fixed deconvolutions
(no filler is given; HED's net-surgery script sets bilinear kernels and L-Seg's layer
names match its ``'up'`` selector) and the initialisation of the side convolutions (see
:func:`LSeg.reset_parameters`). The multi-channel bin loss is in the training code,
not here.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .blocks import SideOutput
from .vgg import VGG16Features, VGG16_STAGE_ENDS

#: stride of relu1_2 … relu5_3 relative to the input
SIDE_STRIDES = (1, 2, 4, 8, 16)

#: ``features`` indices of the conv5_x layers, which the prototxt trains with lr_mult 100/200
_CONV5_START = VGG16_STAGE_ENDS[3] + 2  # first layer after pool4


class LSeg(nn.Module):
    """L-Seg (HED-style VGG-16 with five 4-channel side outputs and per-class fusion).

    Input (B, 3, H, W): BGR, Caffe mean subtracted (B 16.3090, G 56.4373, R 116.5132),
    not scaled. Any H, W work (Caffe pooling rounds up, so every upsampled side output
    covers the input); multiples of 16 keep the stage grids exact.

    Returns ``(dsn1, dsn2, dsn3, dsn4, dsn5, fuse)``, each (B, num_classes, H, W) logits.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4, side_init_std: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.side_init_std = side_init_std
        # Caffe pooling rounds the output size up; torchvision's VGG rounds down
        self.vgg = VGG16Features(in_channels=in_channels, ceil_mode=True)
        stage_channels = (64, 128, 256, 512, 512)
        self.side_outputs = nn.ModuleList(
            SideOutput(c, num_classes, factor=s, upsample="caffe")
            for c, s in zip(stage_channels, SIDE_STRIDES))
        # one 5→1 fusion per class (prototxt fusion_channel1…4), not one 20→4 conv:
        # class c only sees channel c of each side output
        self.class_fusion = nn.ModuleList(
            nn.Conv2d(len(SIDE_STRIDES), 1, kernel_size=1) for _ in range(num_classes))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the heads (the VGG convs keep PyTorch's default until pretrained
        weights are loaded).

        * fusion convs: weight 0.2, bias 0 (prototxt ``weight_filler {constant 0.2}``,
          Caffe's default bias filler is constant 0);
        * side convs: N(0, ``side_init_std``²), bias 0. The prototxt gives no filler, so
          Caffe's default (constant 0) applied; with zero side weights no gradient
          reaches the backbone on the first step. ``side_init_std=0`` restores Caffe's
          zeros exactly.
        """
        for fusion in self.class_fusion:
            nn.init.constant_(fusion.weight, 0.2)
            nn.init.zeros_(fusion.bias)
        for side in self.side_outputs:
            if self.side_init_std > 0:
                nn.init.normal_(side.conv.weight, std=self.side_init_std)
            else:
                nn.init.zeros_(side.conv.weight)
            nn.init.zeros_(side.conv.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        size = x.shape[-2:]
        features = self.vgg.forward_stages(x)
        sides = [head(f, size) for head, f in zip(self.side_outputs, features)]
        fused = [fusion(torch.cat([s[:, c:c + 1] for s in sides], dim=1))
                 for c, fusion in enumerate(self.class_fusion)]
        return (*sides, torch.cat(fused, dim=1))

    def caffe_param_groups(self, base_lr: float, weight_decay: float = 0.0) -> List[Dict]:
        """Optimizer parameter groups with the prototxt's ``lr_mult``/``decay_mult``.

        conv1–conv4: 1 / 2 (weight / bias); conv5: 100 / 200 (as written in the
        prototxt, inherited from HED's train_val.prototxt); side convs: 0.01 / 0.02;
        fusion convs: 1 / 2. Biases have ``decay_mult 0``. The fixed upsampling kernels
        are buffers, not parameters (``lr_mult 0``). Empty groups are dropped.
        """
        mults = {  # name: (lr_mult, decay_mult)
            "conv1-4.weight": (1.0, 1.0), "conv1-4.bias": (2.0, 0.0),
            "conv5.weight": (100.0, 1.0), "conv5.bias": (200.0, 0.0),
            "side.weight": (0.01, 1.0), "side.bias": (0.02, 0.0),
            "fusion.weight": (1.0, 1.0), "fusion.bias": (2.0, 0.0),
        }
        params: Dict[str, List[nn.Parameter]] = {k: [] for k in mults}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            kind = name.rsplit(".", 1)[-1]
            if name.startswith("vgg."):
                index = int(name.split(".")[2])
                part = "conv5" if index >= _CONV5_START else "conv1-4"
            elif name.startswith("side_outputs."):
                part = "side"
            elif name.startswith("class_fusion."):
                part = "fusion"
            else:  # a parameter this method does not know would silently get no group
                raise RuntimeError(f"no lr_mult rule for parameter {name}")
            params[f"{part}.{kind}"].append(p)
        return [{"name": k, "params": params[k], "lr": base_lr * lr, "weight_decay": weight_decay * dm,
                 "lr_mult": lr, "decay_mult": dm}
                for k, (lr, dm) in mults.items() if params[k]]
