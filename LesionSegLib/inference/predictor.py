"""The :class:`Predictor`: a trained 2D network applied to volumes and images.

What happens to a volume (``predict_volume``)
---------------------------------------------
1. Orientation (:mod:`.geometry`): the input array is viewed, without copying, in the
   canonical LPS layout (axial slices, radiological display), by a permutation and
   flips of its axes. Oblique volumes are sliced along the axis closest to axial,
   without resampling.
2. Intensities (:func:`LesionSegLib.preprocessing.plan_intensity`): planned once on the
   whole volume (window / percentiles / moments), then applied to every batch.
3. A batch of slices (with ``2k+1`` neighbours each for 2.5D networks, edge slices
   repeated) is copied to the device — through pinned, double-buffered host memory on
   CUDA, so that the copy of batch *i+1* and the write-back of batch *i* overlap the
   network's work — and there: clipped, resized (``F.interpolate``, antialiased when
   shrinking), arranged into the network's channels, normalised, stored channels-last.
4. The network (BatchNorm folded and branches re-parameterised by
   ``fuse_for_inference``; bf16/fp16 autocast on CUDA; optionally ``torch.compile``)
   produces logits, which are resized back to the slice's own size, turned into
   probabilities and decided (threshold / argmax) on the device; only uint8 labels
   (and, on request, probabilities) come back, written through the canonical view
   straight into output arrays laid out like the input.
5. Post-processing: optional removal of lesions below a size, and the lesion table.

Host memory therefore holds the input, the outputs and one batch; no float copy of the
volume is made. On CUDA the batch size is chosen from the free memory; an
out-of-memory error halves it and the batch is run again.

Images (``predict_image``) follow the same path with one of three modes: ``resize``
(to the card's input size, as the papers do), ``native`` (the whole image at its own
resolution, padded to the size divisor) and ``tile`` (overlapping tiles of the card's
size at native resolution, blended smoothly; :mod:`.tiling`).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..checkpoint import Checkpoint, CheckpointError
from ..preprocessing import InputError
from . import runtime
from .batching import BatchPlanner
from ..jobs import CancelToken, Progress, ProgressCallback
from .geometry import Canonical
from .inputs import InputPlan, InputPreparer, model_in_channels, volume_input
from ..resolver import load_network, network_card
from .outputs import OutputRules, Prediction
from .runners import RUNNERS, import_onnx
from .staging import Stager
from .tiling import TileBlender, tile_grid

log = logging.getLogger("LesionSeg")

BACKENDS = tuple(RUNNERS)


class Predictor:
    """A network ready for inference.

    ``model_or_checkpoint``: an ``nn.Module`` built by ``models.create``, a
    :class:`~LesionSegLib.checkpoint.Checkpoint`, a path to a weight file (LesionSeg
    checkpoint or official release), or a registry name (random weights — for tests and
    benchmarks only). ``preset``: task preset (default: the checkpoint's, else the card's).
    ``device``: ``auto`` (first usable CUDA GPU, else the CPU; ``device_message`` says
    which and why), ``cpu``, ``cuda[:N]``, ``mps``. ``precision``: ``auto`` (bf16 autocast
    on CUDA when supported, else fp16; on the CPU bf16 where the CPU has it natively — AMX
    or AVX512-BF16, :func:`.runtime.cpu_features` — else fp32), ``fp32``, ``bf16``,
    ``fp16``, or ``int8`` (CPU: post-training static quantization run by onnxruntime,
    :mod:`.quantization`; ``calibration``: training images, needed once per network and
    input shape, then the quantized graph comes from ``cache_dir``, default
    :func:`.quantization.cache_dir`; warns with ``PrecisionWarning`` where its masks
    disagree with fp32).
    ``batch_size``: ``auto`` (GPU: from free memory; CPU: about 4 slices of 352²) or a
    number. ``tta``: average with the left-right mirrored input. ``fuse``: fold BatchNorm /
    re-parameterise (``fuse_for_inference``; the caller's model is never modified).
    ``compile``: ``torch.compile`` the network (slow first batch, faster afterwards).
    ``backend``: ``torch`` or ``onnxruntime`` (needs the ``onnx`` extra, :mod:`.onnx`).
    """

    def __init__(self, model_or_checkpoint: Union[nn.Module, Checkpoint, str, os.PathLike],
                 preset: Optional[str] = None, device: str = "auto", precision: str = "auto",
                 batch_size: Union[int, str] = "auto", tta: bool = False, fuse: bool = True,
                 compile: bool = False, backend: str = "torch", channels_last: bool = True,
                 calibration=None, cache_dir=None) -> None:
        # settings
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self._device, self.device_message = runtime.select_device(device)
        self.device = str(self._device)
        self._batches = BatchPlanner(batch_size, self._device, "the network")
        # onnxruntime runs the exported float32 graph; 'auto' must not ask it for bf16
        auto_fp32 = backend == "onnxruntime" and (precision or "auto") == "auto"
        self.precision, self._amp_dtype = runtime.select_precision("fp32" if auto_fp32 else precision, self._device)
        if self.precision == "int8":
            backend = "onnxruntime"  # the quantized graph runs in onnxruntime
        self.backend = backend
        self.tta = bool(tta)
        self.channels_last = bool(channels_last) and backend == "torch"
        if self._device.type == "cuda":
            # every batch of a volume has the same shape: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True

        # loading
        loaded = load_network(model_or_checkpoint, preset)
        self.source = loaded.description
        if loaded.is_onnx_file:  # its network and card are stored in the file's metadata
            if backend != "onnxruntime":
                raise CheckpointError(f"{model_or_checkpoint}: an ONNX file runs with backend='onnxruntime'")
            loaded.name, loaded.card = import_onnx().read_metadata(model_or_checkpoint)
        self.name = self._batches.name = loaded.name
        self.card = network_card(loaded.name, loaded.card, preset, loaded.provenance)
        self.preset = self.card["preset"].get("name")
        self.classes: List[Dict[str, Any]] = [dict(c) for c in self.card["classes"]]
        self.provenance = loaded.provenance or {}
        self.precision, self._amp_dtype, self.precision_message = runtime.keep_masks(
            (self.precision, self._amp_dtype), precision, self._device, self.provenance)
        if self.precision_message:
            log.info("%s: %s", self.name, self.precision_message)

        # data in and out
        spec = self.card["input"]
        in_channels = (model_in_channels(loaded.model, loaded.config) if loaded.model is not None
                       else int(spec["channels"]))
        self.inputs = InputPreparer(self.name, self.preset, spec, in_channels, self.channels_last)
        self.outputs = OutputRules(self.name, self.preset, self.card["outputs"], self.classes, self._device)
        # lesions are graded (small/medium/large) only where the card or its preset defines the levels
        self.size_levels = models.lesion_size_levels(self.card)

        # the network
        self.runner = RUNNERS[backend].create(
            source=model_or_checkpoint, model=loaded.model, name=self.name, card=self.card, device=self._device,
            precision=self.precision, amp_dtype=self._amp_dtype, fuse=fuse, compile=compile,
            channels_last=self.channels_last, calibration=calibration, prepare=self._calibration_inputs,
            cache_dir=cache_dir)

    # what the parts know, under the names callers have always used
    model = property(lambda self: self.runner.model, doc="the torch network run (None for onnxruntime)")
    fft_convolutions = property(lambda self: self.runner.fft_convolutions)
    in_channels = property(lambda self: self.inputs.in_channels)
    slice_context = property(lambda self: self.inputs.slice_context)
    activation = property(lambda self: self.outputs.activation)
    threshold = property(lambda self: self.outputs.threshold)
    seed_threshold = property(lambda self: self.outputs.seed_threshold)
    out_channels = property(lambda self: self.outputs.channels)
    multi_label = property(lambda self: self.outputs.multi_label)

    @property
    def batch_size(self) -> Union[int, str]:
        """``auto`` or a fixed number of slices/tiles per batch (may be changed between runs)."""
        return self._batches.batch_size

    @batch_size.setter
    def batch_size(self, value: Union[int, str]) -> None:
        self._batches.batch_size = value

    # ------------------------------------------------------------------ inputs
    def _calibration_inputs(self, items, shape: Tuple[int, int, int]) -> np.ndarray:
        """Network inputs (N, C, H, W) of calibration items at ``shape`` (C, H, W)."""
        # a few volumes give more slices each, so that about 64 inputs are calibrated on
        per_volume = max(16, 64 // max(1, len(items)))
        out = [self.network_inputs(it, size=shape[1:], max_slices=per_volume) for it in items]
        x = np.concatenate(out)
        if x.shape[1] != shape[0]:
            raise InputError(f"{self.name}: calibration images give {x.shape[1]} channel(s), the network takes "
                             f"{shape[0]}")
        return x

    def network_inputs(self, image, size: Optional[Tuple[int, int]] = None, window: Optional[dict] = None,
                       max_slices: int = 16) -> np.ndarray:
        """The network's input float32 (N, C, h, w), normalised as for inference, of a 2-D
        image or of up to ``max_slices`` slices of a volume (:meth:`.InputPreparer.examples`)."""
        return self.inputs.examples(image, size, window, max_slices)

    # ------------------------------------------------------------------ network
    def _probabilities(self, x: torch.Tensor, out_size: Optional[Tuple[int, int]] = None,
                       crop: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Class probabilities (B, K, …) of a prepared batch, cropped (native padding)
        or resized (logits, bilinear) to ``out_size``; mirrored-input average with TTA."""
        def one(inp, mirrored):
            logits = self.runner(inp.flip(-1) if mirrored else inp)
            if mirrored:
                logits = logits.flip(-1)
            self.outputs.check(logits)
            if crop is not None:
                logits = logits[..., :crop[0], :crop[1]]
            if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
                shrink = out_size[0] < logits.shape[-2] or out_size[1] < logits.shape[-1]
                logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False,
                                       antialias=shrink)
            return self.outputs.activate(logits)
        probs = one(x, False)
        if self.tta:
            probs = (probs + one(x, True)) * 0.5
        return probs

    def _batch_for(self, size: Tuple[int, int], channels: int) -> int:
        return self._batches.size(size, channels, lambda x: self.runner(self.inputs.memory_format(x)),
                                  self.runner.measures_memory)

    # ------------------------------------------------------------------ volumes
    def predict_volume(self, image, *, spacing: Optional[Sequence[float]] = None,
                       origin: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None,
                       threshold: Optional[float] = None, min_lesion_size_mm3: float = 0.0,
                       seed_threshold: Optional[float] = None,
                       return_probabilities: bool = False, mode: str = "resize", window: Optional[dict] = None,
                       progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Prediction:
        """Segment a 3-D volume slice by slice along its axis closest to axial.

        ``image``: a ``SimpleITK.Image`` (scalar or multi-component), or a numpy array
        (z, y, x[, components]) with ``spacing``/``origin``/``direction`` in ITK order.
        ``mode``: ``resize`` each slice to the card's input size (default) or run it at
        ``native`` resolution (padded to the size divisor). ``window`` overrides the
        preset's CT window. ``threshold`` overrides the card's (sigmoid outputs);
        ``seed_threshold`` the card's hysteresis (0: keep every lesion; see
        :meth:`OutputRules.decision`). Returns labels on exactly the input grid (size,
        spacing, origin, direction).
        """
        import SimpleITK as sitk
        start = time.perf_counter()
        prog = Progress(progress, cancel)
        prog(0.0, "preparing")
        array, geom, components, sitk_image = volume_input(image, spacing, origin, direction)
        canon = Canonical.of(geom["size"], geom["spacing"], geom["direction"])
        cview = canon.view(array)
        nz, ny, nx = canon.canonical_shape
        if ny < 2 or nx < 2:
            raise InputError(f"the volume's axial slices are {ny}×{nx} pixels; a single coronal or sagittal "
                             f"slice cannot be segmented as a volume (use predict_image on its 2-D array)")
        plan = self.inputs.plan(array, components, window)
        resize_to, pad_to, net_size = self.inputs.sizes((ny, nx), mode)
        thr, seed = self.outputs.decision(threshold, seed_threshold)
        n_cls = len(self.classes)

        labels = np.zeros(canon.shape, np.uint8)
        ml_masks = np.zeros((n_cls,) + canon.shape, bool) if self.multi_label else None
        probs = np.zeros((n_cls,) + canon.shape, np.float32) if return_probabilities else None
        seeds = np.zeros((n_cls,) + canon.shape, bool) if seed else None
        views = (canon.view(labels), None if ml_masks is None else canon.view_leading(ml_masks),
                 None if probs is None else canon.view_leading(probs),
                 None if seeds is None else canon.view_leading(seeds))

        key = (*net_size, plan.channels)
        batch = self._batch_for(net_size, plan.channels)
        used = batch
        infer = prog.span(0.0, 0.9)
        stager = Stager(self._device)
        k = plan.context
        pending = None
        z0 = 0
        with torch.inference_mode():
            while z0 < nz:
                infer.check()
                z1 = min(nz, z0 + batch)
                if k:
                    block = cview[np.clip(np.arange(z0 - k, z1 + k), 0, nz - 1)]
                else:
                    block = cview[z0:z1]
                try:
                    x = self.inputs.tensor(stager.upload(block), plan, resize_to, pad_to)
                    p = self._probabilities(x, out_size=(ny, nx) if resize_to else None,
                                            crop=(ny, nx) if pad_to else None)
                    handle = stager.download(self.outputs.decide(p, thr, return_probabilities, seed))
                except Exception as e:  # out of memory: smaller batches, same slices again
                    batch = self._batches.shrink_after(e, z1 - z0, key)
                    used = min(used, batch)
                    continue
                if pending is not None:
                    _write_slices(pending, views)
                pending = (z0, z1, handle)
                z0 = z1
                infer(z0 / nz, f"slice {z0}/{nz}")
            if pending is not None:
                _write_slices(pending, views)

        post = prog.span(0.9, 1.0)
        post(0.0, "post-processing")
        masks, lesions = self.outputs.postprocess(labels, ml_masks, geom["spacing"], min_lesion_size_mm3, post,
                                                  seeds=seeds, origin=geom["origin"], direction=geom["direction"],
                                                  slice_axis=canon.slice_axis, levels=self.size_levels)
        out = sitk.GetImageFromArray(labels)
        if sitk_image is not None:
            out.CopyInformation(sitk_image)
        else:
            out.SetSpacing(geom["spacing"])
            out.SetOrigin(geom["origin"])
            out.SetDirection(geom["direction"])
        info = {"device": self.device, "precision": self.precision, "batch_size": used, "slices": nz,
                "network_input": list(net_size), "mode": mode, "slice_axis": canon.slice_axis,
                "orientation": canon.describe(geom["direction"]), "threshold": thr, "seed_threshold": seed,
                "nonfinite_voxels": plan.affine.nonfinite, "seconds": time.perf_counter() - start}
        prog.done("done")
        return Prediction(out, masks, probs, self.classes, lesions, info)

    # ------------------------------------------------------------------ images
    def predict_image(self, image: np.ndarray, *, mode: str = "resize", tile_overlap: float = 0.25,
                      tile_size: Optional[Tuple[int, int]] = None, threshold: Optional[float] = None,
                      seed_threshold: Optional[float] = None, return_probabilities: bool = False,
                      spacing: Optional[Sequence[float]] = None,
                      min_lesion_size_mm2: float = 0.0, window: Optional[dict] = None,
                      progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Prediction:
        """Segment a 2-D image, (H, W) grey or (H, W, C) colour / multi-channel.

        ``mode``: ``resize`` to the card's input size (as the papers), ``native`` (whole
        image at its own resolution, padded to the size divisor) or ``tile`` (tiles of
        ``tile_size``, default the card's input size, overlapping by ``tile_overlap``,
        blended). ``spacing`` (x, y) in mm makes lesion areas mm² and enables size
        levels; without it areas are in pixels. ``min_lesion_size_mm2`` drops smaller
        lesions (pixels without spacing). ``threshold`` and ``seed_threshold``: as in
        :meth:`predict_volume`."""
        start = time.perf_counter()
        prog = Progress(progress, cancel)
        prog(0.0, "preparing")
        img = np.asarray(image)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if img.ndim not in (2, 3) or img.size == 0:
            raise InputError(f"predict_image takes an (H, W) or (H, W, C) array, not shape {img.shape}")
        if self.slice_context:
            raise InputError(f"{self.name} reads {2 * self.slice_context + 1} neighbouring slices (2.5D); "
                             f"segment the volume with predict_volume")
        components = img.shape[2] if img.ndim == 3 else 1
        plan = self.inputs.plan(img, components, window)
        h, w = img.shape[:2]
        thr, seed = self.outputs.decision(threshold, seed_threshold)
        stager = Stager(self._device)
        block = img[None]
        with torch.inference_mode():
            if mode == "tile":
                probs_dev = self._tiled(stager.upload(block), plan, (h, w), tile_size, tile_overlap,
                                        prog.span(0.0, 0.9))
                used = self._batches.cache.get("tile", 1)
            else:
                resize_to, pad_to, net_size = self.inputs.sizes((h, w), mode)
                prog.check()
                try:
                    x = self.inputs.tensor(stager.upload(block), plan, resize_to, pad_to)
                    probs_dev = self._probabilities(x, out_size=(h, w) if resize_to else None,
                                                    crop=(h, w) if pad_to else None)
                except Exception as e:
                    self._batches.shrink_after(e, 1, net_size)
                    raise
                used = 1
            res = Stager.collect(stager.download(self.outputs.decide(probs_dev, thr, return_probabilities, seed)))
        prog(0.9, "post-processing")
        labels = res["labels"][0]
        ml = None if res["masks"] is None else res["masks"][:, 0]
        probs = None if res["probs"] is None else np.ascontiguousarray(res["probs"][:, 0])
        if labels.base is not None or not labels.flags.writeable:
            labels = labels.copy()
        if ml is not None:
            ml = ml.copy()
        px = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0)
        seeds = None if res["seeds"] is None else res["seeds"][:, 0]
        masks, lesions = self.outputs.postprocess(labels, ml, px, min_lesion_size_mm2, prog.span(0.9, 1.0),
                                                  seeds=seeds, levels=self.size_levels if spacing is not None else None)
        info = {"device": self.device, "precision": self.precision, "batch_size": used, "mode": mode,
                "threshold": thr, "seed_threshold": seed, "nonfinite_voxels": plan.affine.nonfinite,
                "seconds": time.perf_counter() - start}
        prog.done("done")
        return Prediction(labels, masks, probs, self.classes, lesions, info)

    def _tiled(self, raw: torch.Tensor, plan: InputPlan, shape: Tuple[int, int], tile_size, overlap: float,
               prog: Progress) -> torch.Tensor:
        tile, full = self.inputs.tile_layout(shape, tile_size)
        div = models.Inputs.of(self.card).size_divisor
        x_all = self.inputs.tensor(raw, plan, None, full)  # (1, C, H', W'), normalised once
        positions = tile_grid(full, tile, overlap, align=div)
        blender = TileBlender(self.out_channels, full, tile, self._device)
        key = (*tile, plan.channels)
        batch = self._batch_for(tile, plan.channels)
        self._batches.cache["tile"] = batch
        i = 0
        while i < len(positions):
            prog.check()
            chunk = positions[i:i + batch]
            try:
                x = torch.cat([x_all[:, :, y:y + tile[0], xx:xx + tile[1]] for y, xx in chunk])
                x = self.inputs.memory_format(x)
                blender.add(chunk, self._probabilities(x))
            except Exception as e:
                batch = self._batches.shrink_after(e, len(chunk), key)
                self._batches.cache["tile"] = batch
                continue
            i += len(chunk)
            prog(i / len(positions), f"tile {i}/{len(positions)}")
        return blender.result()[:, :shape[0], :shape[1]].unsqueeze(0)


def _write_slices(pending, views) -> None:
    z0, z1, handle = pending
    res = Stager.collect(handle)
    lview, mview, pview, sview = views
    if sview is not None:
        sview[:, z0:z1] = res["seeds"]
    lview[z0:z1] = res["labels"]
    if mview is not None and res["masks"] is not None:
        mview[:, z0:z1] = res["masks"]
    if pview is not None and res["probs"] is not None:
        pview[:, z0:z1] = res["probs"]
