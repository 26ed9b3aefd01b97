"""Intensity and channel preparation of images for a network, from its model card.

Training, inference and the Slicer module all prepare inputs here, so a network always
sees at inference what it saw in training. Every normalisation a card can ask for is a
clip followed by a per-channel affine map, planned once per image or volume
(:func:`plan_intensity`) and then applied to any number of slices, on the CPU with
numpy or on a GPU with torch (:meth:`IntensityTransform.apply` takes either).

Card ``input`` entries used:

``normalization.kind``
  * ``mean_std``: intensities brought to ``0 … scale`` (8-bit images as they are; volumes
    through the preset's CT ``window`` or, without one, their 0.5–99.5 percentile range),
    then ``(x / scale − mean[c]) / std[c]`` (ImageNet statistics for M2SNet, BSNet …);
  * ``caffe_bgr_mean``: 0–255 image in BGR channel order minus ``mean_bgr`` (L-Seg);
  * ``minmax``: clip to the volume's ``percentiles`` (default 0, 100) and scale to
    ``range`` (default 0–1) (MSE-Net, U-Net stroke presets);
  * ``zscore``: ``(x − mean) / std`` over the non-zero voxels (DWI).
``window``  ``{"center", "width"}`` in the volume's units (HU for CT).
``channels``, ``grey_to_rgb``, ``channel_order`` — see :func:`arrange_channels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

#: most voxels used to estimate percentiles / moments of a large volume (strided sample)
MAX_STATISTICS_SAMPLES = 4_000_000


class InputError(ValueError):
    """An image that the network cannot take, with the reason."""


@dataclass(frozen=True)
class IntensityTransform:
    """``y[c] = clip(x, lo, hi) · scale[c] + shift[c]`` for each model input channel c."""
    lo: Optional[float]
    hi: Optional[float]
    scale: Tuple[float, ...]
    shift: Tuple[float, ...]
    #: raw value that NaN voxels take (None: the image has none); ±Inf are clipped to lo/hi
    nan: Optional[float] = None
    #: how many voxels of the planned image were NaN or infinite (left out of the statistics)
    nonfinite: int = 0

    def apply(self, x, channel_axis: int = 1):
        """Apply to a numpy array or torch tensor whose ``channel_axis`` holds the model's
        input channels (already arranged by :func:`arrange_channels`)."""
        if self.nan is not None:
            x = replace_nonfinite(x, self.nan, self.lo, self.hi)
        if self.lo is not None or self.hi is not None:
            x = x.clip(self.lo, self.hi)
        n = x.shape[channel_axis]
        scale, shift = self.scale, self.shift
        if len(scale) == 1 and n > 1:
            scale, shift = scale * n, shift * n
        if len(scale) != n:
            raise InputError(f"normalisation has {len(scale)} channel(s), the image has {n}")
        shape = [1] * x.ndim
        shape[channel_axis] = n
        if isinstance(x, np.ndarray):
            s = np.asarray(scale, np.float32).reshape(shape)
            t = np.asarray(shift, np.float32).reshape(shape)
            return x.astype(np.float32, copy=False) * s + t
        import torch
        s = torch.tensor(scale, dtype=torch.float32, device=x.device).reshape(shape)
        t = torch.tensor(shift, dtype=torch.float32, device=x.device).reshape(shape)
        return torch.addcmul(t.to(x.dtype), x, s.to(x.dtype)) if x.is_floating_point() else x.float() * s + t


def _sample(values: np.ndarray) -> np.ndarray:
    """Strided sample of the finite values (NaN/Inf never enter the statistics)."""
    flat = values.reshape(-1)
    step = max(1, flat.size // MAX_STATISTICS_SAMPLES)
    sample = flat[::step].astype(np.float64)
    finite = np.isfinite(sample)
    if not finite.all():
        sample = sample[finite]
        if sample.size == 0:  # a sparse sample of a mostly non-finite image: take every finite value
            sample = flat[np.isfinite(flat)].astype(np.float64)
    return sample


def count_nonfinite(image: np.ndarray) -> int:
    """Number of NaN and ±Inf values (0 for integer images)."""
    image = np.asarray(image)
    if image.dtype.kind not in "fc":
        return 0
    return int(image.size - np.count_nonzero(np.isfinite(image)))


def replace_nonfinite(x, nan: float, lo: Optional[float], hi: Optional[float]):
    """NaN → ``nan``, +Inf → ``hi``, −Inf → ``lo`` (numpy array or torch tensor)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fc":
            return x
        return np.nan_to_num(x, nan=nan, posinf=hi if hi is not None else nan,
                             neginf=lo if lo is not None else nan)
    if not x.is_floating_point():
        return x
    import torch
    return torch.nan_to_num(x, nan=nan, posinf=hi if hi is not None else nan, neginf=lo if lo is not None else nan)


