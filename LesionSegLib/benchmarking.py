"""What ``lesionseg benchmark`` measures with: peak memory and timing of one call, the
synthetic volume, and the reference loop shaped like the papers' official predict
scripts (see :mod:`LesionSegLib.commands.benchmark`)."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Optional


# ---------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory of this process above its level at ``__enter__``: on Linux the
    kernel's high-water mark of resident memory (VmHWM, reset through
    /proc/self/clear_refs, so nothing runs beside the measured code), elsewhere RSS
    sampled every 10 ms by a thread; on a GPU CUDA's peak allocation."""

    def __init__(self, device) -> None:
        self.device = device
        self.peak_bytes: Optional[int] = None
        self._thread = None

    @staticmethod
    def _status(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None

    @staticmethod
    def _reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._status("VmRSS")
        self._hwm = self._base is not None and self._reset_high_water_mark()
        if self._base is not None and not self._hwm:
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            v = self._status("VmRSS")
            if v is not None and v > self._max:
                self._max = v

    def __exit__(self, *exc) -> None:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._base is None:
            return
        if self._hwm:
            peak = self._status("VmHWM")
            self.peak_bytes = None if peak is None else max(0, peak - self._base)
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._max, self._status("VmRSS") or 0) - self._base


def load_average() -> Optional[float]:
    """1-minute load average: other work on the machine slows the reference loop (many
    small, synchronised operations) more than batched inference, so it goes with every row."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def timed(fn, device, cpu_times: Optional[List[float]] = None):
    """Wall time of ``fn()`` (and, into ``cpu_times``, the CPU time this process spent:
    on a machine shared with other work it varies less than the wall time)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c0)
    return time.perf_counter() - t0, result


# ---------------------------------------------------------------------- inputs
def synthetic_volume(card: Dict[str, Any], slices: int, side: int, seed: int = 0):
    """A volume the network can take: RGB uint8 images (colour networks without
    grey_to_rgb) or CT-like int16 slices (air, body, lungs, a few bright spots), with a
    RAS direction like a NIfTI file, so orientation handling is part of the timing."""
    import numpy as np
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    body = (yy / 0.42) ** 2 + (xx / 0.48) ** 2 < 1
    lungs = ((yy / 0.3) ** 2 + ((np.abs(xx) - 0.2) / 0.16) ** 2) < 1
    spec = card["input"]
    colour = int(spec["channels"]) == 3 and spec.get("grey_to_rgb") != "replicate"
    if colour:
        disc = (yy ** 2 + xx ** 2 < 0.2).astype(np.float32)
        base = np.stack([disc * 180, disc * 80, disc * 30], -1)
        vol = np.empty((slices, side, side, 3), np.uint8)
        for z in range(slices):
            vol[z] = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        img = sitk.GetImageFromArray(vol, isVector=True)
    else:
        vol = np.empty((slices, side, side), np.int16)
        for z in range(slices):
            s = np.where(body, 40.0, -1000.0)
            s[lungs] = -850.0
            s += rng.normal(0, 25, s.shape)
            vol[z] = s.astype(np.int16)
        img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.7, 1.5))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return img


# ---------------------------------------------------------------------- the reference
def reference_loop(model, name: str, card: Dict[str, Any], image, size, threshold: float = 0.5):
    """Segment ``image`` the way the official predict scripts do: one slice at a time,
    batch 1, fp32, the network as built, the slice prepared with numpy and resized with
    PIL on the CPU, the logits resized back with ``F.interpolate`` and thresholded."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F
    from . import models
    from .preprocessing import arrange_channels, plan_intensity
    spec = card["input"]
    arr = sitk.GetArrayViewFromImage(image)
    transform = plan_intensity(arr, spec)  # the official data were prepared per volume, offline
    h, w = size
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is present wherever torchvision is
        Image = None
    out = np.zeros(arr.shape[:3], np.uint8)
    colour = arr.ndim == 4
    softmax = models.Outputs.of(card).softmax
    with torch.no_grad():
        for z in range(arr.shape[0]):
            sl = arr[z].astype(np.float32)
            if transform.lo is not None or transform.hi is not None:
                sl = np.clip(sl, transform.lo, transform.hi)
            planes = [sl[..., c] for c in range(sl.shape[-1])] if colour else [sl]
            if Image is not None:
                resized = np.stack([np.asarray(Image.fromarray(p, mode="F").resize((w, h), Image.BILINEAR))
                                    for p in planes])
            else:
                resized = F.interpolate(torch.from_numpy(np.stack(planes))[None], size=(h, w), mode="bilinear",
                                        align_corners=False, antialias=True)[0].numpy()
            x = arrange_channels(resized if colour else resized[0], spec, channel_axis=0, color=colour)
            x = torch.from_numpy(np.ascontiguousarray(transform.apply(np.ascontiguousarray(x), channel_axis=0)))[None]
            logits = models.inference_output(name, model(x))
            logits = F.interpolate(logits, size=arr.shape[1:3], mode="bilinear", align_corners=False)
            if softmax:
                out[z] = torch.softmax(logits, 1)[0].argmax(0).numpy().astype(np.uint8)
            else:
                out[z] = (torch.sigmoid(logits)[0].max(0).values > threshold).numpy().astype(np.uint8)
    return out
