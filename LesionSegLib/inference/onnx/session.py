"""onnxruntime sessions of LesionSeg networks: :class:`OnnxSession`, and the
Predictor's onnxruntime runner (:func:`create_runner`)."""
from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ...fileio import atomic_write_bytes
from .common import METADATA_PREFIX, OnnxError, check_size, decode_metadata, first_line, import_optional, \
    resolve_network, with_metadata
from .export import export_bytes, weights_digest


def create_runner(source, *, name: Optional[str] = None, card: Optional[Dict[str, Any]] = None,
                  device: str = "cpu", precision: Optional[str] = None, num_threads: Optional[int] = None,
                  cache_dir=None, verify: bool = True) -> "OnnxSession":
    """The Predictor's onnxruntime backend: an :class:`OnnxSession` (callable: float32
    (B, C, H, W) numpy batch → logits (B, K, H, W)) for ``source`` (an ``.onnx`` file, a
    network, checkpoint or registry name). ``card`` (with its preset) replaces the one
    derived from ``source``; ``name`` must agree with it. Only float32 is run; a CUDA
    device is used when onnxruntime has the CUDA provider, else the CPU (with a warning)."""
    ort = import_optional("onnxruntime")
    if precision not in (None, "auto", "fp32", "float32"):
        raise OnnxError(f"the onnxruntime backend runs float32 only, not precision {precision!r}")
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            warnings.warn("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); "
                          "running on the CPU", stacklevel=2)
    preset = ((card or {}).get("preset") or {}).get("name")
    session = OnnxSession(source, preset=preset, num_threads=num_threads, providers=providers,
                          cache_dir=cache_dir, verify=verify)
    if name and session.model_name and session.model_name != name:
        raise OnnxError(f"{source}: holds network {session.model_name!r}, not {name!r}")
    if card is not None:
        session.metadata = dict(session.metadata, card=card)
    return session


