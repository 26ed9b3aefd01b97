"""ONNX export of LesionSeg networks, and an onnxruntime (CPU) session to run them.

What is exported is the *inference form*: the network after
:func:`LesionSegLib.models.fusion.fuse_for_inference` (BatchNorm folded, re-parameterised
branches merged), wrapped so that the graph has one input ``image`` (N, C, H, W) float32
and one output ``logits``: the output named by the card's ``outputs.inference`` (the
deep-supervision side outputs of BSNet and L-Seg are not in the graph). The model card
(with the task preset, as in a LesionSeg checkpoint) is stored in the ONNX file's
``metadata_props`` under ``lesionseg.card``, so an ``.onnx`` file is self-describing.

Running a session needs only ``onnxruntime`` and numpy (no torch); exporting needs torch
and ``onnx``. Install both with ``pip install "LesionSegLib[onnx]"``.

>>> from LesionSegLib import onnx_backend
>>> onnx_backend.export("unet", "unet.onnx", size=(352, 352))      # doctest: +SKIP
>>> s = onnx_backend.OnnxSession("unet.onnx")                       # doctest: +SKIP
>>> logits = s.run(batch)          # (N, 1, 352, 352) float32       # doctest: +SKIP

Whether onnxruntime is faster than torch depends on the network: see docs/onnx.md.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .fileio import atomic_write_bytes

METADATA_PREFIX = "lesionseg."
METADATA_FORMAT_VERSION = 1
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INSTALL_HINT = 'install it with: pip install "LesionSegLib[onnx]" (onnx and onnxruntime)'


class OnnxError(RuntimeError):
    """An export or ONNX session problem, with the reason."""


def _import(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OnnxError(f"{module} is not installed; {INSTALL_HINT}") from e


def available() -> bool:
    """True when onnxruntime can be imported (sessions can run)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------- network
def card_with_preset(name: str, preset: Optional[str]) -> Dict[str, Any]:
    """The card of ``name`` with the task preset merged under ``"preset"``, the layout
    :func:`LesionSegLib.checkpoint.save` writes, so checkpoints and ONNX files agree."""
    from . import models
    c = models.card(name)
    c["preset"] = models.preset(name, preset)
    return c


def _preset_input(card: Dict[str, Any]) -> Dict[str, Any]:
    spec = dict(card.get("input", {}))
    spec.update((card.get("preset") or {}).get("input", {}))
    return spec


def resolve_network(model, *, preset: Optional[str] = None, checkpoint=None):
    """``(module, name, card, provenance, config)`` from a registry name (random weights
    unless ``checkpoint`` is given), a checkpoint path, a :class:`Checkpoint`, or an
    ``nn.Module`` built by ``models.create``."""
    from . import checkpoint as ckpt
    from . import models
    if checkpoint is not None:
        ck = checkpoint if isinstance(checkpoint, ckpt.Checkpoint) else ckpt.load(checkpoint, model=model if isinstance(model, str) else None, preset=preset)
        return _from_checkpoint(ck, preset)
    if isinstance(model, ckpt.Checkpoint):
        return _from_checkpoint(model, preset)
    if isinstance(model, (str, os.PathLike)):
        try:
            name = models._resolve(str(model))
        except models.UnknownModelError:
            if not Path(model).is_file():
                raise
            return _from_checkpoint(ckpt.load(model, preset=preset), preset)
        preset_config = models.preset(name, preset).get("config", {}) if preset else {}
        return (models.create(name, preset=preset), name, card_with_preset(name, preset),
                {"weights": "random initialisation (no checkpoint given)"}, models.config(name, **preset_config))
    name = getattr(model, "lesionseg_name", None)
    if name is None:
        raise OnnxError("the network was not built by LesionSegLib.models.create (no lesionseg_name); "
                        "its inference output and card are unknown")
    return model, name, card_with_preset(name, preset), {}, {}


def _from_checkpoint(ck, preset):
    from . import models
    if ck.kind == "backbone":
        raise OnnxError(f"{ck.path}: is an ImageNet backbone file ({ck.name}), not a segmentation network")
    card = dict(ck.card) if ck.card else models.card(ck.name)
    # the checkpoint's preset unless the caller names another; official files carry none
    if "preset" not in card or (preset and (card.get("preset") or {}).get("name") != preset):
        card["preset"] = models.preset(ck.name, preset or (ck.provenance or {}).get("preset"))
    prov = dict(ck.provenance)
    if ck.path:
        prov.setdefault("checkpoint", Path(ck.path).name)
    return ck.model, ck.name, card, prov, dict(ck.config)


