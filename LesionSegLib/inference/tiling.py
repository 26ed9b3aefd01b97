"""Sliding-window inference at native resolution: tile positions and smooth blending.

Large images (fundus photographs of 4288×2848 for L-Seg) are cut into overlapping
tiles of the network's input size. Each tile's class probabilities are weighted by a
window that is 1 in the tile's centre and falls smoothly (Gaussian, σ = 1/8 of the tile
side) towards its edges, where a convolutional network sees zero padding instead of
context; the weighted sum is divided by the summed weights. A pixel is therefore
decided mostly by the tile in which it is most central, and the transition from one
tile to the next is gradual: no seams.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

#: smallest window weight: keeps pixels at the image border (covered by one tile edge only) defined
MIN_WEIGHT = 1e-3
#: Gaussian σ as a fraction of the tile side
SIGMA_FRACTION = 1.0 / 8.0


def tile_starts(length: int, tile: int, overlap: float, align: int = 1) -> List[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` pixels with at
    least ``overlap`` (fraction of the tile) between neighbours; the first tile starts
    at 0 and the last ends at ``length``.

    With ``align`` (the network's size divisor; ``length − tile`` must be a multiple of
    it) every start is a multiple of ``align``: the tiles' pooling grids then coincide
    with the whole image's, so a tile computes the same features as the whole image
    wherever its receptive field stays inside the tile."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), not {overlap}")
    if length <= tile:
        return [0]
    align = max(1, int(align))
    if (length - tile) % align:
        raise ValueError(f"length − tile ({length} − {tile}) must be a multiple of align ({align})")
    span = (length - tile) // align                              # in units of align
    stride = max(1, int(tile * (1.0 - overlap)) // align)
    n = math.ceil(span / stride) + 1
    # integer rounding of evenly spread starts: every gap is ≤ the stride
    return [int(round(v)) * align for v in np.linspace(0, span, n)]


def tile_grid(shape: Tuple[int, int], tile: Tuple[int, int], overlap: float, align: int = 1) -> List[Tuple[int, int]]:
    """(y0, x0) of every tile over an image of ``shape`` (H, W), row by row."""
    return [(y, x) for y in tile_starts(shape[0], tile[0], overlap, align)
            for x in tile_starts(shape[1], tile[1], overlap, align)]


def blend_window(tile: Tuple[int, int]) -> np.ndarray:
    """Separable Gaussian weight (H, W), float32, maximum 1.

    Each 1-D profile is floored at :data:`MIN_WEIGHT` *before* the outer product: along
    the image border, where every covering tile is at its edge in one axis, the weights
    of neighbouring tiles then still differ by their other-axis profile and blend as
    smoothly as in the interior (flooring the product would make them all equal there
    and jump where one tile ends)."""
    axes = []
    for n in tile:
        c = (n - 1) / 2.0
        x = np.arange(n, dtype=np.float64)
        g = np.exp(-0.5 * ((x - c) / (SIGMA_FRACTION * n)) ** 2)
        axes.append(np.maximum(g / g.max(), MIN_WEIGHT))
    return np.outer(axes[0], axes[1]).astype(np.float32)


class TileBlender:
    """Accumulates weighted tile predictions (torch tensors, on any device).

    ``add(y0, x0, values)`` with ``values`` (B, K, th, tw) for B tiles at the listed
    positions; ``result()`` → (K, H, W) blended values."""

    def __init__(self, channels: int, shape: Tuple[int, int], tile: Tuple[int, int], device="cpu") -> None:
        import torch
        self.sum = torch.zeros((channels, *shape), dtype=torch.float32, device=device)
        self.weight = torch.zeros(shape, dtype=torch.float32, device=device)
        self.window = torch.from_numpy(blend_window(tile)).to(device)

    def add(self, positions, values) -> None:
        th, tw = self.window.shape
        for (y0, x0), v in zip(positions, values):
            self.sum[:, y0:y0 + th, x0:x0 + tw].add_(v.float() * self.window)
            self.weight[y0:y0 + th, x0:x0 + tw].add_(self.window)

    def result(self):
        return self.sum / self.weight.clamp_min(1e-12)
