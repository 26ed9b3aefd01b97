"""From raw pixels to the network's input: the Predictor's data step.

:class:`InputPreparer` knows a network's input (its card's ``input`` section, the
number of channels the network takes, its 2.5D context) and turns a batch of raw
slices on the device into normalised network inputs; :func:`volume_input` checks a
volume and views its voxels without copying.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..preprocessing import InputError, arrange_channels, plan_intensity, replace_nonfinite, size_for
from .geometry import Canonical
from .staging import Stager


@dataclass(frozen=True)
class InputPlan:
    """How raw pixels become the network's input channels (see :meth:`InputPreparer.plan`)."""
    lo: Optional[float]
    hi: Optional[float]
    affine: Any                         # IntensityTransform without clip
    channel_index: Optional[Tuple[int, ...]]   # source component per network channel (colour inputs)
    replicate: int                      # grey → this many identical channels (1: none)
    context: int                        # k of a 2.5D network (2k+1 slices as channels)
    channels: int                       # network input channels


def model_in_channels(model: nn.Module, config: Optional[Dict[str, Any]]) -> int:
    for cfg in (config, getattr(model, "lesionseg_config", None)):
        if cfg and "in_channels" in cfg:
            return int(cfg["in_channels"])
    # every registered network's first weight of rank >= 4 is its stem convolution
    # (C_out, C_in, kh, kw), or a dynamic convolution's bank (K, C_out, C_in, kh, kw)
    for p in model.parameters():
        if p.dim() >= 4:
            return int(p.shape[-3])
    raise InputError("cannot tell how many input channels the network takes")