def input_channels(card: Dict[str, Any], config: Optional[Dict[str, Any]] = None) -> int:
    """Input channels of the network: the constructor's ``in_channels`` when known (a
    preset may build a 3-channel U-Net), else the preset's / card's ``input.channels``."""
    if config and "in_channels" in config:
        return int(config["in_channels"])
    return int(_preset_input(card).get("channels", 1))


def default_size(card: Dict[str, Any]) -> Tuple[int, int]:
    size = _preset_input(card).get("size")
    if not size:
        raise OnnxError(f"model {card.get('name')!r} has no input size in its card or preset; pass size=(H, W)")
    return int(size[0]), int(size[1])


def check_size(card: Dict[str, Any], size: Sequence[int]) -> Tuple[int, int]:
    """(H, W) checked against the card's ``size_divisor`` and ``min_size``."""
    if len(size) != 2:
        raise OnnxError(f"size must be (H, W), got {tuple(size)}")
    h, w = int(size[0]), int(size[1])
    spec = _preset_input(card)
    div, low = int(spec.get("size_divisor", 1)), int(spec.get("min_size", 1))
    if h % div or w % div or min(h, w) < low:
        raise OnnxError(f"{card.get('name')}: size {h}×{w} is not allowed; H and W must be multiples of "
                        f"{div} and at least {low}")
    return h, w


