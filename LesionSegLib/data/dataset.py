"""Training samples as tensors: the augmentation and resizing of the samples of a source
(:mod:`.sources`: 2D folders, 3D volumes, in-memory cases), and the resumable, shardable
epoch sampler.

A sample is a dict of tensors (collated into the batch of the losses contract):
``image`` (C, H, W) float32, normalised from the model card (:mod:`LesionSegLib.preprocessing`);
``mask`` (K, H, W) float in [0, 1], one channel per network output channel (softmax nets:
K = classes + background, one-hot); ``label`` (H, W) int64 class-index map (0 background);
``edge`` (1, H, W) float (only when the network has an edge output, BSNet); ``index``.

Randomness never comes from global generators: the sampler derives each epoch's order,
each batch's size and each sample's augmentation from ``(seed, epoch, position)``. The
data stream is therefore a pure function of the seed and the position in training, which
is what makes a run resumed mid-epoch identical to an uninterrupted one, independent of
the number of loader workers.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .images import derive_edge
from .sources import TargetSpec

Size = Tuple[int, int]


# --------------------------------------------------------------------------- geometry
def _theta(in_hw: Size, field_hw: Tuple[float, float], angle_deg: float, hflip: bool, vflip: bool,
           centre: Tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Affine map from output to input normalised coordinates (align_corners=False):
    the output shows a ``field_hw`` window (input pixels) centred on the image (moved by
    ``centre`` = (dy, dx) pixels), rotated by ``angle_deg`` and flipped, whatever the
    output size. Built in pixel units so that rotations of non-square images are not
    sheared."""
    h, w = in_hw
    fh, fw = field_hw
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    flip = np.diag([-1.0 if hflip else 1.0, -1.0 if vflip else 1.0])
    m = np.diag([2.0 / w, 2.0 / h]) @ rot @ np.diag([fw / 2.0, fh / 2.0]) @ flip
    t = np.zeros((1, 2, 3))
    t[0, :, :2] = m
    t[0, :, 2] = [2.0 * centre[1] / w, 2.0 * centre[0] / h]
    return torch.as_tensor(t, dtype=torch.float32)