def _with_nonfinite(transform: "IntensityTransform", image: np.ndarray, count: int) -> "IntensityTransform":
    """The transform of an image holding ``count`` NaN/Inf voxels: clip bounds made finite
    (the finite range when there were none) and NaN voxels set to the lower bound (they
    read as the darkest tissue, i.e. background)."""
    from dataclasses import replace as _replace
    lo, hi = transform.lo, transform.hi
    if lo is None or hi is None:
        finite = np.asarray(image)[np.isfinite(image)]
        lo = float(finite.min()) if lo is None else lo
        hi = float(finite.max()) if hi is None else hi
    return _replace(transform, lo=lo, hi=hi, nan=lo, nonfinite=count)


def plan_intensity(image: np.ndarray, input_spec: Dict[str, Any], *, eight_bit: Optional[bool] = None,
                   window: Optional[Dict[str, float]] = None) -> IntensityTransform:
    """Plan the normalisation of ``image`` (a whole volume or image, raw intensities)
    for a network whose card ``input`` entry is ``input_spec``.

    ``eight_bit``: the image is an 8-bit rendering (PNG/JPEG slices, photographs); by
    default, true for uint8 data. ``window`` overrides the preset's CT window.
    NaN and infinite voxels are left out of the statistics; NaN voxels then take the
    lower clip bound and ±Inf the bounds (``nonfinite`` counts them).
    """
    image = np.asarray(image)
    if image.size == 0:
        raise InputError("the image is empty")
    nonfinite = count_nonfinite(image)
    if nonfinite == image.size:
        raise InputError("the image holds no finite values (every voxel is NaN or infinite)")
    if nonfinite:
        return _with_nonfinite(_plan_finite(image, input_spec, eight_bit, window), image, nonfinite)
    return _plan_finite(image, input_spec, eight_bit, window)


def _plan_finite(image: np.ndarray, input_spec: Dict[str, Any], eight_bit: Optional[bool],
                 window: Optional[Dict[str, float]]) -> IntensityTransform:
    norm = input_spec.get("normalization", {})
    kind = norm.get("kind")
    if eight_bit is None:
        eight_bit = image.dtype == np.uint8
    window = window if window is not None else input_spec.get("window")

    if kind in ("mean_std", "caffe_bgr_mean"):
        full = float(norm.get("scale", 255.0)) if kind == "mean_std" else 255.0
        if eight_bit:
            lo, hi = 0.0, 255.0
        elif window:
            lo = float(window["center"]) - float(window["width"]) / 2
            hi = float(window["center"]) + float(window["width"]) / 2
        else:
            lo, hi = (float(v) for v in np.percentile(_sample(image), (0.5, 99.5)))
        a = 255.0 / max(hi - lo, 1e-6)                      # raw → 0…255
        if kind == "mean_std":
            mean = [float(m) for m in norm["mean"]]
            std = [float(s) for s in norm["std"]]
            scale = tuple(a / full / s for s in std)          # 0…255 → /full → (−mean)/std
            shift = tuple((-lo * a / full - m) / s for m, s in zip(mean, std))
        else:
            scale = (a,) * 3
            shift = tuple(-lo * a - m for m in norm["mean_bgr"])
        return IntensityTransform(None if eight_bit else lo, None if eight_bit else hi, scale, shift)

    if kind == "minmax":
        p_lo, p_hi = norm.get("percentiles", (0.0, 100.0))
        r_lo, r_hi = norm.get("range", (0.0, 1.0))
        lo, hi = (float(v) for v in np.percentile(_sample(image), (p_lo, p_hi)))
        a = (r_hi - r_lo) / max(hi - lo, 1e-6)
        return IntensityTransform(lo, hi, (a,), (r_lo - lo * a,))

    if kind == "zscore":
        values = _sample(image)
        nonzero = values[values != 0]
        values = nonzero if nonzero.size > 0.01 * values.size else values
        mean, std = float(values.mean()), float(values.std())
        return IntensityTransform(None, None, (1.0 / max(std, 1e-6),), (-mean / max(std, 1e-6),))

    raise InputError(f"unknown normalisation kind {kind!r} in the model card")


