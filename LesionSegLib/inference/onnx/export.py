"""Export of a network's fused inference form to ONNX, and the metadata of ONNX files."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ...fileio import atomic_write_bytes
from .common import (DEFAULT_OPSET, INPUT_NAME, METADATA_FORMAT_VERSION, METADATA_PREFIX, OUTPUT_NAME, OnnxError,
                     check_size, decode_metadata, default_size, first_line, import_optional, inference_wrapper,
                     input_channels, resolve_network, with_metadata)


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
                import_optional("onnxscript")
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
            tried.append(f"{kind} exporter unavailable: {type(e).__name__}: {first_line(e)}")
        except Exception as e:  # noqa: BLE001 - the network cannot be exported by this exporter
            tried.append(f"{kind} exporter: {type(e).__name__}: {first_line(e)}")
            break
    hint = "" if exporter == "dynamo" else " (the other exporter may work: exporter='dynamo')"
    raise OnnxError("ONNX export failed; " + "; ".join(tried) + hint)


def _verify(wrapper, data: bytes, channels: int, size: Tuple[int, int], batches: Sequence[int],
            rtol: float = 1e-4) -> float:
    """Run the exported graph and the torch wrapper on the same random input for each
    batch size; raise if they differ. Returns the largest abs difference."""
    import torch
    ort = import_optional("onnxruntime")
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
    from ...models.fusion import fuse_for_inference
    if fuse and not getattr(module, "lesionseg_is_fused", False):
        net = fuse_for_inference(module)  # a copy
    else:
        # never switch the caller's module to eval mode or move it off its device
        moved = any(p.device.type != "cpu" or p.dtype != torch.float32 for p in module.parameters())
        net = copy.deepcopy(module) if module.training or moved else module
    net = net.eval().float().cpu()
    wrapper = inference_wrapper(net, name)
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
    from ... import __version__
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
    atomic_write_bytes(path, with_metadata(data, {METADATA_PREFIX + k: v for k, v in meta.items()}))
    result = dict(meta, card=card, provenance=provenance, path=str(path))
    if "max_abs_diff" in facts:
        result["max_abs_diff"] = facts["max_abs_diff"]
    return result


def metadata(source) -> Dict[str, Any]:
    """All LesionSeg metadata of an ONNX file or serialised model (card and provenance
    decoded); ``{}`` for an ONNX file that LesionSeg did not write."""
    onnx = import_optional("onnx")
    try:
        if isinstance(source, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(source), load_external_data=False)
        else:
            proto = onnx.load(str(source), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError …
        raise OnnxError(f"{source if not isinstance(source, (bytes, bytearray)) else 'ONNX data'}: "
                        f"not a readable ONNX model ({first_line(e)})") from e
    return decode_metadata({p.key: p.value for p in proto.metadata_props})


def read_metadata(source) -> Tuple[str, Dict[str, Any]]:
    """``(registry name, card)`` of an ONNX file written by :func:`export` (the card with
    its preset, as in a checkpoint) — what the Predictor needs to use the file."""
    meta = metadata(source)
    name, card = meta.get("model"), meta.get("card")
    if not name or not isinstance(card, dict):
        raise OnnxError(f"{source}: has no LesionSeg metadata (lesionseg.model / lesionseg.card); "
                        f"export it with 'lesionseg export-onnx'")
    return name, card


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