class OnnxSession:
    """onnxruntime CPU session for a LesionSeg network.

    ``path_or_model``: an ``.onnx`` file (or its bytes) written by :func:`export`; or a
    network (registry name, checkpoint path, :class:`Checkpoint`, module built by
    ``models.create``), exported in memory on first use for each input size (C, H, W),
    with a dynamic batch where the network allows it and a fixed one otherwise.

    :meth:`run` takes float32 (N, C, H, W) and returns the inference output's logits. A
    graph with a fixed batch runs larger or smaller batches in chunks (samples are
    independent in every LesionSeg network at inference).

    Options: ``num_threads`` (onnxruntime intra-op threads; default: its own choice, the
    physical cores), ``verify`` (compare each in-memory export with torch on one sample,
    one extra torch forward per shape), ``cache_dir`` (keep exported graphs on disk, named
    by a digest of the weights, the shape and the LesionSeg version, so later sessions skip
    the export), ``exporter`` (see :func:`export`).
    """

    #: exported graphs kept per input shape for in-memory networks (each holds the weights)
    MAX_CACHED_GRAPHS = 3

    def __init__(self, path_or_model, *, preset: Optional[str] = None, checkpoint=None,
                 num_threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 exporter: str = "auto", verify: bool = True, cache_dir=None):
        self._ort = import_optional("onnxruntime")
        # exported graphs of in-memory networks are kept here across sessions, named by a
        # digest of the weights, so the export (seconds to a minute) is paid once per shape
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._digest: Optional[str] = None
        self.num_threads = num_threads
        self.providers = list(providers or ["CPUExecutionProvider"])
        self._sessions: "OrderedDict[Tuple, Any]" = OrderedDict()
        self._exporter, self._verify = exporter, verify
        self._module = None
        self._dynamic_batch_ok = True
        #: why an in-memory network is exported with a fixed batch (None while it is not)
        self.dynamic_batch_error: Optional[str] = None
        self.path: Optional[str] = None
        if isinstance(path_or_model, (bytes, bytearray)) or (
                isinstance(path_or_model, (str, os.PathLike)) and str(path_or_model).lower().endswith(".onnx")):
            if not isinstance(path_or_model, (bytes, bytearray)):
                self.path = str(path_or_model)
                if not Path(self.path).is_file():
                    raise OnnxError(f"{self.path}: no such ONNX file")
            session = self._make_session(path_or_model if isinstance(path_or_model, (bytes, bytearray))
                                         else self.path)
            self.metadata = decode_metadata(session.get_modelmeta().custom_metadata_map)
            self._fixed = session
        else:
            module, name, card, provenance, _ = resolve_network(path_or_model, preset=preset, checkpoint=checkpoint)
            self._module, self._name = module, name
            self.metadata = {"model": name, "card": card, "provenance": provenance,
                             "preset": (card.get("preset") or {}).get("name", "")}
            self._fixed = None

    # -- description
    @property
    def card(self) -> Dict[str, Any]:
        return self.metadata.get("card", {}) if isinstance(self.metadata.get("card"), dict) else {}

    @property
    def model_name(self) -> Optional[str]:
        return self.metadata.get("model")

    @property
    def input_shape(self) -> Optional[Tuple]:
        """(N, C, H, W) of a loaded file's input; None entries are dynamic. None for
        in-memory networks (any shape)."""
        if self._fixed is None:
            return None
        return tuple(d if isinstance(d, int) else None for d in self._fixed.get_inputs()[0].shape)

    # -- running
    def _make_session(self, source):
        so = self._ort.SessionOptions()
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.num_threads:
            so.intra_op_num_threads = int(self.num_threads)
            so.inter_op_num_threads = 1
        try:
            return self._ort.InferenceSession(source, sess_options=so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            where = self.path or "ONNX model"
            raise OnnxError(f"{where}: onnxruntime cannot load it: {first_line(e)}") from e

    def _session_for(self, shape: Tuple[int, int, int, int]):
        if self._fixed is not None:
            return self._fixed
        n, c, h, w = shape
        # keyed by (C, H, W): a graph of fixed batch serves other batch sizes in chunks
        key = (c, h, w)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        check_size(self.card, (h, w))
        data = self._cached(c, h, w, n)
        if data is None and self._dynamic_batch_ok:
            try:
                data, _ = export_bytes(self._module, self._name, (h, w), c, batch=max(1, min(n, 2)),
                                       dynamic_batch=True, exporter=self._exporter, verify=self._verify)
                self._store(data, c, h, w, None)
            except OnnxError as e:
                # e.g. MS-LKSeg: batch-dependent graph; fall back to graphs of fixed batch
                self._dynamic_batch_ok = False
                self.dynamic_batch_error = str(e)
                self._store(str(e).encode(), c, h, w, None, failed=True)
        if data is None:
            data, _ = export_bytes(self._module, self._name, (h, w), c, batch=n, dynamic_batch=False,
                                   exporter=self._exporter, verify=self._verify)
            self._store(data, c, h, w, n)
        session = self._make_session(data)
        self._sessions[key] = session
        while len(self._sessions) > self.MAX_CACHED_GRAPHS:
            self._sessions.popitem(last=False)
        return session

    # -- on-disk cache of exported graphs
    def _cache_path(self, c: int, h: int, w: int, n: Optional[int], failed: bool = False) -> Path:
        from ... import __version__
        if self._digest is None:
            self._digest = weights_digest(self._module)
        # the package version is part of the name: network code may change without the weights
        batch = "dyn" if n is None else f"b{n}"
        name = (f"{self._name}-{self._digest[:20]}-{c}x{h}x{w}-{batch}-{self._exporter}-"
                f"v{__version__}{'.failed' if failed else '.onnx'}")
        return self.cache_dir / name

    def _cached(self, c: int, h: int, w: int, n: int) -> Optional[bytes]:
        if self.cache_dir is None:
            return None
        dynamic = self._cache_path(c, h, w, None)
        if dynamic.is_file():
            return dynamic.read_bytes()
        marker = self._cache_path(c, h, w, None, failed=True)
        if marker.is_file():
            self._dynamic_batch_ok = False
            self.dynamic_batch_error = marker.read_text(encoding="utf-8", errors="replace")
        fixed = self._cache_path(c, h, w, n)
        return fixed.read_bytes() if fixed.is_file() else None

    def _store(self, data: bytes, c: int, h: int, w: int, n: Optional[int], failed: bool = False) -> None:
        if self.cache_dir is None:
            return
        if not failed:  # cached graphs are ordinary LesionSeg ONNX files, card included
            data = with_metadata(data, {METADATA_PREFIX + "model": self._name,
                                         METADATA_PREFIX + "card": json.dumps(self.card, ensure_ascii=False),
                                         METADATA_PREFIX + "input_size": f"{h},{w}",
                                         METADATA_PREFIX + "output": str(self.card.get("outputs", {}).get("inference"))})
        try:
            atomic_write_bytes(self._cache_path(c, h, w, n, failed), data)
        except OSError as e:  # a read-only cache folder must not stop inference
            warnings.warn(f"cannot write the ONNX cache {self.cache_dir}: {e}", stacklevel=3)

    def run(self, batch) -> np.ndarray:
        """Logits (N, K, H, W) float32 of the inference output for ``batch`` (N, C, H, W)."""
        x = np.asarray(batch.detach().cpu().numpy() if hasattr(batch, "detach") else batch)
        if x.ndim != 4:
            raise OnnxError(f"run() takes an (N, C, H, W) batch, got shape {x.shape}")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        x = np.ascontiguousarray(x)
        session = self._session_for(x.shape)
        expected = session.get_inputs()[0].shape
        names = ("batch", "channels", "height", "width")
        for axis in (1, 2, 3):
            if isinstance(expected[axis], int) and expected[axis] != x.shape[axis]:
                raise OnnxError(
                    f"{self.path or 'ONNX model'}: exported for input (N, {expected[1]}, {expected[2]}, "
                    f"{expected[3]}) but got {names[axis]} {x.shape[axis]} (shape {x.shape}); export again "
                    f"with that size (lesionseg export-onnx --size H W) or resize the input")
        fixed_n = expected[0] if isinstance(expected[0], int) else None
        if fixed_n is None or fixed_n == x.shape[0]:
            return session.run(None, {session.get_inputs()[0].name: x})[0]
        outs = []
        for start in range(0, x.shape[0], fixed_n):
            chunk = x[start:start + fixed_n]
            m = chunk.shape[0]
            if m < fixed_n:  # pad the last chunk; the padded samples' outputs are dropped
                chunk = np.concatenate([chunk, np.zeros((fixed_n - m,) + chunk.shape[1:], np.float32)])
            outs.append(session.run(None, {session.get_inputs()[0].name: chunk})[0][:m])
        return np.concatenate(outs)

    __call__ = run
