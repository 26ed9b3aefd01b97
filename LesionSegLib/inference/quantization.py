"""int8 on the CPU, and how far lower precisions agree with fp32.

**int8** is post-training static quantization by onnxruntime
(``onnxruntime.quantization.quantize_static``): the fused fp32 graph of
:mod:`LesionSegLib.inference.onnx` gets QuantizeLinear/DequantizeLinear pairs (QDQ format,
int8 weights per output channel, int8 activations with ranges calibrated min–max on real
training images) and onnxruntime runs the convolutions with its integer kernels (MLAS:
AVX2, AVX512-VNNI, AMX-int8 as the CPU has them). docs/performance.md says why this engine
and not OpenVINO + NNCF (measured), and what it gives per network.

A quantized graph depends on the weights, the input shape and the calibration images; it
is kept in a cache folder (:func:`cache_dir`, one ``.onnx`` and one ``.json`` per network,
weights' SHA-256, input shape and calibration set), so the calibration is paid once. The
``.json`` holds the **agreement** with fp32 measured when the graph was made, on
calibration images held out of the calibration itself: Dice of the int8 and fp32 masks and
whether each image has the same number of lesions. Below :data:`AGREEMENT_DICE`, or with a
different lesion count, the Predictor warns (:class:`PrecisionWarning`).

The agreement measures are in :mod:`LesionSegLib.inference.agreement`.

Needs ``onnx`` and ``onnxruntime`` (``pip install "LesionSegLib[onnx]"``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .agreement import AGREEMENT_DICE, PrecisionWarning, agrees, compare_masks, describe, masks_from_logits

log = logging.getLogger("LesionSeg")

#: calibration images used at most (evenly spread over those given); every
#: HOLDOUT_EVERY-th one is held out of the calibration to measure the agreement
MAX_CALIBRATION = 32
HOLDOUT_EVERY = 4
#: calibration batches per onnxruntime calibration step
CALIBRATION_BATCH = 4


class QuantizationError(RuntimeError):
    """int8 cannot be prepared (no calibration images, quantization failed, …)."""


def cache_dir() -> Path:
    """Where quantized graphs are kept: ``int8`` in LesionSeg's cache folder
    (:func:`LesionSegLib.weights.cache_dir`, ``$LESIONSEG_CACHE`` or the platform's)."""
    from ..weights import cache_dir as root
    return root() / "int8"


# ----------------------------------------------------------------------------- calibration images
def calibration_items(source, limit: int = MAX_CALIBRATION) -> List[Any]:
    """Images (numpy (H, W[, C])) and volumes (``SimpleITK.Image``) to calibrate on, at
    most ``limit`` files spread evenly over those given. ``source``: a folder (its
    ``images``/``Imgs`` sub-folder when it has the usual image/mask layout; image and
    volume files, label volumes left out), a list of files, or a list of arrays /
    SimpleITK images."""
    from ..data.images import is_image_file, read_image
    from ..data.volumes import _is_label_name, is_volume_file, volume_stem
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise QuantizationError(f"{root}: no such folder of calibration images")
        try:
            from ..data.folders import detect_layout
            root = detect_layout(root).images
        except Exception:  # noqa: BLE001 - a plain folder of images or volumes
            pass
        files = sorted(p for p in root.iterdir() if p.is_file() and (
            is_image_file(p) or (is_volume_file(p) and not _is_label_name(volume_stem(p)))))
        if not files:
            raise QuantizationError(f"{root}: no image or volume files to calibrate on")
        source = files
    items = list(source)
    if not items:
        raise QuantizationError("no calibration images given")
    if len(items) > limit:
        items = [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]
    out = []
    for it in items:
        if isinstance(it, (str, os.PathLike)):
            p = Path(it)
            if is_volume_file(p) and not is_image_file(p):
                from .io import read_image as read_file
                it = read_file(p, verify=False)
            else:
                it = read_image(p)
        out.append(it)
    return out


def items_digest(items: Sequence[Any]) -> str:
    """SHA-256 over calibration items (pixels, shape, type), naming a calibration set."""
    h = hashlib.sha256()
    for it in items:
        if not isinstance(it, np.ndarray):
            import SimpleITK as sitk
            it = sitk.GetArrayViewFromImage(it)
        a = np.ascontiguousarray(it)
        h.update(f"{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- quantization
def int8_format(features: Optional[dict] = None) -> Dict[str, Any]:
    """How to quantize for this CPU (``features``: :func:`.runtime.cpu_features`).

    uint8 activations × int8 weights is the form onnxruntime's fast x86 kernels take. CPUs
    without VNNI multiply it with VPMADDUBSW, whose 16-bit intermediate sums saturate
    (onnxruntime's quantization notes), so there the weights keep 7 bits
    (``reduce_range``); VNNI and AMX accumulate in 32 bits and take all 8. Measured on
    the AVX2 CPU of docs/performance.md with the demo MSE-Net: full-range weights gave
    masks with Dice 0.63 against fp32, 7-bit ones 0.99, int8 activations 0.96 but
    slower than fp32 (no fast kernel)."""
    if features is None:
        from .runtime import cpu_features
        features = cpu_features()
    reduce = not (features.get("vnni") or features.get("amx_bf16"))
    return {"activations": "uint8", "weights": "int8 per channel", "reduce_range": reduce,
            "tag": "u8s8r7" if reduce else "u8s8"}


def quantize(fp32: bytes, inputs: np.ndarray, *, per_channel: bool = True,
             fmt: Optional[Dict[str, Any]] = None) -> bytes:
    """The int8 (QDQ) version of a serialised fp32 ONNX graph, calibrated (min–max) on
    ``inputs`` float32 (N, C, H, W), network inputs as the Predictor prepares them;
    ``fmt``: :func:`int8_format` (default: for this CPU)."""
    fmt = fmt or int8_format()
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
    except ImportError as e:
        raise QuantizationError(f"int8 needs onnx and onnxruntime ({e}); pip install \"LesionSegLib[onnx]\"") from e
    proto = onnx.load_from_string(fp32)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    fixed = dim0.dim_value if dim0.HasField("dim_value") else 0
    step = fixed or CALIBRATION_BATCH
    name = proto.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(inputs):
                return None
            chunk = np.ascontiguousarray(inputs[self.i:self.i + step], np.float32)
            self.i += step
            if fixed and len(chunk) < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), 0)])
            return {name: chunk}

    with tempfile.TemporaryDirectory(prefix="lesionseg-int8-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        try:  # shape inference and graph optimisation before quantizing, as onnxruntime advises
            from onnxruntime.quantization.shape_inference import quant_pre_process
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # noqa: BLE001 - quantize the graph as exported
            log.info("int8: pre-processing skipped (%s)", e)
            pre = src
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=bool(fmt["reduce_range"]), calibrate_method=CalibrationMethod.MinMax)
        return dst.read_bytes()