def arrange_channels(image: np.ndarray, input_spec: Dict[str, Any], channel_axis: int = -1,
                     color: Optional[bool] = None) -> np.ndarray:
    """Bring an image's channels to what the network takes, channels first.

    ``image`` is (…, H, W) grey, or has its colour channels on ``channel_axis`` when
    ``color`` (default: the axis has 3 or 4 entries and the image has ≥ 3 dims).
    Grey to a 3-channel network is replicated (``grey_to_rgb: replicate``); RGB to a
    BGR network is reversed; alpha is dropped. Anything else is an :class:`InputError`
    naming both channel counts. Returns (C, …, H, W).
    """
    want = int(input_spec["channels"])
    order = input_spec.get("channel_order", "RGB")
    image = np.asarray(image)
    if color is None:
        color = image.ndim >= 3 and image.shape[channel_axis] in (3, 4)
    if color:
        x = np.moveaxis(image, channel_axis, 0)
        if x.shape[0] == 4:
            x = x[:3]
        if x.shape[0] == 3 and want == 3:
            return x[::-1] if order == "BGR" else x
        if x.shape[0] == want:
            return x
        if x.shape[0] == 3 and want == 1:
            raise InputError("the network takes grey images, this image is RGB; convert it to grey first "
                             "(LesionSeg does not guess a luminance formula for you)")
        raise InputError(f"the network takes {want} channel(s), the image has {x.shape[0]}")
    x = image[None]
    if want == 1:
        return x
    if want == 3 and input_spec.get("grey_to_rgb") == "replicate":
        return np.repeat(x, 3, axis=0)
    raise InputError(f"the network takes {want} channels and cannot use a grey image")


def prepare(image: np.ndarray, input_spec: Dict[str, Any], *, channel_axis: int = -1,
            color: Optional[bool] = None, eight_bit: Optional[bool] = None,
            window: Optional[Dict[str, float]] = None) -> np.ndarray:
    """Channels and intensities of one image, float32 (C, H, W): the CPU reference path."""
    transform = plan_intensity(image, input_spec, eight_bit=eight_bit, window=window)
    x = arrange_channels(image, input_spec, channel_axis=channel_axis, color=color)
    return transform.apply(x.astype(np.float32), channel_axis=0)


def size_for(shape: Sequence[int], input_spec: Dict[str, Any], native: bool = False) -> Tuple[int, int]:
    """Network input size for an image of ``shape`` (H, W): the card's ``size``, or with
    ``native`` the image's own size rounded up to ``size_divisor`` (≥ ``min_size``)."""
    if not native and input_spec.get("size"):
        h, w = input_spec["size"]
        return int(h), int(w)
    d = int(input_spec.get("size_divisor", 1))
    m = int(input_spec.get("min_size", 1))
    return tuple(max(m, -(-int(s) // d) * d) for s in shape[-2:])
