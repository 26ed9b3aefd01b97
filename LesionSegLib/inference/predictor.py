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

import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..checkpoint import Checkpoint, CheckpointError
from ..preprocessing import InputError, arrange_channels, plan_intensity, replace_nonfinite, size_for
from . import runtime
from .cancel import CancelToken, Progress, ProgressCallback
from .geometry import Canonical
from .postprocess import lesion_table, remove_small_lesions
from .tiling import TileBlender, tile_grid

log = logging.getLogger("LesionSeg")

#: suffixes taken for weight files when a string could also be a registry name
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".tar")
BACKENDS = ("torch", "onnxruntime")


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict_volume` / :meth:`Predictor.predict_image`.

    ``labels``: uint8 label map on the input grid (a ``SimpleITK.Image`` for volumes, a
    numpy (H, W) array for images): 0 background, else a class ``value``; where classes
    of a multi-label network overlap, the most probable one. ``masks``: {class value:
    bool array (z, y, x) / (H, W)}, overlapping for multi-label networks (L-Seg).
    ``probabilities``: None, or float32 (C, z, y, x) / (C, H, W), one map per class in
    ``classes`` order. ``lesions``: rows of :func:`~.postprocess.lesion_table` for all
    classes. ``info``: how the run went (device, precision, batch size, orientation,
    seconds …).
    """
    labels: Any
    masks: Dict[int, np.ndarray]
    probabilities: Optional[np.ndarray]
    classes: List[Dict[str, Any]]
    lesions: List[Dict[str, Any]]
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _InputPlan:
    """How raw pixels become the network's input channels (see ``Predictor._plan``)."""
    lo: Optional[float]
    hi: Optional[float]
    affine: Any                         # IntensityTransform without clip
    channel_index: Optional[Tuple[int, ...]]   # source component per network channel (colour inputs)
    replicate: int                      # grey → this many identical channels (1: none)
    context: int                        # k of a 2.5D network (2k+1 slices as channels)
    channels: int                       # network input channels


def _merge_card(name: str, stored_card: Optional[Dict[str, Any]], preset: Optional[str],
                provenance: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The card with ``input``/``classes``/``outputs`` of the preset in use, and
    ``card["preset"]`` = that preset. A checkpoint's stored preset (what the network was
    trained with) wins unless another preset is asked for explicitly."""
    base = models.card(name)
    if stored_card:
        base.update(copy.deepcopy(stored_card))
    stored = base.get("preset") if isinstance(base.get("preset"), dict) else None
    if stored is not None and (preset is None or preset == stored.get("name")):
        chosen = stored
    else:
        if stored is not None:
            log.warning("the checkpoint was trained with preset %r; using preset %r as asked",
                        stored.get("name"), preset)
        from_prov = (provenance or {}).get("preset")
        chosen = models.preset(name, preset or (from_prov if isinstance(from_prov, str) else None))
    merged = dict(base)
    merged.update(input=dict(chosen["input"]), classes=list(chosen["classes"]), outputs=dict(chosen["outputs"]),
                  preset=chosen)
    return merged


def _model_in_channels(model: nn.Module, config: Optional[Dict[str, Any]]) -> int:
    for cfg in (config, getattr(model, "lesionseg_config", None)):
        if cfg and "in_channels" in cfg:
            return int(cfg["in_channels"])
    # every registered network's first weight of rank >= 4 is its stem convolution
    # (C_out, C_in, kh, kw), or a dynamic convolution's bank (K, C_out, C_in, kh, kw)
    for p in model.parameters():
        if p.dim() >= 4:
            return int(p.shape[-3])
    raise InputError("cannot tell how many input channels the network takes")


def _host_dtype(dtype: np.dtype) -> np.dtype:
    """numpy dtype a batch is staged in: one that torch holds and computes with."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise InputError(f"pixel type {dtype} cannot be segmented (numbers only)")
    mapping = {np.dtype(np.bool_): np.uint8, np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64,
               np.dtype(np.uint64): np.float32, np.dtype(np.float64): np.float32}
    return np.dtype(mapping.get(dtype, dtype))


class _Stager:
    """Host → device copies of batches and device → host copies of results.

    On CUDA, batches go through two pinned host buffers used in turn (a buffer is
    refilled only after the copy out of it has finished, tracked with events), so that
    ``non_blocking`` copies overlap the GPU's work; results come back into pinned memory
    asynchronously and are waited for only when written. On the CPU both are plain
    numpy/torch views."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._buffers: List[Optional[Tuple[torch.Tensor, Any]]] = [None, None]
        self._turn = 0

    def upload(self, block: np.ndarray) -> torch.Tensor:
        dtype = _host_dtype(block.dtype)
        if not self.cuda:
            host = np.ascontiguousarray(block, dtype=dtype)
            with warnings.catch_warnings():  # SimpleITK array views are read-only; torch only reads them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                out = torch.from_numpy(host)
            return out if self.device.type == "cpu" else out.to(self.device)
        slot = self._turn % 2
        self._turn += 1
        held = self._buffers[slot]
        need = int(np.prod(block.shape))
        tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
        if held is not None:
            held[1].synchronize()  # the previous copy out of this buffer is complete
        if held is None or held[0].numel() < need or held[0].dtype != tdtype:
            buf = torch.empty(need, dtype=tdtype, pin_memory=True)
        else:
            buf = held[0]
        view = buf[:need].view(block.shape)
        np.copyto(view.numpy(), block, casting="unsafe")  # gathers strided slices and casts in one pass
        out = view.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._buffers[slot] = (buf, event)
        return out

    def download(self, tensors: Dict[str, Optional[torch.Tensor]]):
        if not self.cuda:
            return {k: (None if v is None else v.cpu().numpy()) for k, v in tensors.items()}, None
        out = {}
        for k, v in tensors.items():
            if v is None:
                out[k] = None
                continue
            dst = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            dst.copy_(v, non_blocking=True)
            out[k] = dst
        event = torch.cuda.Event()
        event.record()
        return out, event

    @staticmethod
    def collect(handle) -> Dict[str, Optional[np.ndarray]]:
        out, event = handle
        if event is not None:
            event.synchronize()
            return {k: (None if v is None else v.numpy()) for k, v in out.items()}
        return out


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
    ``backend``: ``torch`` or ``onnxruntime`` (needs ``LesionSegLib.onnx_backend``).
    """

    def __init__(self, model_or_checkpoint: Union[nn.Module, Checkpoint, str, os.PathLike],
                 preset: Optional[str] = None, device: str = "auto", precision: str = "auto",
                 batch_size: Union[int, str] = "auto", tta: bool = False, fuse: bool = True,
                 compile: bool = False, backend: str = "torch", channels_last: bool = True,
                 calibration=None, cache_dir=None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if batch_size != "auto" and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                     or batch_size < 1):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, not {batch_size!r}")
        self._device, self.device_message = runtime.select_device(device)
        self.device = str(self._device)
        # onnxruntime runs the exported float32 graph; 'auto' must not ask it for bf16
        auto_fp32 = backend == "onnxruntime" and (precision or "auto") == "auto"
        self.precision, self._amp_dtype = runtime.select_precision("fp32" if auto_fp32 else precision, self._device)
        if self.precision == "int8":
            backend = "onnxruntime"  # the quantized graph runs in onnxruntime
        self.backend = backend
        self._calibration, self._cache_dir = calibration, cache_dir
        self.batch_size = batch_size
        self.tta = bool(tta)
        self.channels_last = bool(channels_last) and backend == "torch"
        if self._device.type == "cuda":
            # every batch of a volume has the same shape: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
        self._batch_cache: Dict[Tuple[int, int, int], int] = {}

        model, name, stored_card, config, provenance, self.source = self._resolve(model_or_checkpoint, preset)
        if name is None:  # an .onnx file: its network and card are stored in the file's metadata
            if backend != "onnxruntime":
                raise CheckpointError(f"{model_or_checkpoint}: an ONNX file runs with backend='onnxruntime'")
            name, stored_card = _import_onnx_backend().read_metadata(model_or_checkpoint)
        self.name = name
        self.card = _merge_card(name, stored_card, preset, provenance)
        self.preset = self.card["preset"].get("name")
        self.classes: List[Dict[str, Any]] = [dict(c) for c in self.card["classes"]]
        self.provenance = provenance or {}
        self.precision, self._amp_dtype, self.precision_message = runtime.keep_masks(
            (self.precision, self._amp_dtype), precision, self._device, self.provenance)
        if self.precision_message:
            log.info("%s: %s", name, self.precision_message)
        spec = self.card["input"]
        if int(spec.get("dims", 2)) != 2:
            raise InputError(f"{name}: only 2-D networks are supported by the predictor")

        # 2.5D: a network taking 2k+1 channels where the preset feeds one slice
        want = int(spec["channels"])
        self.in_channels = _model_in_channels(model, config) if model is not None else want
        self.slice_context = 0
        if self.in_channels != want:
            if spec.get("slice_context") and want == 1 and self.in_channels % 2 == 1:
                self.slice_context = (self.in_channels - 1) // 2
            else:
                raise InputError(f"{name}: the network takes {self.in_channels} input channel(s) but preset "
                                 f"{self.preset!r} provides {want}; load it with the preset it was trained with")

        out = self.card["outputs"]
        self.activation = out.get("activation", "sigmoid")
        if self.activation not in ("sigmoid", "softmax"):
            raise InputError(f"{name}: unsupported output activation {self.activation!r}")
        self.threshold = float(out.get("threshold", 0.5))
        n_cls = len(self.classes)
        self.out_channels = int(out.get("channels", n_cls))
        expected = n_cls + 1 if self.activation == "softmax" else n_cls
        if self.out_channels != expected:
            raise InputError(f"{name}: preset {self.preset!r} lists {n_cls} class(es) but the network has "
                             f"{self.out_channels} {self.activation} output channel(s) (expected {expected})")
        self.multi_label = self.activation == "sigmoid" and n_cls > 1
        values = [int(c["value"]) for c in self.classes]
        if any(not 0 < v < 256 for v in values) or len(set(values)) != len(values):
            raise InputError(f"{name}: class values must be distinct numbers 1…255, got {values}")
        lut = ([0] + values) if self.activation == "softmax" else values
        self._lut = torch.tensor(lut, dtype=torch.uint8, device=self._device)
        levels = self.card.get("lesion_size_levels")
        self.size_levels = levels if levels else models.card("msenet").get("lesion_size_levels")

        self._runner = None
        if backend == "onnxruntime":
            self.model = None
            self._runner = self._onnx_runner(model_or_checkpoint, model)
        else:
            self.model = self._inference_form(model, fuse, compile)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve(source, preset):
        """(model, name, stored card, config, provenance, description) of any accepted source."""
        from ..checkpoint import load
        if isinstance(source, Checkpoint):
            ck = source
        elif isinstance(source, nn.Module):
            name = getattr(source, "lesionseg_name", None)
            if name is None:
                raise CheckpointError("the network was not built by LesionSegLib.models.create; pass a "
                                      "checkpoint, a weight file or a registry name instead")
            return source, name, None, getattr(source, "lesionseg_config", None), {}, f"{name} (in-memory network)"
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_file():
                if path.suffix == ".onnx":
                    return None, None, None, None, {}, str(path)  # resolved by the onnxruntime backend
                ck = load(path)
            elif isinstance(source, str) and os.sep not in source and "/" not in source \
                    and not source.lower().endswith(WEIGHT_SUFFIXES):
                name = models._resolve(source)
                p_cfg = models.preset(name, preset).get("config", {}) if preset else {}
                net = models.create(name, preset=preset)
                log.warning("%s: no weights given, the network has random weights (pipeline tests only)", name)
                return net, name, None, models.config(name, **p_cfg), {}, f"{name} (random weights)"
            else:
                raise CheckpointError(f"no such checkpoint file: {source}")
        else:
            raise TypeError(f"cannot make a predictor from {type(source).__name__}; pass a network, "
                            f"a Checkpoint, a weight file path or a registry name")
        if ck.kind == "backbone":
            raise CheckpointError(f"{ck.path}: an ImageNet backbone ({ck.name}), not a segmentation network")
        return ck.model, ck.name, ck.card, ck.config, ck.provenance, str(ck.path or ck.name)

    def _inference_form(self, model: nn.Module, fuse: bool, compile: bool) -> nn.Module:
        from ..models.fusion import fuse_for_inference
        net = fuse_for_inference(model) if fuse else copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.fft_convolutions = 0
        if self._device.type == "cpu":
            from .fastconv import replace_large_depthwise
            self.fft_convolutions = replace_large_depthwise(net)
        if self.channels_last:
            runtime.to_channels_last(net)
        net.to(self._device)
        if compile:
            net = torch.compile(net)
        return net

    def _onnx_runner(self, source, model: Optional[nn.Module] = None):
        """Hook for the onnxruntime backend. ``LesionSegLib.onnx_backend.create_runner(
        source, name=, card=, device=, precision=)`` must return a callable taking a
        float32 numpy batch (B, C, H, W) and returning the inference output's logits
        (B, K, H, W); everything around it (geometry, resizing, decisions, lesions) is
        shared with the torch backend. For an ``.onnx`` file, ``read_metadata(path)``
        must return ``(registry name, card)``."""
        # onnxruntime would otherwise take every core: follow torch's thread setting, so that a
        # limit set for torch (Slicer, a benchmark, a shared server) holds for both backends
        threads = torch.get_num_threads() if str(self.device) == "cpu" else None
        if self.precision == "int8":
            from . import quantization
            if model is None:
                raise CheckpointError(f"{source}: int8 quantizes a network's weights; give the checkpoint, "
                                      f"not an exported .onnx file")
            return quantization.Int8Runner(model, self.name, self.card, calibration=self._calibration,
                                           prepare=self._calibration_inputs, cache=self._cache_dir,
                                           num_threads=threads)
        return _import_onnx_backend().create_runner(source, name=self.name, card=self.card, device=self.device,
                                                    precision=self.precision, num_threads=threads)

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
        image (numpy (H, W[, C]): N = 1) or of up to ``max_slices`` evenly spread slices
        of a volume (a ``SimpleITK.Image``); resized to ``size`` (default: the card's
        size for the slice, as ``mode='resize'``)."""
        stager = _Stager(torch.device("cpu"))
        with torch.inference_mode():
            if isinstance(image, np.ndarray):
                img = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
                plan = self._plan(img, img.shape[2] if img.ndim == 3 else 1, window)
                target = tuple(size) if size else self._sizes(img.shape[:2], "resize")[0]
                return self._net_input(stager.upload(img[None]), plan, target, None).float().contiguous().numpy()
            array, geom, components, _ = _volume_input(image, None, None, None)
            canon = Canonical.of(geom["size"], geom["spacing"], geom["direction"])
            cview = canon.view(array)
            nz, ny, nx = canon.canonical_shape
            plan = self._plan(array, components, window)
            target = tuple(size) if size else self._sizes((ny, nx), "resize")[0]
            k = plan.context
            zs = np.unique(np.linspace(0, nz - 1, min(nz, max_slices)).round().astype(int))
            return np.concatenate([
                self._net_input(stager.upload(cview[np.clip(np.arange(z - k, z + k + 1), 0, nz - 1)]), plan, target,
                                None).float().contiguous().numpy() for z in zs])

    # ------------------------------------------------------------------ network
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._runner is not None:
            out = self._runner(x.float().contiguous().cpu().numpy())
            return torch.as_tensor(np.asarray(out), dtype=torch.float32, device=self._device)
        with runtime.autocast(self._device, self._amp_dtype):
            out = self.model(x)
        return models.inference_output(self.name, out).float()

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)

    def _probabilities(self, x: torch.Tensor, out_size: Optional[Tuple[int, int]] = None,
                       crop: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Class probabilities (B, K, …) of a prepared batch, cropped (native padding)
        or resized (logits, bilinear) to ``out_size``; mirrored-input average with TTA."""
        def one(inp, mirrored):
            logits = self._logits(inp.flip(-1) if mirrored else inp)
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[1] != self.out_channels:
                raise InputError(f"{self.name}: the network produced {logits.shape[1]} output channel(s), "
                                 f"preset {self.preset!r} expects {self.out_channels}")
            if crop is not None:
                logits = logits[..., :crop[0], :crop[1]]
            if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
                shrink = out_size[0] < logits.shape[-2] or out_size[1] < logits.shape[-1]
                logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False,
                                       antialias=shrink)
            return self._activate(logits)
        probs = one(x, False)
        if self.tta:
            probs = (probs + one(x, True)) * 0.5
        return probs

    def _decide(self, probs: torch.Tensor, threshold: float, keep_probs: bool) -> Dict[str, Optional[torch.Tensor]]:
        """Labels (B, …) uint8, multi-label masks (K, B, …) and class probabilities
        (C, B, …), on the device."""
        masks = None
        if self.activation == "softmax":
            labels = self._lut[probs.argmax(1)]
            class_probs = probs[:, 1:]
        elif not self.multi_label:
            labels = (probs[:, 0] > threshold).to(torch.uint8) * self._lut[0]
            class_probs = probs
        else:
            above = probs > threshold
            best = probs.masked_fill(~above, -1.0).argmax(1)
            labels = torch.where(above.any(1), self._lut[best], torch.zeros((), dtype=torch.uint8,
                                                                             device=probs.device))
            masks = above.transpose(0, 1)
            class_probs = probs
        return {"labels": labels, "masks": masks,
                "probs": class_probs.transpose(0, 1).float() if keep_probs else None}

    # ------------------------------------------------------------------ inputs
    def _plan(self, array: np.ndarray, components: int, window, eight_bit=None) -> _InputPlan:
        spec = self.card["input"]
        transform = plan_intensity(array, spec, window=window, eight_bit=eight_bit)
        affine = replace(transform, lo=None, hi=None)
        if self.slice_context:
            if components > 1:
                raise InputError(f"{self.name} reads {2 * self.slice_context + 1} neighbouring slices of a "
                                 f"single-component volume; this one has {components} components")
            return _InputPlan(transform.lo, transform.hi, affine, None, 1, self.slice_context, self.in_channels)
        # the channel rules of preprocessing.arrange_channels, learnt on a tiny index image
        # so that they run on the device and errors read the same everywhere
        if components > 1:
            idx = arrange_channels(np.arange(components).reshape(1, 1, components), spec, channel_axis=-1,
                                   color=True)[:, 0, 0]
            index, replicate = tuple(int(i) for i in idx), 1
        else:
            rep = arrange_channels(np.zeros((1, 1)), spec, color=False)
            index, replicate = None, int(rep.shape[0])
        channels = len(index) if index is not None else replicate
        if channels != self.in_channels:
            raise InputError(f"{self.name}: the image gives {channels} channel(s), "
                             f"the network takes {self.in_channels}")
        return _InputPlan(transform.lo, transform.hi, affine, index, replicate, 0, channels)

    def _net_input(self, raw: torch.Tensor, plan: _InputPlan, size: Optional[Tuple[int, int]] = None,
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
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def _sizes(self, shape: Tuple[int, int], mode: str):
        """(resize target or None, pad target or None, network input size) for a slice."""
        spec = self.card["input"]
        if mode == "resize":
            size = size_for(shape, spec)
            return size, None, size
        if mode == "native":
            padded = size_for(shape, spec, native=True)
            return None, padded, padded
        raise ValueError(f"unknown mode {mode!r}; use 'resize' or 'native' (images also 'tile')")

    # ------------------------------------------------------------------ batches and memory
    def _batch_for(self, size: Tuple[int, int], channels: int) -> int:
        if self.batch_size != "auto":
            return int(self.batch_size)
        key = (int(size[0]), int(size[1]), int(channels))
        if key not in self._batch_cache:
            if self._device.type == "cuda" and self._runner is None:
                self._batch_cache[key] = self._probe_gpu_batch(*key)
            else:
                self._batch_cache[key] = runtime.cpu_batch_size(*size)
        return self._batch_cache[key]

    def _probe_gpu_batch(self, h: int, w: int, c: int) -> int:
        """Measure one forward pass of 2 inputs and fit as many as the free memory holds."""
        torch.cuda.synchronize(self._device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self._device)
        torch.cuda.reset_peak_memory_stats(self._device)
        try:
            with torch.inference_mode():
                x = torch.zeros(2, c, h, w, device=self._device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self._logits(x)
            per_input = max(1, (torch.cuda.max_memory_allocated(self._device) - base) / 2)
        except Exception as e:
            if not runtime.is_out_of_memory(e):
                raise
            torch.cuda.empty_cache()
            return 1
        free, _total = torch.cuda.mem_get_info(self._device)
        cached = torch.cuda.memory_reserved(self._device) - torch.cuda.memory_allocated(self._device)
        n = int((free + cached) * runtime.GPU_MEMORY_FRACTION // per_input)
        return int(min(runtime.MAX_BATCH, max(1, n)))

    def _shrink_after(self, error: BaseException, batch: int, key) -> int:
        """Halve the batch after an out-of-memory error; re-raise anything else."""
        if not runtime.is_out_of_memory(error):
            raise error
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.empty_cache()
        if batch <= 1:
            raise MemoryError(f"{self.name}: one input of {key[0]}×{key[1]} does not fit in the memory of "
                              f"{self.device}; use a smaller input (mode='tile' for images) or device='cpu'") from error
        new = max(1, batch // 2)
        log.warning("%s: out of memory at batch %d on %s; retrying with batch %d", self.name, batch, self.device, new)
        self.batch_size = new if self.batch_size != "auto" else self.batch_size
        self._batch_cache[key] = new
        return new

    # ------------------------------------------------------------------ volumes
    def predict_volume(self, image, *, spacing: Optional[Sequence[float]] = None,
                       origin: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None,
                       threshold: Optional[float] = None, min_lesion_size_mm3: float = 0.0,
                       return_probabilities: bool = False, mode: str = "resize", window: Optional[dict] = None,
                       progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Prediction:
        """Segment a 3-D volume slice by slice along its axis closest to axial.

        ``image``: a ``SimpleITK.Image`` (scalar or multi-component), or a numpy array
        (z, y, x[, components]) with ``spacing``/``origin``/``direction`` in ITK order.
        ``mode``: ``resize`` each slice to the card's input size (default) or run it at
        ``native`` resolution (padded to the size divisor). ``window`` overrides the
        preset's CT window. ``threshold`` overrides the card's (sigmoid outputs).
        Returns labels on exactly the input grid (size, spacing, origin, direction).
        """
        import SimpleITK as sitk
        start = time.perf_counter()
        prog = Progress(progress, cancel)
        prog(0.0, "preparing")
        array, geom, components, sitk_image = _volume_input(image, spacing, origin, direction)
        canon = Canonical.of(geom["size"], geom["spacing"], geom["direction"])
        cview = canon.view(array)
        nz, ny, nx = canon.canonical_shape
        if ny < 2 or nx < 2:
            raise InputError(f"the volume's axial slices are {ny}×{nx} pixels; a single coronal or sagittal "
                             f"slice cannot be segmented as a volume (use predict_image on its 2-D array)")
        plan = self._plan(array, components, window)
        resize_to, pad_to, net_size = self._sizes((ny, nx), mode)
        thr = self.threshold if threshold is None else _valid_threshold(threshold)
        n_cls = len(self.classes)

        labels = np.zeros(canon.shape, np.uint8)
        ml_masks = np.zeros((n_cls,) + canon.shape, bool) if self.multi_label else None
        probs = np.zeros((n_cls,) + canon.shape, np.float32) if return_probabilities else None
        views = (canon.view(labels), None if ml_masks is None else canon.view_leading(ml_masks),
                 None if probs is None else canon.view_leading(probs))

        key = (*net_size, plan.channels)
        batch = self._batch_for(net_size, plan.channels)
        used = batch
        infer = prog.span(0.0, 0.9)
        stager = _Stager(self._device)
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
                    x = self._net_input(stager.upload(block), plan, resize_to, pad_to)
                    p = self._probabilities(x, out_size=(ny, nx) if resize_to else None,
                                            crop=(ny, nx) if pad_to else None)
                    handle = stager.download(self._decide(p, thr, return_probabilities))
                except Exception as e:  # out of memory: smaller batches, same slices again
                    batch = self._shrink_after(e, z1 - z0, key)
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
        masks, lesions = self._postprocess(labels, ml_masks, geom["spacing"], min_lesion_size_mm3, post,
                                           origin=geom["origin"], direction=geom["direction"],
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
                "orientation": canon.describe(geom["direction"]), "threshold": thr,
                "nonfinite_voxels": plan.affine.nonfinite, "seconds": time.perf_counter() - start}
        prog.done("done")
        return Prediction(out, masks, probs, self.classes, lesions, info)

    # ------------------------------------------------------------------ images
    def predict_image(self, image: np.ndarray, *, mode: str = "resize", tile_overlap: float = 0.25,
                      tile_size: Optional[Tuple[int, int]] = None, threshold: Optional[float] = None,
                      return_probabilities: bool = False, spacing: Optional[Sequence[float]] = None,
                      min_lesion_size_mm2: float = 0.0, window: Optional[dict] = None,
                      progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Prediction:
        """Segment a 2-D image, (H, W) grey or (H, W, C) colour / multi-channel.

        ``mode``: ``resize`` to the card's input size (as the papers), ``native`` (whole
        image at its own resolution, padded to the size divisor) or ``tile`` (tiles of
        ``tile_size``, default the card's input size, overlapping by ``tile_overlap``,
        blended). ``spacing`` (x, y) in mm makes lesion areas mm² and enables size
        levels; without it areas are in pixels. ``min_lesion_size_mm2`` drops smaller
        lesions (pixels without spacing)."""
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
        plan = self._plan(img, components, window)
        h, w = img.shape[:2]
        thr = self.threshold if threshold is None else _valid_threshold(threshold)
        stager = _Stager(self._device)
        block = img[None]
        with torch.inference_mode():
            if mode == "tile":
                probs_dev = self._tiled(stager.upload(block), plan, (h, w), tile_size, tile_overlap,
                                        prog.span(0.0, 0.9))
                used = self._batch_cache.get("tile", 1)
            else:
                resize_to, pad_to, net_size = self._sizes((h, w), mode)
                prog.check()
                try:
                    x = self._net_input(stager.upload(block), plan, resize_to, pad_to)
                    probs_dev = self._probabilities(x, out_size=(h, w) if resize_to else None,
                                                    crop=(h, w) if pad_to else None)
                except Exception as e:
                    self._shrink_after(e, 1, net_size)
                    raise
                used = 1
            res = _Stager.collect(stager.download(self._decide(probs_dev, thr, return_probabilities)))
        prog(0.9, "post-processing")
        labels = res["labels"][0]
        ml = None if res["masks"] is None else res["masks"][:, 0]
        probs = None if res["probs"] is None else np.ascontiguousarray(res["probs"][:, 0])
        if labels.base is not None or not labels.flags.writeable:
            labels = labels.copy()
        if ml is not None:
            ml = ml.copy()
        px = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0)
        masks, lesions = self._postprocess(labels, ml, px, min_lesion_size_mm2, prog.span(0.9, 1.0),
                                           levels=self.size_levels if spacing is not None else None)
        info = {"device": self.device, "precision": self.precision, "batch_size": used, "mode": mode,
                "threshold": thr, "nonfinite_voxels": plan.affine.nonfinite, "seconds": time.perf_counter() - start}
        prog.done("done")
        return Prediction(labels, masks, probs, self.classes, lesions, info)

    def _tiled(self, raw: torch.Tensor, plan: _InputPlan, shape: Tuple[int, int], tile_size, overlap: float,
               prog: Progress) -> torch.Tensor:
        spec = self.card["input"]
        div, min_size = int(spec.get("size_divisor", 1)), int(spec.get("min_size", 1))
        want = tuple(tile_size) if tile_size else tuple(size_for(shape, spec))
        # a tile never exceeds the (divisor-rounded) image, and is a valid network input
        tile = tuple(max(min_size, -(-min(int(t), s) // div) * div) for t, s in zip(want, shape))
        # the image is padded to a multiple of the divisor (and at least one tile), so that
        # tiles can start on the network's pooling grid (see tiling.tile_starts)
        full = tuple(max(-(-s // div) * div, t) for s, t in zip(shape, tile))
        x_all = self._net_input(raw, plan, None, full)  # (1, C, H', W'), normalised once
        positions = tile_grid(full, tile, overlap, align=div)
        blender = TileBlender(self.out_channels, full, tile, self._device)
        key = (*tile, plan.channels)
        batch = self._batch_for(tile, plan.channels)
        self._batch_cache["tile"] = batch
        i = 0
        while i < len(positions):
            prog.check()
            chunk = positions[i:i + batch]
            try:
                x = torch.cat([x_all[:, :, y:y + tile[0], xx:xx + tile[1]] for y, xx in chunk])
                x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
                blender.add(chunk, self._probabilities(x))
            except Exception as e:
                batch = self._shrink_after(e, len(chunk), key)
                self._batch_cache["tile"] = batch
                continue
            i += len(chunk)
            prog(i / len(positions), f"tile {i}/{len(positions)}")
        return blender.result()[:, :shape[0], :shape[1]].unsqueeze(0)

    # ------------------------------------------------------------------ post-processing
    def _postprocess(self, labels: np.ndarray, ml_masks: Optional[np.ndarray], spacing, min_size: float,
                     prog: Progress, *, origin=None, direction=None, slice_axis: int = 0, levels=None):
        values = [int(c["value"]) for c in self.classes]
        masks: Dict[int, np.ndarray] = {}
        removed_any = False
        for i, v in enumerate(values):
            prog.check()
            m = ml_masks[i] if ml_masks is not None else labels == v
            if min_size and min_size > 0 and remove_small_lesions(m, spacing, min_size):
                removed_any = True
                if ml_masks is None:
                    labels[(labels == v) & ~m] = 0
            masks[v] = m
            prog((i + 0.5) / (2 * len(values)), "removing small lesions")
        if removed_any and ml_masks is not None:
            # a voxel whose chosen class was removed falls back to another class still
            # present there (lowest value first: probabilities are not kept), else background
            for v in values:
                stale = (labels == v) & ~masks[v]
                if stale.any():
                    labels[stale] = 0
                    for u in values:
                        fill = stale & masks[u] & (labels == 0)
                        labels[fill] = u
        lesions: List[Dict[str, Any]] = []
        for i, v in enumerate(values):
            prog.check()
            lesions += lesion_table(masks[v], spacing, v, levels, origin=origin, direction=direction,
                                    slice_axis=slice_axis)
            prog(0.5 + (i + 1) / (2 * len(values)), "lesion table")
        return masks, lesions


def _valid_threshold(value) -> float:
    from ..validation import OptionError, threshold
    try:
        return threshold(value)
    except OptionError as e:
        raise InputError(str(e)) from None


def _import_onnx_backend():
    try:
        from .. import onnx_backend
    except ImportError as e:
        raise RuntimeError("backend='onnxruntime' needs LesionSegLib.onnx_backend and the onnxruntime "
                           f"package, which are not available here ({e}); use backend='torch'") from e
    return onnx_backend


def _write_slices(pending, views) -> None:
    z0, z1, handle = pending
    res = _Stager.collect(handle)
    lview, mview, pview = views
    lview[z0:z1] = res["labels"]
    if mview is not None and res["masks"] is not None:
        mview[:, z0:z1] = res["masks"]
    if pview is not None and res["probs"] is not None:
        pview[:, z0:z1] = res["probs"]


def _volume_input(image, spacing, origin, direction):
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
