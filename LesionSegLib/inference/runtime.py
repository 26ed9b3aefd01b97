"""Where and how fast a network runs: device, precision, batch size, memory layout.

Kept apart from the predictor so that the benchmark and the Slicer module can ask the
same questions ("which device will be used, and why?") without running anything.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional, Tuple

import torch
import torch.nn as nn

log = logging.getLogger("LesionSeg")

#: on the CPU, a batch holds at most this many network-input pixels (4 slices of 352²)
#: and at most CPU_BATCH_PER_THREAD inputs per torch thread. Batching gives the deep,
#: low-resolution layers wider GEMMs, but once a batch's full-resolution feature maps
#: outgrow the caches the convolutions become memory-bound: on one core (docs/
#: performance.md) U-Net at 352² ran 1.59 slices/s at batch 1 and 1.13 at batch 8, MS-LKSeg
#: 1.09 and 0.90, M2SNet was best at batch 2-4 (+10 % over batch 1), MSE-Net flat.
CPU_PIXELS_PER_BATCH = 4 * 352 * 352
CPU_BATCH_PER_THREAD = 2
CPU_MAX_BATCH = 16
MAX_BATCH = 64
#: fraction of the free GPU memory a batch may plan to use (the rest: fragmentation,
#: the resize back to full slices, other applications such as Slicer's renderer)
GPU_MEMORY_FRACTION = 0.6

OutOfMemory = tuple(e for e in (getattr(torch, "OutOfMemoryError", None),
                                getattr(torch.cuda, "OutOfMemoryError", None)) if e is not None)


def is_out_of_memory(error: BaseException) -> bool:
    if OutOfMemory and isinstance(error, OutOfMemory):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def select_device(device: str = "auto") -> Tuple[torch.device, str]:
    """``(device, message)``. ``auto`` takes the first CUDA GPU that can really run a
    kernel (a driver mismatch or a full GPU is found here, not in the middle of a
    volume), else the CPU; the message says what was chosen and why."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            try:
                torch.zeros(1, device="cuda").add_(1).item()
                return torch.device("cuda"), f"running on the GPU ({torch.cuda.get_device_name(0)})"
            except Exception as e:  # driver/toolkit mismatch, GPU busy or broken
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                return torch.device("cpu"), f"a CUDA GPU is present but not usable ({msg}); running on the CPU"
        return torch.device("cpu"), "no usable GPU found; running on the CPU"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was requested but this PyTorch ({torch.__version__}) "
                               f"sees no CUDA GPU; use device='cpu' or 'auto'")
        dev = torch.device(device)
        return dev, f"running on the GPU ({torch.cuda.get_device_name(dev)})"
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RuntimeError("device 'mps' was requested but Apple's Metal backend is not available")
        return torch.device("mps"), "running on the Apple GPU (mps)"
    if device == "cpu":
        return torch.device("cpu"), "running on the CPU"
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def cpu_features() -> dict:
    """The CPU's matrix features that decide precision on the CPU, from PyTorch's own
    cpuinfo checks (the ones oneDNN dispatches on), with /proc/cpuinfo flags as a
    fallback for builds without them: ``amx_bf16``, ``avx512_bf16``, ``vnni``
    (AVX512-VNNI or AVX-VNNI), ``avx512``, ``avx2``, and ``native_bf16`` (AMX or
    AVX512-BF16: bf16 convolutions run faster than fp32, not emulated).
    Detected once per process."""
    return dict(_cpu_features())


@functools.lru_cache(maxsize=1)
def _cpu_features() -> Tuple[Tuple[str, bool], ...]:
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "vnni": "_is_vnni_supported", "avx512": "_is_avx512_supported", "avx2": "_is_avx2_supported"}
    cpu_mod = getattr(torch, "cpu", None)
    out = {}
    flags = None
    for key, fn in checks.items():
        check = getattr(cpu_mod, fn, None)
        if check is not None:
            try:
                out[key] = bool(check())
                continue
            except Exception:
                pass
        if flags is None:
            flags = _proc_cpu_flags()
        names = {"amx_bf16": ("amx_bf16",), "avx512_bf16": ("avx512_bf16",), "vnni": ("avx512_vnni", "avx_vnni"),
                 "avx512": ("avx512f",), "avx2": ("avx2",)}[key]
        out[key] = any(n in flags for n in names)
    out["native_bf16"] = out["amx_bf16"] or out["avx512_bf16"]
    return tuple(out.items())