class InputPreparer:
    """The input rules of one network: ``spec`` (the card's ``input``), the channels the
    network takes and, for a 2.5D network, the ``k`` neighbours on each side."""

    def __init__(self, name: str, preset: Optional[str], spec: Dict[str, Any], in_channels: int,
                 channels_last: bool) -> None:
        if models.Inputs.of(spec).dims != 2:
            raise InputError(f"{name}: only 2-D networks are supported by the predictor")
        self.name, self.spec, self.in_channels, self.channels_last = name, spec, int(in_channels), channels_last
        # 2.5D: a network taking 2k+1 channels where the preset feeds one slice
        want = int(spec["channels"])
        self.slice_context = 0
        if self.in_channels != want:
            if spec.get("slice_context") and want == 1 and self.in_channels % 2 == 1:
                self.slice_context = (self.in_channels - 1) // 2
            else:
                raise InputError(f"{name}: the network takes {self.in_channels} input channel(s) but preset "
                                 f"{preset!r} provides {want}; load it with the preset it was trained with")

    def plan(self, array: np.ndarray, components: int, window, eight_bit=None) -> InputPlan:
        transform = plan_intensity(array, self.spec, window=window, eight_bit=eight_bit)
        affine = replace(transform, lo=None, hi=None)
        if self.slice_context:
            if components > 1:
                raise InputError(f"{self.name} reads {2 * self.slice_context + 1} neighbouring slices of a "
                                 f"single-component volume; this one has {components} components")
            return InputPlan(transform.lo, transform.hi, affine, None, 1, self.slice_context, self.in_channels)
        # the channel rules of preprocessing.arrange_channels, learnt on a tiny index image
        # so that they run on the device and errors read the same everywhere
        if components > 1:
            idx = arrange_channels(np.arange(components).reshape(1, 1, components), self.spec, channel_axis=-1,
                                   color=True)[:, 0, 0]
            index, replicate = tuple(int(i) for i in idx), 1
        else:
            rep = arrange_channels(np.zeros((1, 1)), self.spec, color=False)
            index, replicate = None, int(rep.shape[0])
        channels = len(index) if index is not None else replicate
        if channels != self.in_channels:
            raise InputError(f"{self.name}: the image gives {channels} channel(s), "
                             f"the network takes {self.in_channels}")
        return InputPlan(transform.lo, transform.hi, affine, index, replicate, 0, channels)

    def tensor(self, raw: torch.Tensor, plan: InputPlan, size: Optional[Tuple[int, int]] = None,
               pad_to: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Raw pixels on the device → normalised network input (B, C, h, w).

        ``raw``: (N, Y, X) slices (N = B + 2k for a 2.5D network), or (N, Y, X, comps).
        The clip comes before the resize (as when an 8-bit windowed slice is resized) and
        the per-channel affine after it (linear maps commute with bilinear resizing), so
        a grey slice is resized once and only then replicated to 3 channels."""
        k = plan.context
        if k:
            x = raw.unfold(0, 2 * k + 1, 1).permute(0, 3, 1, 2)
        elif raw.dim() == 4:
            x = raw.permute(0, 3, 1, 2)
        else:
            x = raw.unsqueeze(1)
        x = x.float()
        if plan.affine.nan is not None:  # NaN/Inf voxels, before they can spread in the resize
            x = replace_nonfinite(x, plan.affine.nan, plan.lo, plan.hi)
        if plan.channel_index is not None and plan.channel_index != tuple(range(x.shape[1])):
            x = x[:, list(plan.channel_index)]
        if plan.lo is not None or plan.hi is not None:
            x = x.clamp(plan.lo, plan.hi)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)
        if plan.replicate > 1:
            x = x.expand(-1, plan.replicate, -1, -1)
        x = plan.affine.apply(x, channel_axis=1)
        if pad_to is not None and tuple(pad_to) != tuple(x.shape[-2:]):
            x = F.pad(x, (0, pad_to[1] - x.shape[-1], 0, pad_to[0] - x.shape[-2]), mode="replicate")
        return self.memory_format(x)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def sizes(self, shape: Tuple[int, int], mode: str):
        """(resize target or None, pad target or None, network input size) for a slice."""
        if mode == "resize":
            size = size_for(shape, self.spec)
            return size, None, size
        if mode == "native":
            padded = size_for(shape, self.spec, native=True)
            return None, padded, padded
        raise ValueError(f"unknown mode {mode!r}; use 'resize' or 'native' (images also 'tile')")

    def tile_layout(self, shape: Tuple[int, int], tile_size) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(tile, padded image) sizes for tiled prediction of an image of ``shape``."""
        sizes = models.Inputs.of(self.spec)
        div, min_size = sizes.size_divisor, sizes.min_size
        want = tuple(tile_size) if tile_size else tuple(size_for(shape, self.spec))
        # a tile never exceeds the (divisor-rounded) image, and is a valid network input
        tile = tuple(max(min_size, -(-min(int(t), s) // div) * div) for t, s in zip(want, shape))
        # the image is padded to a multiple of the divisor (and at least one tile), so that
        # tiles can start on the network's pooling grid (see tiling.tile_starts)
        full = tuple(max(-(-s // div) * div, t) for s, t in zip(shape, tile))
        return tile, full

    def examples(self, image, size: Optional[Tuple[int, int]] = None, window: Optional[dict] = None,
                 max_slices: int = 16) -> np.ndarray:
        """The network's input float32 (N, C, h, w), normalised as for inference, of a 2-D
        image (numpy (H, W[, C]): N = 1) or of up to ``max_slices`` evenly spread slices
        of a volume (a ``SimpleITK.Image``); resized to ``size`` (default: the card's
        size for the slice, as ``mode='resize'``)."""
        stager = Stager(torch.device("cpu"))
        with torch.inference_mode():
            if isinstance(image, np.ndarray):
                img = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
                plan = self.plan(img, img.shape[2] if img.ndim == 3 else 1, window)
                target = tuple(size) if size else self.sizes(img.shape[:2], "resize")[0]
                return self.tensor(stager.upload(img[None]), plan, target, None).float().contiguous().numpy()
            array, geom, components, _ = volume_input(image, None, None, None)
            canon = Canonical.of(geom["size"], geom["spacing"], geom["direction"])
            cview = canon.view(array)
            nz, ny, nx = canon.canonical_shape
            plan = self.plan(array, components, window)
            target = tuple(size) if size else self.sizes((ny, nx), "resize")[0]
            k = plan.context
            zs = np.unique(np.linspace(0, nz - 1, min(nz, max_slices)).round().astype(int))
            return np.concatenate([
                self.tensor(stager.upload(cview[np.clip(np.arange(z - k, z + k + 1), 0, nz - 1)]), plan, target,
                            None).float().contiguous().numpy() for z in zs])


def volume_input(image, spacing, origin, direction):
    """(array view (z, y, x[, c]), geometry, components, SimpleITK image or None)."""
    import SimpleITK as sitk
    if isinstance(image, sitk.Image):
        dim = image.GetDimension()
        if dim == 2:
            raise InputError("this is a 2-D image; segment it with predict_image")
        if dim != 3:
            raise InputError(f"{dim}-D images are not supported; pass a 3-D volume (one time point or echo)")
        if image.GetNumberOfPixels() == 0:
            raise InputError("the volume is empty")
        components = image.GetNumberOfComponentsPerPixel()
        if "complex" in image.GetPixelIDTypeAsString().lower():
            raise InputError("complex-valued volumes cannot be segmented; take the magnitude first")
        array = sitk.GetArrayViewFromImage(image)
        geom = {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                "direction": image.GetDirection()}
        _check_geometry(geom)
        return array, geom, components, image
    array = np.asarray(image)
    if array.ndim not in (3, 4) or array.size == 0:
        raise InputError(f"a volume array must be (z, y, x) or (z, y, x, components), not shape {array.shape}")
    components = array.shape[3] if array.ndim == 4 else 1
    size = tuple(int(s) for s in reversed(array.shape[:3]))
    geom = {"size": size,
            "spacing": tuple(float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0))),
            "origin": tuple(float(s) for s in (origin if origin is not None else (0.0, 0.0, 0.0))),
            "direction": tuple(float(s) for s in (direction if direction is not None else np.eye(3).ravel()))}
    if len(geom["spacing"]) != 3 or len(geom["origin"]) != 3 or len(geom["direction"]) != 9:
        raise InputError("spacing and origin need 3 numbers and direction 9 (row-major) for a volume")
    _check_geometry(geom)
    return array, geom, components, None


def _check_geometry(geom) -> None:
    from ..validation import check_geometry
    try:
        check_geometry(geom["spacing"], geom["origin"], geom["direction"], "the volume")
    except ValueError as e:
        raise InputError(str(e)) from None