def _inference_wrapper(module, name: str):
    import torch.nn as nn
    from . import models

    class InferenceOutput(nn.Module):
        """The network with only its inference output, the graph ONNX should contain."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            return models.inference_output(name, self.net(image))

    return InferenceOutput(module).eval()


# -------------------------------------------------------------------------- export
@contextlib.contextmanager
def _exporter_quiet():
    """Silence the torch exporters for the duration of an export.

    They warn about every Python shape check they trace through (TracerWarning), about
    their own deprecation and missing torchvision, print progress, and the TorchScript
    exporter of torch 2.9+ dumps the whole graph to the native stderr when an export
    fails (its log switch is always on). None of it is actionable for a user; errors are
    reported through the exception and the result is verified numerically. The native
    file descriptors are redirected too, since that dump bypasses ``sys.stderr``.
    """
    import logging
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    saved_fds = []
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            for fd in (1, 2):
                try:
                    sys.stdout.flush() if fd == 1 else sys.stderr.flush()
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except (OSError, ValueError, AttributeError):  # no such descriptor (embedded Python)
                    pass
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            for fd, saved in saved_fds:
                os.dup2(saved, fd)
                os.close(saved)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _torch_export(wrapper, example, buf, *, dynamic_batch: bool, opset: int, exporter: str) -> str:
    """Run torch.onnx.export with the chosen exporter; returns the exporter used.

    ``auto`` uses the TorchScript-based exporter: on this project's networks it exports
    4-6× faster than the torch.export-based ("dynamo") one, needs no ``onnxscript`` and
    gave the same outputs (docs/onnx.md). Only when it is missing (it is deprecated since
    torch 2.9 and will be removed) does ``auto`` go on to the dynamo exporter; a network
    the TorchScript exporter rejects is reported, with ``exporter="dynamo"`` to try.
    """
    import torch
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}.get(exporter)
    if order is None:
        raise OnnxError(f"unknown exporter {exporter!r}; use auto, torchscript or dynamo")
    tried = []
    for kind in order:
        buf.seek(0)
        buf.truncate()
        try:
            if kind == "dynamo":
                _import("onnxscript")
            with _exporter_quiet():
                if kind == "torchscript":
                    torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=opset,
                                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
                                      if dynamic_batch else None, do_constant_folding=True)
                else:
                    shapes = {"image": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
                    prog = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=max(opset, 18),
                                             input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                             dynamic_shapes=shapes, external_data=False, verbose=False)
                    buf.write(prog.model_proto.SerializeToString())
            return kind
        except (ImportError, AttributeError, TypeError, NotImplementedError, OnnxError) as e:
            # the exporter itself is unavailable in this torch: try the next one
            tried.append(f"{kind} exporter unavailable: {type(e).__name__}: {_first_line(e)}")
        except Exception as e:  # noqa: BLE001 - the network cannot be exported by this exporter
            tried.append(f"{kind} exporter: {type(e).__name__}: {_first_line(e)}")
            break
    hint = "" if exporter == "dynamo" else " (the other exporter may work: exporter='dynamo')"
    raise OnnxError("ONNX export failed; " + "; ".join(tried) + hint)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    # the TorchScript exporter appends the offending graph value after " [Caused by"
    return (text[0] if text else "").split(" [Caused by")[0][:limit]


def _verify(wrapper, data: bytes, channels: int, size: Tuple[int, int], batches: Sequence[int],
            rtol: float = 1e-4) -> float:
    """Run the exported graph and the torch wrapper on the same random input for each
    batch size; raise if they differ. Returns the largest abs difference."""
    import torch
    ort = _import("onnxruntime")
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1234)
    worst = 0.0
    for n in batches:
        x = torch.randn(n, channels, *size, generator=g)
        with torch.inference_mode():
            ref = wrapper(x).float().numpy()
        out = sess.run(None, {INPUT_NAME: x.numpy()})[0]
        if out.shape != ref.shape:
            raise OnnxError(f"exported graph returns shape {out.shape} for batch {n}, torch {ref.shape}")
        diff = float(np.abs(out - ref).max())
        scale = float(np.abs(ref).max())
        # relative to the output's magnitude: random-weight nets can reach huge logits
        if not diff <= rtol * max(scale, 1.0):
            raise OnnxError(f"exported graph differs from torch at batch {n}: max |diff| {diff:.3g} "
                            f"(output scale {scale:.3g})")
        worst = max(worst, diff)
    return worst


def export_bytes(module, name: str, size: Sequence[int], channels: int, *, batch: int = 1,
                 dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, fuse: bool = True,
                 exporter: str = "auto", verify: bool = True) -> Tuple[bytes, Dict[str, Any]]:
    """Serialised ONNX model of ``module``'s inference output (no metadata), and a dict of
    facts about the export (exporter, max_abs_diff). ``fuse`` applies
    ``fuse_for_inference`` unless the module is already fused."""
    import torch
    from .models.fusion import fuse_for_inference
    if fuse and not getattr(module, "lesionseg_is_fused", False):
        net = fuse_for_inference(module)  # a copy
    else:
        # never switch the caller's module to eval mode or move it off its device
        moved = any(p.device.type != "cpu" or p.dtype != torch.float32 for p in module.parameters())
        net = copy.deepcopy(module) if module.training or moved else module
    net = net.eval().float().cpu()
    wrapper = _inference_wrapper(net, name)
    h, w = int(size[0]), int(size[1])
    # torch.export specialises a dimension of size 1; trace a dynamic batch with 2 samples
    example = torch.zeros(max(batch, 2) if dynamic_batch else batch, channels, h, w)
    buf = io.BytesIO()
    try:
        used = _torch_export(wrapper, example, buf, dynamic_batch=dynamic_batch, opset=opset, exporter=exporter)
    except OnnxError as e:
        if dynamic_batch:
            raise OnnxError(f"{name}: {e}. A dynamic batch is impossible when the graph depends on the "
                            f"batch size (MS-LKSeg's dynamic convolution uses it as the convolution's group "
                            f"count); export with a fixed batch instead (no --dynamic-batch)") from e
        raise OnnxError(f"{name}: {e}") from e
    data = buf.getvalue()
    facts = {"exporter": used, "opset": opset, "batch": "dynamic" if dynamic_batch else batch}
    if verify:
        # a dynamic graph is traced with 2 samples and checked with 1: a batch size baked
        # into the graph would show; one sample keeps the check cheap (one torch forward)
        batches = (1,) if dynamic_batch else (batch,)
        facts["max_abs_diff"] = _verify(wrapper, data, channels, (h, w), batches)
    return data, facts


def _with_metadata(data: bytes, meta: Dict[str, str]) -> bytes:
    onnx = _import("onnx")
    proto = onnx.load_from_string(data)
    keep = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = f"LesionSeg {meta.get(METADATA_PREFIX + 'model', '')}: inference output " \
                       f"{meta.get(METADATA_PREFIX + 'output', '')} (logits)"
    return proto.SerializeToString()


def export(model_name_or_module, path, size: Optional[Sequence[int]] = None, *, preset: Optional[str] = None,
           checkpoint=None, batch: int = 1, dynamic_batch: bool = False, channels: Optional[int] = None,
           opset: int = DEFAULT_OPSET, exporter: str = "auto", overwrite: bool = False,
           verify: bool = True) -> Dict[str, Any]:
    """Export the fused inference form of a network to ``path`` (written atomically).

    ``model_name_or_module``: a registry name (random weights unless ``checkpoint``), a
    checkpoint path / :class:`Checkpoint`, or a module built by ``models.create``.
    ``size`` (H, W) defaults to the preset's input size. The batch is fixed (``batch``)
    unless ``dynamic_batch``. With ``verify`` the exported graph is run by onnxruntime and
    compared with torch (relative tolerance 1e-4). An existing ``path`` is only replaced
    with ``overwrite``. Returns the metadata written (card decoded) plus export facts.
    """
    from . import __version__
    path = Path(path)
    if path.exists() and not overwrite:
        raise OnnxError(f"{path} exists; choose another output or allow overwriting")
    for src in (checkpoint, model_name_or_module):
        if isinstance(src, (str, os.PathLike)) and Path(src).is_file() and Path(src).resolve() == path.resolve():
            raise OnnxError(f"{path}: the output would overwrite the input checkpoint")
    module, name, card, provenance, config = resolve_network(model_name_or_module, preset=preset, checkpoint=checkpoint)
    size = check_size(card, size if size is not None else default_size(card))
    channels = int(channels) if channels else input_channels(card, config)
    if batch < 1:
        raise OnnxError(f"batch must be ≥ 1, got {batch}")
    data, facts = export_bytes(module, name, size, channels, batch=batch, dynamic_batch=dynamic_batch,
                               opset=opset, exporter=exporter, verify=verify)
    out_name = card.get("outputs", {}).get("inference") or card.get("preset", {}).get("outputs", {}).get("inference")
    meta = {
        "format": "lesionseg.onnx", "format_version": str(METADATA_FORMAT_VERSION),
        "model": name, "preset": str((card.get("preset") or {}).get("name") or ""),
        "output": str(out_name), "input_size": f"{size[0]},{size[1]}", "input_channels": str(channels),
        "batch": str(facts["batch"]), "card": json.dumps(card, ensure_ascii=False),
        "provenance": json.dumps(provenance, ensure_ascii=False, default=str),
        "lesionseg_version": __version__, "exporter": facts["exporter"],
    }
    atomic_write_bytes(path, _with_metadata(data, {METADATA_PREFIX + k: v for k, v in meta.items()}))
    result = dict(meta, card=card, provenance=provenance, path=str(path))
    if "max_abs_diff" in facts:
        result["max_abs_diff"] = facts["max_abs_diff"]
    return result


def metadata(source) -> Dict[str, Any]:
    """All LesionSeg metadata of an ONNX file or serialised model (card and provenance
    decoded); ``{}`` for an ONNX file that LesionSeg did not write."""
    onnx = _import("onnx")
    try:
        if isinstance(source, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(source), load_external_data=False)
        else:
            proto = onnx.load(str(source), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError …
        raise OnnxError(f"{source if not isinstance(source, (bytes, bytearray)) else 'ONNX data'}: "
                        f"not a readable ONNX model ({_first_line(e)})") from e
    return _decode_metadata({p.key: p.value for p in proto.metadata_props})


def read_metadata(source) -> Tuple[str, Dict[str, Any]]:
    """``(registry name, card)`` of an ONNX file written by :func:`export` (the card with
    its preset, as in a checkpoint) — what the Predictor needs to use the file."""
    meta = metadata(source)
    name, card = meta.get("model"), meta.get("card")
    if not name or not isinstance(card, dict):
        raise OnnxError(f"{source}: has no LesionSeg metadata (lesionseg.model / lesionseg.card); "
                        f"export it with 'lesionseg export-onnx'")
    return name, card


def create_runner(source, *, name: Optional[str] = None, card: Optional[Dict[str, Any]] = None,
                  device: str = "cpu", precision: Optional[str] = None, num_threads: Optional[int] = None,
                  cache_dir=None, verify: bool = True) -> "OnnxSession":
    """The Predictor's onnxruntime backend: an :class:`OnnxSession` (callable: float32
    (B, C, H, W) numpy batch → logits (B, K, H, W)) for ``source`` (an ``.onnx`` file, a
    network, checkpoint or registry name). ``card`` (with its preset) replaces the one
    derived from ``source``; ``name`` must agree with it. Only float32 is run; a CUDA
    device is used when onnxruntime has the CUDA provider, else the CPU (with a warning)."""
    ort = _import("onnxruntime")
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


def _decode_metadata(props: Dict[str, str]) -> Dict[str, Any]:
    meta: Dict[str, Any] = {}
    for k, text in props.items():
        if not k.startswith(METADATA_PREFIX):
            continue
        key = k[len(METADATA_PREFIX):]
        meta[key] = text
        if key in ("card", "provenance"):
            try:
                meta[key] = json.loads(text)
            except ValueError:  # written by someone else: keep the text
                pass
    return meta


def weights_digest(module) -> str:
    """SHA-256 over a module's state dict (names, shapes, dtypes, bytes)."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------- session
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
        self._ort = _import("onnxruntime")
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
            self.metadata = _decode_metadata(session.get_modelmeta().custom_metadata_map)
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
            raise OnnxError(f"{where}: onnxruntime cannot load it: {_first_line(e)}") from e

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
        from . import __version__
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
            data = _with_metadata(data, {METADATA_PREFIX + "model": self._name,
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
