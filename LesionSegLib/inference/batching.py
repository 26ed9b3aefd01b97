"""How many slices or tiles go through the network at once (:class:`BatchPlanner`)."""
from __future__ import annotations

import logging
from typing import Callable, Dict, Tuple, Union

import torch

from . import runtime

log = logging.getLogger("LesionSeg")


class BatchPlanner:
    """The batch size per network input shape: a fixed number, or ``auto`` — on a GPU
    as many inputs as the free memory holds (measured once per shape with ``probe``),
    on the CPU about 4 slices of 352² — halved after an out-of-memory error."""

    def __init__(self, batch_size: Union[int, str], device: torch.device, name: str) -> None:
        self.batch_size = batch_size
        self.device, self.name = device, name
        self.cache: Dict[object, int] = {}

    @property
    def batch_size(self) -> Union[int, str]:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: Union[int, str]) -> None:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, not {value!r}")
        self._batch_size = value

    def size(self, shape: Tuple[int, int], channels: int, probe: Callable[[torch.Tensor], object],
             measure: bool) -> int:
        """Batch for inputs (channels, *shape); ``probe(x)`` runs the network on ``x``
        (``measure``: the runner's memory can be measured on this device)."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        key = (int(shape[0]), int(shape[1]), int(channels))
        if key not in self.cache:
            if self.device.type == "cuda" and measure:
                self.cache[key] = self._probe_gpu(*key, probe)
            else:
                self.cache[key] = runtime.cpu_batch_size(*shape)
        return self.cache[key]

    def _probe_gpu(self, h: int, w: int, c: int, probe) -> int:
        """Measure one forward pass of 2 inputs and fit as many as the free memory holds."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            with torch.inference_mode():
                probe(torch.zeros(2, c, h, w, device=dev))
            per_input = max(1, (torch.cuda.max_memory_allocated(dev) - base) / 2)
        except Exception as e:
            if not runtime.is_out_of_memory(e):
                raise
            torch.cuda.empty_cache()
            return 1
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        n = int((free + cached) * runtime.GPU_MEMORY_FRACTION // per_input)
        return int(min(runtime.MAX_BATCH, max(1, n)))

    def shrink_after(self, error: BaseException, batch: int, key) -> int:
        """Halve the batch after an out-of-memory error; re-raise anything else."""
        if not runtime.is_out_of_memory(error):
            raise error
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        if batch <= 1:
            raise MemoryError(f"{self.name}: one input of {key[0]}×{key[1]} does not fit in the memory of "
                              f"{self.device}; use a smaller input (mode='tile' for images) or device='cpu'") from error
        new = max(1, batch // 2)
        log.warning("%s: out of memory at batch %d on %s; retrying with batch %d", self.name, batch, self.device, new)
        self.batch_size = new if self.batch_size != "auto" else self.batch_size
        self.cache[key] = new
        return new
