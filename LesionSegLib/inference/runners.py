"""Runners: what turns a prepared batch (B, C, h, w) into the network's logits
(B, K, h, w), one class per backend. The Predictor picks one by its ``backend`` from
:data:`RUNNERS` and shares everything around it (geometry, resizing, decisions, lesions).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict

import numpy as np
import torch
import torch.nn as nn

from .. import models
from ..checkpoint import CheckpointError
from . import runtime


class TorchRunner:
    """The network in torch: BatchNorm folded and branches re-parameterised
    (``fuse_for_inference``; the caller's model is never modified), large depth-wise
    kernels through the FFT on the CPU, channels-last, autocast, optionally compiled."""
    backend = "torch"
    #: a GPU batch is sized by measuring this network's memory (batching.BatchPlanner)
    measures_memory = True

    def __init__(self, model: nn.Module, name: str, device: torch.device, amp_dtype, *, fuse: bool = True,
                 compile: bool = False, channels_last: bool = True) -> None:
        from ..models.fusion import fuse_for_inference
        self.name, self.device, self.amp_dtype = name, device, amp_dtype
        net = fuse_for_inference(model) if fuse else copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.fft_convolutions = 0
        if device.type == "cpu":
            from .fastconv import replace_large_depthwise
            self.fft_convolutions = replace_large_depthwise(net)
        if channels_last:
            runtime.to_channels_last(net)
        net.to(device)
        self.model = torch.compile(net) if compile else net

    @classmethod
    def create(cls, *, model, name, device, amp_dtype, fuse, compile, channels_last, **_):
        return cls(model, name, device, amp_dtype, fuse=fuse, compile=compile, channels_last=channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with runtime.autocast(self.device, self.amp_dtype):
            out = self.model(x)
        return models.inference_output(self.name, out).float()


class ArrayRunner:
    """A graph that takes and returns float32 numpy batches — onnxruntime's session of
    the exported network (:mod:`.onnx`) or its int8 quantized form
    (:mod:`.quantization`) — behind the same interface as :class:`TorchRunner`."""
    backend = "onnxruntime"
    model = None
    fft_convolutions = 0
    measures_memory = False

    def __init__(self, session: Callable[[np.ndarray], Any], device: torch.device) -> None:
        self.session, self.device = session, device

    @classmethod
    def create(cls, *, source, model, name, card, device, precision, calibration, prepare, cache_dir, **_):
        # onnxruntime would otherwise take every core: follow torch's thread setting, so that a
        # limit set for torch (Slicer, a benchmark, a shared server) holds for both backends
        threads = torch.get_num_threads() if device.type == "cpu" else None
        if precision == "int8":
            from . import quantization
            if model is None:
                raise CheckpointError(f"{source}: int8 quantizes a network's weights; give the checkpoint, "
                                      f"not an exported .onnx file")
            session = quantization.Int8Runner(model, name, card, calibration=calibration, prepare=prepare,
                                              cache=cache_dir, num_threads=threads)
        else:
            session = import_onnx().create_runner(source, name=name, card=card, device=str(device),
                                                          precision=precision, num_threads=threads)
        return cls(session, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session(x.float().contiguous().cpu().numpy())
        return torch.as_tensor(np.asarray(out), dtype=torch.float32, device=self.device)


#: backend name → runner class
RUNNERS: Dict[str, Any] = {"torch": TorchRunner, "onnxruntime": ArrayRunner}


def import_onnx():
    try:
        from . import onnx
    except ImportError as e:
        raise RuntimeError("backend='onnxruntime' needs the onnxruntime "
                           f"package, which are not available here ({e}); use backend='torch'") from e
    return onnx