def _proc_cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The CPU's model name (for benchmark and training headers)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


_PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
#: every precision the Predictor takes; ``int8`` is post-training static quantization run
#: by onnxruntime (:mod:`.quantization`), not an autocast dtype
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def cpu_autocast_dtype(features: Optional[dict] = None) -> Optional[torch.dtype]:
    """The autocast dtype for ``auto`` on this CPU (inference and training alike): bf16
    where the CPU computes it natively (AMX or AVX512-BF16, :func:`cpu_features`), None
    (fp32) elsewhere — emulated bf16 is slower than fp32. ``features`` replaces the
    detection (tests, or a decision made for another machine)."""
    feats = cpu_features() if features is None else features
    return torch.bfloat16 if feats.get("native_bf16") else None


def select_precision(precision: str, device: torch.device,
                     features: Optional[dict] = None) -> Tuple[str, Optional[torch.dtype]]:
    """``(name, autocast dtype or None)``. ``auto``: bf16 autocast on CUDA GPUs that
    support it (same exponent range as fp32, so logits do not overflow), fp16 on older
    ones; on the CPU bf16 where it is native (:func:`cpu_autocast_dtype`), else fp32.
    ``int8`` gives ``("int8", None)``: the caller runs a quantized graph (CPU only).
    ``features`` replaces the CPU detection (see :func:`cpu_autocast_dtype`)."""
    p = (precision or "auto").strip().lower()
    if p == "auto":
        if device.type == "cuda":
            return ("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16)
        if device.type == "cpu" and cpu_autocast_dtype(features) is not None:
            return "bf16", torch.bfloat16
        return "fp32", None
    if p == "int8":
        if device.type != "cpu":
            raise ValueError(f"precision 'int8' runs on the CPU only (onnxruntime), not on {device}")
        return "int8", None
    if p not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    dtype = _PRECISIONS[p]
    return ("fp32" if dtype is None else ("bf16" if dtype is torch.bfloat16 else "fp16")), dtype


def keep_masks(selected: Tuple[str, Optional[torch.dtype]], requested: str, device: torch.device,
               provenance: Optional[dict]) -> Tuple[str, Optional[torch.dtype], str]:
    """``auto``'s CPU bf16 only for weights whose masks it keeps: a release file records
    bf16-vs-fp32 agreement on its held-out images (``provenance["precision_agreement"]``,
    written by the release script, or kept in the manifest beside the file); where that
    record misses the bar (Dice ≥ 0.99, equal lesion counts), or a release file has none,
    ``auto`` falls back to fp32. Other weights (a user's own run, random weights) have no
    such record and keep bf16. An explicit precision is never changed.
    Returns ``(name, autocast dtype, message)``; the message is empty when nothing changed."""
    name, dtype = selected
    if (requested or "auto").strip().lower() != "auto" or device.type != "cpu" or name != "bf16":
        return name, dtype, ""
    from .agreement import agrees
    record = ((provenance or {}).get("precision_agreement") or {}).get("bf16")
    if not record:
        if (provenance or {}).get("release"):
            return "fp32", None, ("fp32 instead of bf16: bf16 masks have not been compared with fp32 for "
                                  "these release weights; precision='bf16' forces it")
        return name, dtype, ""
    if agrees(record):
        return name, dtype, ""
    return "fp32", None, (f"fp32 instead of bf16: with these weights bf16 masks agree with fp32 only to Dice "
                          f"{record.get('dice', float('nan')):.3f} ({record.get('count_mismatches')} image(s) with "
                          f"another lesion count) on their held-out images; precision='bf16' forces it")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last (NHWC) storage for every 4-D weight, in place. ``Module.to(
    memory_format=…)`` refuses networks holding other ranks (MS-LKSeg's dynamic 5-D
    kernels), so tensors are converted one by one; others are left as they are."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def cpu_batch_size(height: int, width: int, threads: Optional[int] = None) -> int:
    """Inputs per batch on the CPU for ``height`` × ``width`` network inputs and
    ``threads`` torch threads (default: torch's current setting)."""
    threads = max(1, int(threads or torch.get_num_threads()))
    by_pixels = round(CPU_PIXELS_PER_BATCH / max(1, height * width))
    return int(max(1, min(CPU_MAX_BATCH, by_pixels, CPU_BATCH_PER_THREAD * threads)))