class Int8Runner:
    """The Predictor's int8 backend: a callable taking the float32 network input (B, C,
    H, W) and returning fp32 logits, through a quantized onnxruntime graph per input
    shape (C, H, W).

    Each shape's graph comes from the cache (:func:`cache_dir`) when it holds one for
    these weights (SHA-256 of the state dict) and this calibration set — any calibration
    set when none is given — else it is made: fp32 export, calibration on
    ``calibration`` (see :func:`calibration_items`), prepared into network inputs by
    ``prepare(items, (C, H, W)) → (N, C, H, W)``, the agreement with fp32 on held-out
    items, and stored. A graph whose agreement is below the bar is used with a
    :class:`PrecisionWarning`."""

    def __init__(self, module, name: str, card: Dict[str, Any], *, calibration=None,
                 prepare: Optional[Callable[[List[Any], Tuple[int, int, int]], np.ndarray]] = None,
                 cache=None, num_threads: Optional[int] = None) -> None:
        from . import onnx as graph_export  # (not the onnx library)
        self._ob = graph_export
        self.module, self.name, self.card = module, name, card
        self.weights_sha256 = graph_export.weights_digest(module)
        self.items = calibration_items(calibration) if calibration is not None else None
        self.calibration_sha256 = items_digest(self.items) if self.items is not None else None
        self.prepare = prepare
        self.cache = Path(cache).expanduser() if cache else cache_dir()
        self.num_threads = num_threads
        self.format = int8_format()
        self._sessions: Dict[Tuple[int, int, int], Any] = {}
        #: per input shape: what the cache's .json says (agreement, calibration, times)
        self.records: Dict[Tuple[int, int, int], Dict[str, Any]] = {}

    # -- the cache
    def _prefix(self, shape: Tuple[int, int, int]) -> str:
        import onnxruntime
        from .. import __version__
        c, h, w = shape
        return (f"{self.name}-{self.weights_sha256[:16]}-{c}x{h}x{w}-{self.format['tag']}-ort{onnxruntime.__version__}"
                f"-v{__version__}-cal")

    def cached(self, shape: Tuple[int, int, int]) -> Optional[Path]:
        """The cached graph for ``shape`` (this calibration set, else the newest)."""
        if not self.cache.is_dir():
            return None
        prefix = self._prefix(shape)
        if self.calibration_sha256:
            p = self.cache / f"{prefix}{self.calibration_sha256[:12]}.onnx"
            return p if p.is_file() and p.with_suffix(".json").is_file() else None
        found = [p for p in self.cache.glob(f"{prefix}*.onnx") if p.with_suffix(".json").is_file()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def prepare_shape(self, shape: Tuple[int, int, int]) -> Dict[str, Any]:
        """Load or make the int8 graph for ``shape``; returns its record."""
        shape = tuple(int(v) for v in shape)
        if shape in self._sessions:
            return self.records[shape]
        path = self.cached(shape)
        if path is not None:
            data = path.read_bytes()
            record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            record["cache_file"] = str(path)
        else:
            data, record = self._make(shape)
        self._sessions[shape] = self._ob.OnnxSession(data, num_threads=self.num_threads)
        self.records[shape] = record
        rep = record.get("agreement")
        if not agrees(rep):
            msg = (f"{self.name} in int8 ({shape[1]}×{shape[2]}): masks differ from fp32 on held-out calibration "
                   f"images: " + (describe(rep) if rep else "no agreement measured") +
                   f"; the bar is Dice ≥ {AGREEMENT_DICE} and equal lesion counts. Prefer precision 'fp32'.")
            log.warning(msg)
            warnings.warn(msg, PrecisionWarning, stacklevel=3)
        return record

    def _make(self, shape: Tuple[int, int, int]) -> Tuple[bytes, Dict[str, Any]]:
        if self.items is None or self.prepare is None:
            raise QuantizationError(
                f"{self.name}: no int8 graph for input {shape[0]}×{shape[1]}×{shape[2]} in {self.cache}; int8 needs "
                f"calibration images once (training images of this network: calibration=FOLDER, or "
                f"'lesionseg predict --precision int8 --calibration FOLDER')")
        t0 = time.perf_counter()
        inputs = np.asarray(self.prepare(self.items, shape), np.float32)
        if len(inputs) > MAX_CALIBRATION * 2:  # volumes give many slices: keep an even spread
            inputs = inputs[np.linspace(0, len(inputs) - 1, MAX_CALIBRATION * 2).round().astype(int)]
        held = np.arange(len(inputs)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        if held.all() or not held.any():
            held = np.zeros(len(inputs), bool)
            held[-1] = len(inputs) > 1
        calib = inputs[~held] if (~held).any() else inputs
        c, h, w = shape
        try:
            fp32, facts = self._ob.export_bytes(self.module, self.name, (h, w), c, batch=2, dynamic_batch=True,
                                                verify=False)
        except self._ob.OnnxError:  # a batch-dependent graph (MS-LKSeg): one input at a time
            fp32, facts = self._ob.export_bytes(self.module, self.name, (h, w), c, batch=1, verify=False)
        data = quantize(fp32, calib, fmt=self.format)
        t_quant = time.perf_counter() - t0
        agreement = None
        if held.any():
            ref = self._ob.OnnxSession(fp32, num_threads=self.num_threads).run(inputs[held])
            got = self._ob.OnnxSession(data, num_threads=self.num_threads).run(inputs[held])
            agreement = compare_masks(list(masks_from_logits(ref, self.card)), list(masks_from_logits(got, self.card)))
        import onnxruntime
        from .. import __version__
        record = {"model": self.name, "weights_sha256": self.weights_sha256, "input": list(shape),
                  "calibration": {"sha256": self.calibration_sha256, "items": len(self.items),
                                  "inputs": int((~held).sum()), "held_out": int(held.sum()), "method": "minmax"},
                  "format": dict(self.format, graph="QDQ"),
                  "agreement": agreement, "engine": f"onnxruntime {onnxruntime.__version__}",
                  "lesionseg_version": __version__, "seconds": round(t_quant, 2),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = self._ob.with_metadata(data, {
            self._ob.METADATA_PREFIX + "model": self.name,
            self._ob.METADATA_PREFIX + "card": json.dumps(self.card, ensure_ascii=False, default=str),
            self._ob.METADATA_PREFIX + "input_size": f"{h},{w}",
            self._ob.METADATA_PREFIX + "precision": "int8",
            self._ob.METADATA_PREFIX + "output": str(self.card.get("outputs", {}).get("inference"))})
        self._store(shape, data, record)
        return data, record

    def _store(self, shape, data: bytes, record: Dict[str, Any]) -> None:
        from ..fileio import atomic_write_bytes
        path = self.cache / f"{self._prefix(shape)}{(self.calibration_sha256 or 'none')[:12]}.onnx"
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            # the record last: a graph counts as cached only with its record
            atomic_write_bytes(path.with_suffix(".json"), json.dumps(record, indent=2).encode("utf-8"))
            record["cache_file"] = str(path)
        except OSError as e:  # a read-only cache must not stop inference
            warnings.warn(f"cannot write the int8 cache {self.cache}: {e}", stacklevel=4)

    # -- running
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        shape = tuple(int(v) for v in x.shape[1:])
        if shape not in self._sessions:
            self.prepare_shape(shape)
        return self._sessions[shape].run(x)


