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

>>> from LesionSegLib.inference import onnx
>>> onnx.export("unet", "unet.onnx", size=(352, 352))      # doctest: +SKIP
>>> s = onnx.OnnxSession("unet.onnx")                       # doctest: +SKIP
>>> logits = s.run(batch)          # (N, 1, 352, 352) float32       # doctest: +SKIP

Whether onnxruntime is faster than torch depends on the network: see docs/onnx.md.
"""
from __future__ import annotations

from .common import (DEFAULT_OPSET, INPUT_NAME, METADATA_PREFIX, OUTPUT_NAME, OnnxError, available,
                     check_size, default_size, input_channels, resolve_network, with_metadata)
from .export import export, export_bytes, metadata, read_metadata, weights_digest
from .session import OnnxSession, create_runner

__all__ = ["OnnxError", "OnnxSession", "available", "check_size", "create_runner",
           "default_size", "export", "export_bytes", "input_channels", "metadata", "read_metadata",
           "resolve_network", "weights_digest", "with_metadata", "DEFAULT_OPSET", "INPUT_NAME", "METADATA_PREFIX", "OUTPUT_NAME"]
