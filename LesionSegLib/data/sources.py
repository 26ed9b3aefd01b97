"""Where training samples come from: 2D image/mask folders (:class:`FolderSource`) and
3D volumes or in-memory cases (:class:`VolumeSource`, slices with context), each giving
normalised images and the targets of the network's outputs (:func:`target_spec`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import models, preprocessing
from .errors import DataError
from .folders import ImagePair
from .images import read_image, read_mask
from .volumes import VolumeCase



@dataclass(frozen=True)
class TargetSpec:
    """What the network's outputs need from a mask."""
    n_classes: int          # foreground classes (label values 1..n_classes)
    channels: int           # K of batch["mask"]
    softmax: bool           # mask includes background as channel 0 (one-hot)
    multi_label: bool
    edges: bool             # batch carries "edge"
    classes: Tuple[Dict[str, Any], ...] = ()


def target_spec(model_name: str, preset: Dict[str, Any], model_config: Optional[Dict[str, Any]] = None) -> TargetSpec:
    """Channels of ``batch['mask']`` for a network built with ``model_config``.

    The card's ``outputs`` decide (sigmoid: one channel per class; multi_label: L-Seg's 4);
    a network built with ``num_classes > 1`` whose card says sigmoid (U-Net, MS-LKSeg) is
    a softmax network with background as channel 0, as the U-Net card states."""
    outputs = models.Outputs.of(preset)
    classes = tuple(preset.get("classes", ()))
    cfg = model_config or {}
    ch = outputs.channels_for(max(1, len(classes)))
    for key in ("num_classes", "n_class", "out_channels"):
        if key in cfg:
            ch = int(cfg[key])
    softmax = outputs.softmax or (ch > 1 and not outputs.multi_label)
    n = ch - 1 if softmax else ch
    if n < 1:
        raise DataError(f"{model_name}: a softmax network needs at least 2 output channels")
    return TargetSpec(n, ch, softmax, outputs.multi_label, outputs.edge_output, classes)


