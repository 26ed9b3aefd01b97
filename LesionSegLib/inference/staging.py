"""Host ↔ device copies of the Predictor's batches (:class:`Stager`)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..preprocessing import InputError


def host_dtype(dtype: np.dtype) -> np.dtype:
    """numpy dtype a batch is staged in: one that torch holds and computes with."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise InputError(f"pixel type {dtype} cannot be segmented (numbers only)")
    mapping = {np.dtype(np.bool_): np.uint8, np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64,
               np.dtype(np.uint64): np.float32, np.dtype(np.float64): np.float32}
    return np.dtype(mapping.get(dtype, dtype))


class Stager:
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
        dtype = host_dtype(block.dtype)
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