def warp(x: torch.Tensor, out_hw: Size, *, field_hw=None, angle: float = 0.0, hflip: bool = False,
         vflip: bool = False, mode: str = "bilinear", centre: Tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Resample (N, H, W) float maps to ``out_hw``: resize (``field_hw`` None: the whole
    image) or crop/pad (``field_hw`` = ``out_hw`` at matching pixel size; centred on the
    image, moved by ``centre`` = (dy, dx) pixels), with a rotation and flips, in one
    ``grid_sample`` (outside the image: 0)."""
    in_hw = tuple(x.shape[-2:])
    field_hw = in_hw if field_hw is None else field_hw
    identity = angle == 0 and not hflip and not vflip and tuple(field_hw) == in_hw and not any(centre)
    if identity and tuple(out_hw) == in_hw:
        return x
    theta = _theta(in_hw, field_hw, angle, hflip, vflip, centre)
    grid = F.affine_grid(theta, [1, x.shape[0], int(out_hw[0]), int(out_hw[1])], align_corners=False)
    return F.grid_sample(x[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


# --------------------------------------------------------------------------- dataset
class SegmentationDataset(torch.utils.data.Dataset):
    """Samples of a source, keyed by ``(index, augmentation seed, (H, W))`` (the epoch
    sampler's keys) or a plain index (no augmentation, ``size``)."""

    def __init__(self, source, spec: TargetSpec, size: Size, augment: Optional[Dict[str, Any]] = None,
                 mask_interpolation: str = "bilinear", fit: str = "resize", crop_from: Optional[Size] = None):
        """``fit``: ``resize`` (the whole image to the sample size), ``crop`` (centre crop
        at the source's pixel size: volumes resampled to the card's spacing), or ``tile``:
        random crops of the sample size from the image seen at ``crop_from`` (H, W) — the
        resolution the network is used at, so that full-resolution images (IDRiD fundus,
        4288×2848) train on tiles while the predictor resizes the whole image to
        ``crop_from``. Without augmentation (validation) ``tile`` resizes to ``crop_from``."""
        self.source = source
        self.spec = spec
        self.size = tuple(int(s) for s in size)
        self.augment = dict(augment or {})
        self.mask_interpolation = mask_interpolation
        self.fit = fit
        self.crop_from = tuple(int(v) for v in crop_from) if crop_from else None
        if fit == "tile" and self.crop_from is None:
            raise ValueError("fit='tile' needs crop_from (the image size the tiles are cut from)")

    def __len__(self) -> int:
        return len(self.source)

    def _aug_params(self, seed: Optional[int]) -> Dict[str, Any]:
        a = self.augment
        if seed is None or not a:
            return {"angle": 0.0, "hflip": False, "vflip": False, "scale": 1.0, "position": (0.5, 0.5)}
        rng = np.random.default_rng(seed)
        # draw every parameter whether or not it is enabled, so that enabling one option
        # does not change the others' random streams
        u = rng.random(6)  # the last two: the tile position (fit="tile")
        rot = float(a.get("rotate", 0) or 0)
        lo, hi = a.get("scale") or (1.0, 1.0)
        return {"hflip": bool(u[0] < float(a.get("hflip", 0) or 0)),
                "vflip": bool(u[1] < float(a.get("vflip", 0) or 0)),
                "angle": (2 * u[2] - 1) * rot,
                "scale": float(lo + (hi - lo) * u[3]),
                "position": (float(u[4]), float(u[5]))}

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed, size = key
        else:
            index, seed, size = int(key), None, self.size
        x, lab, edge, _ = self.source.load(index)
        p = self._aug_params(seed)
        spec = self.spec
        h, w = lab.shape[-2:]
        centre = (0.0, 0.0)
        if self.fit == "tile" and seed is None:
            size = self.crop_from  # validation: the whole image at the resolution of use
            field = (h / p["scale"], w / p["scale"])
        elif self.fit == "tile":
            sy, sx = h / self.crop_from[0], w / self.crop_from[1]
            field = (size[0] * sy / p["scale"], size[1] * sx / p["scale"])
            # the tile's centre anywhere that keeps the tile inside the image
            centre = tuple((u - 0.5) * max(0.0, extent - f) for u, extent, f in zip(p["position"], (h, w), field))
        elif self.fit == "crop":
            field = (size[0] / p["scale"], size[1] / p["scale"])
        else:
            field = (h / p["scale"], w / p["scale"])
        geo = dict(field_hw=field, angle=p["angle"], hflip=p["hflip"], vflip=p["vflip"], centre=centre)
        image = warp(torch.from_numpy(np.ascontiguousarray(x)), size, **geo)
        if lab.ndim == 3:  # multi-label (K, H, W): each class its own channel, overlaps kept
            mode = "nearest" if self.mask_interpolation == "nearest" else "bilinear"
            fg = warp(torch.from_numpy(np.ascontiguousarray(lab)).float(), size, mode=mode, **geo).clamp(0, 1)
        elif self.mask_interpolation == "nearest":
            lab_t = torch.from_numpy(np.ascontiguousarray(lab)).long()
            lab_w = warp(lab_t[None].float(), size, mode="nearest", **geo)[0].round().long()
            fg = F.one_hot(lab_w, spec.n_classes + 1).permute(2, 0, 1)[1:].float()
        else:
            onehot = torch.from_numpy(np.stack([lab == c for c in range(1, spec.n_classes + 1)]).astype(np.float32))
            fg = warp(onehot, size, **geo).clamp(0, 1)
        bg = (1 - fg.sum(0, keepdim=True)).clamp(0, 1)
        label = torch.cat([bg, fg]).argmax(0)
        sample = {"image": image.contiguous(), "mask": (torch.cat([bg, fg]) if spec.softmax else fg).contiguous(),
                  "label": label, "index": torch.tensor(index)}
        if spec.edges:
            e = derive_edge(lab) if edge is None else edge
            sample["edge"] = warp(torch.from_numpy(e.astype(np.float32))[None], size, **geo).clamp(0, 1)
        return sample


# --------------------------------------------------------------------------- sampler
def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, augmentation seed, size)`` keys for one epoch at a time.

    The epoch order is a permutation (or, with ``weights``, a weighted draw with
    replacement: lesion-slice oversampling) from ``(seed, epoch)``; ``epoch_length``
    (default: the number of samples) fixes the samples per epoch, by whole permutations.
    Sharded like ``DistributedSampler``: the order is padded to a multiple of
    ``world_size`` and rank r takes every world_size-th key from r, so every rank has
    the same number of steps. ``sizes``: one size per batch drawn from the list
    (``"random"``, M2SNet), or every batch repeated at each size (``"cycle"``, Inf-Net's
    multi-scale loop). ``start`` skips the first batches (resuming mid-epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, *, sizes: Sequence[Size], size_mode: str = "random",
                 weights: Optional[np.ndarray] = None, shuffle: bool = True, drop_last: Optional[bool] = None,
                 rank: int = 0, world_size: int = 1, augment: bool = True, epoch_length: Optional[int] = None):
        if n <= 0:
            raise DataError("no training samples")
        self.n, self.batch_size, self.seed = n, int(batch_size), int(seed)
        self.length = int(epoch_length) if epoch_length else n
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.size_mode = size_mode
        self.weights = weights
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(self.length / world_size)
        self.drop_last = (self.per_rank >= 2 * self.batch_size) if drop_last is None else drop_last
        self.augment = augment
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def _batches(self) -> int:
        b = self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)
        return max(b, 1)

    def __len__(self) -> int:
        reps = len(self.sizes) if self.size_mode == "cycle" else 1
        return max(0, self._batches() * reps - self.start)

    def epoch_keys(self) -> List[List[Tuple[int, int, Size]]]:
        rng = np.random.default_rng(_seed(self.seed, self.epoch, 1))
        if self.weights is not None:
            order = rng.choice(self.n, size=self.length, replace=True, p=self.weights)
        else:
            # whole passes over the data (each a permutation) until the epoch length
            passes = [rng.permutation(self.n) if self.shuffle else np.arange(self.n)
                      for _ in range(math.ceil(self.length / self.n))]
            order = np.concatenate(passes)[: self.length]
        total = self.per_rank * self.world_size
        if total > self.length:  # pad by repeating from the start, as DistributedSampler
            order = np.concatenate([order, order[: total - self.length]])
        positions = np.arange(total)[self.rank::self.world_size]
        mine = order[self.rank::self.world_size]
        batches = []
        for b in range(self._batches()):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            pos = positions[b * self.batch_size:(b + 1) * self.batch_size]
            if self.size_mode == "cycle":
                sizes = self.sizes
            else:
                pick = np.random.default_rng(_seed(self.seed, self.epoch, 2, b)).integers(len(self.sizes))
                sizes = [self.sizes[int(pick)]]
            for si, s in enumerate(sizes):
                batches.append([(int(i), _seed(self.seed, self.epoch, 3, int(q), si) if self.augment else None, s)
                                for i, q in zip(idx, pos)])
        return batches

    def __iter__(self) -> Iterator[List[Tuple[int, int, Size]]]:
        yield from self.epoch_keys()[self.start:]


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