def _apply_intensity(transform: preprocessing.IntensityTransform, x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    if len(transform.scale) not in (1, n):
        # 2.5D stacks on a network whose card has per-colour statistics: one mean map for all
        transform = preprocessing.IntensityTransform(transform.lo, transform.hi, (float(np.mean(transform.scale)),),
                                                     (float(np.mean(transform.shift)),))
    return transform.apply(x.astype(np.float32), channel_axis=0)


class FolderSource:
    """2D image/mask files. :meth:`check` reads every file once (errors name the file)
    and keeps the decoded pixels in memory when they fit ``cache_bytes``."""

    kind = "folder"

    def __init__(self, pairs: Sequence[ImagePair], input_spec: Dict[str, Any], spec: TargetSpec,
                 cache_bytes: int = 2 << 30):
        self.pairs = list(pairs)
        self.input_spec = input_spec
        self.spec = spec
        self.cache_bytes = cache_bytes
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = {}
        self.weights = None

    def __len__(self) -> int:
        return len(self.pairs)

    def case(self, i: int) -> str:
        return self.pairs[i].case

    def _read(self, i: int):
        p = self.pairs[i]
        # grey saved as RGB is grey for a one-channel network, colour for the others
        img = read_image(p.image, grey_if_equal=int(self.input_spec["channels"]) == 1)
        if isinstance(p.mask, tuple):  # one binary file per class: (K, H, W) multi-label target
            lab = np.stack([read_mask(m) for m in p.mask]).astype(np.uint8)
            for m, layer in zip(p.mask, lab):
                if img.shape[:2] != layer.shape:
                    raise DataError(f"{m}: mask is {layer.shape[1]}x{layer.shape[0]} (WxH) but image "
                                    f"{p.image.name} is {img.shape[1]}x{img.shape[0]}")
            return img, lab, None
        lab = read_mask(p.mask, self.spec.classes, self.spec.n_classes)
        if img.shape[:2] != lab.shape:
            raise DataError(f"{p.mask}: mask is {lab.shape[1]}x{lab.shape[0]} (WxH) but image {p.image.name} is "
                            f"{img.shape[1]}x{img.shape[0]}")
        edge = None
        if self.spec.edges and p.edge is not None:
            e = read_image(p.edge)
            if e.ndim == 3:
                e = e[..., 0]
            if e.shape != lab.shape:
                raise DataError(f"{p.edge}: edge map is {e.shape[1]}x{e.shape[0]} but image {p.image.name} is "
                                f"{img.shape[1]}x{img.shape[0]}")
            edge = (e >= 128).astype(np.uint8) if e.max(initial=0) > 1 else (e > 0).astype(np.uint8)
        return img, lab, edge

    def check(self) -> Dict[str, Any]:
        problems: List[str] = []
        fg_images, total = 0, 0
        used = 0
        for i, p in enumerate(self.pairs):
            try:
                img, lab, edge = self._read(i)
                preprocessing.arrange_channels(img, self.input_spec)
            except DataError as e:
                problems.append(str(e))
                continue
            except preprocessing.InputError as e:
                problems.append(f"{p.image}: {e}")
                continue
            fg_images += bool(lab.any())
            size = img.nbytes + lab.astype(np.uint8).nbytes
            if used + size <= self.cache_bytes:
                self._cache[i] = (img, lab.astype(np.uint8) if lab.max(initial=0) < 256 else lab, edge)
                used += size
            total += 1
            if len(problems) >= 10:
                break
        if problems:
            more = " (first 10 shown)" if len(problems) >= 10 else ""
            raise DataError(f"unusable training data{more}:\n  " + "\n  ".join(problems))
        if fg_images == 0:
            raise DataError(f"all {total} masks are empty (no lesion pixel in any mask under "
                            f"{self.pairs[0].mask.parent}): nothing to learn")
        return {"images": total, "images_with_lesion": fg_images}

    def load(self, i: int):
        img, lab, edge = self._cache[i] if i in self._cache else self._read(i)
        x = preprocessing.arrange_channels(img, self.input_spec)
        transform = preprocessing.plan_intensity(img, self.input_spec)
        x = _apply_intensity(transform, x)
        # per-class masks stay uint8 (K, H, W): full-resolution fundus stacks are large
        return x, (lab if lab.ndim == 3 else np.asarray(lab, np.int64)), edge, None


class VolumeSource:
    """Axial slices of 3D cases; ``context`` neighbouring slices on each side as channels
    (2.5D, edge slices repeated); lesion-bearing slices oversampled to ``lesion_fraction``
    of the draws (None: every slice equally often)."""

    kind = "volumes"

    def __init__(self, cases: Sequence[VolumeCase], input_spec: Dict[str, Any], spec: TargetSpec,
                 context: int = 0, lesion_fraction: Optional[float] = 0.5, pixel_spacing=None):
        self.cases = list(cases)
        self.input_spec = input_spec
        self.spec = spec
        self.context = int(context)
        self.pixel_spacing = pixel_spacing
        self.items: List[Tuple[int, int]] = [(c, z) for c, vc in enumerate(self.cases) for z in range(vc.image.shape[0])]
        self.transforms = []
        for vc in self.cases:
            try:
                self.transforms.append(preprocessing.plan_intensity(vc.image, input_spec))
            except preprocessing.InputError as e:
                raise DataError(f"{vc.source or vc.case}: {e}") from None
        lesion = np.array([bool(self.cases[c].label[z].any()) for c, z in self.items])
        self.lesion = lesion
        self.weights = None
        if lesion_fraction is not None and 0 < lesion.sum() < len(lesion):
            frac = lesion.mean()
            if frac < lesion_fraction:
                w = np.where(lesion, lesion_fraction / frac, (1 - lesion_fraction) / (1 - frac))
                self.weights = w / w.sum()

    def __len__(self) -> int:
        return len(self.items)

    def case(self, i: int) -> str:
        return self.cases[self.items[i][0]].case

    def check(self) -> Dict[str, Any]:
        if not self.items:
            raise DataError("the volumes have no slices")
        if not self.lesion.any():
            raise DataError(f"all {len(self.cases)} label volumes are empty (no lesion voxel): nothing to learn")
        for vc in self.cases:
            try:
                self._channels(vc, 0)
            except preprocessing.InputError as e:
                raise DataError(f"{vc.source or vc.case}: {e}") from None
        return {"volumes": len(self.cases), "slices": len(self.items), "slices_with_lesion": int(self.lesion.sum())}

    def _channels(self, vc: VolumeCase, z: int) -> np.ndarray:
        if self.context:
            zs = np.clip(np.arange(z - self.context, z + self.context + 1), 0, vc.image.shape[0] - 1)
            return vc.image[zs]
        return preprocessing.arrange_channels(vc.image[z], self.input_spec, color=False)

    def load(self, i: int):
        c, z = self.items[i]
        vc = self.cases[c]
        x = _apply_intensity(self.transforms[c], self._channels(vc, z))
        lab = vc.label[z]
        return x, lab, None, vc.spacing
