"""``lesionseg export-onnx``: write a network's fused inference form as an ONNX file.

The graph has one input ``image`` (N, C, H, W) float32, already normalised as the card
says, and one output ``logits`` (the card's inference output; deep-supervision side
outputs are left out). The model card with its preset is stored in the file's metadata
(``lesionseg.card``). The export is verified: onnxruntime and torch are run on the same
random input and must agree (relative 1e-4), and the largest difference is printed.
"""
from __future__ import annotations

import argparse
import sys

from ..validation import arg_type, number


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "export-onnx", help="export a network (fused inference form) to ONNX",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", help="network name (needed unless --checkpoint names it)")
    s.add_argument("--checkpoint", help="LesionSeg checkpoint or official weight file; without it the "
                                        "weights are random (for testing the pipeline only)")
    s.add_argument("--preset", help="task preset (input size, channels, classes); default: the "
                                    "checkpoint's, else the card's default")
    s.add_argument("-o", "--output", required=True, help="ONNX file to write")
    s.add_argument("--size", nargs=2, type=arg_type(number, lo=1, integer=True), metavar=("H", "W"),
                   help="input height and width (default: the preset's size)")
    s.add_argument("--batch", type=arg_type(number, lo=1, integer=True), default=1, help="fixed batch size of the graph (default 1)")
    s.add_argument("--dynamic-batch", action="store_true",
                   help="leave the batch dimension free (not possible for MS-LKSeg)")
    s.add_argument("--opset", type=arg_type(number, lo=7, integer=True), default=17, help="ONNX opset (default 17)")
    s.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                   help="torch exporter (default: TorchScript-based, then torch.export-based)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference import onnx
    if not args.model and not args.checkpoint:
        print("lesionseg export-onnx: error: give --model and/or --checkpoint", file=sys.stderr)
        return 2
    try:
        info = onnx.export(args.model or args.checkpoint, args.output, size=args.size,
                                   preset=args.preset, checkpoint=args.checkpoint if args.model else None,
                                   batch=args.batch, dynamic_batch=args.dynamic_batch, opset=args.opset,
                                   exporter=args.exporter, overwrite=args.overwrite)
    except onnx.OnnxError as e:
        print(f"lesionseg export-onnx: error: {e}", file=sys.stderr)
        return 1
    h, w = info["input_size"].split(",")
    print(f"wrote {info['path']}: {info['model']} (preset {info['preset'] or '-'}), input "
          f"{info['batch']}×{info['input_channels']}×{h}×{w} → logits of output '{info['output']}'; "
          f"exporter {info['exporter']}")
    if "max_abs_diff" in info:
        print(f"verified against torch: max |diff| {info['max_abs_diff']:.3g}")
    if "random" in str(info["provenance"].get("weights", "")):
        print("note: no checkpoint given, the weights are random", file=sys.stderr)
    return 0
