"""VGG-16 (Simonyan & Zisserman, ICLR 2015, arXiv:1409.1556) in torchvision's layout.

Used by L-Seg (HED-style side outputs on conv1_2 … conv5_3) and by M2SNet's LossNet
(frozen features at relu1_2, relu2_2, relu3_3, relu4_3). ``features`` holds the 31
layers at torchvision's indices (convs at 0, 2, 5, …, 28; pools at 4, 9, 16, 23, 30) so
that a torchvision ``vgg16`` state dict loads into it by name; the classifier is not
built (no net uses it); ``vgg_weights`` reads the files and converts input conventions.

``ceil_mode=True`` reproduces Caffe's pooling (output size rounded up), which L-Seg's
Caffe model used; torchvision's VGG rounds down. They agree on inputs divisible by 16.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

VGG16_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

#: index in ``features`` of the ReLU closing each block (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
VGG16_STAGE_ENDS = (3, 8, 15, 22, 29)


class VGG16Features(nn.Module):
    def __init__(self, in_channels: int = 3, ceil_mode: bool = False):
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for v in VGG16_CHANNELS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)

    def forward_stages(self, x: torch.Tensor, n_stages: int = 5) -> List[torch.Tensor]:
        """Outputs of relu1_2 … relu5_3 (the first ``n_stages`` of them)."""
        outs = []
        start = 0
        for end in VGG16_STAGE_ENDS[:n_stages]:
            for layer in self.features[start:end + 1]:
                x = layer(x)
            outs.append(x)
            start = end + 1
        return outs

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_stages(x)


def torchvision_vgg16_keys() -> Dict[str, tuple]:
    """Key → shape of a torchvision ``vgg16`` state dict (for checks and error messages)."""
    shapes = {k: tuple(v.shape) for k, v in VGG16Features().state_dict().items()}
    shapes.update({"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                   "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                   "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)})
    return shapes
