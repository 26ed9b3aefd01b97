#!/usr/bin/env python
"""Is onnxruntime faster than torch on this CPU? Both measured in the same run.

For each network (random weights: speed does not depend on their values) at its preset's
input size, the fused inference form (``fuse_for_inference``) is timed as

* ``torch``        : eager, ``torch.inference_mode``, NCHW contiguous input;
* ``torch_cl``     : the same with model and input in ``channels_last``;
* ``onnxruntime``  : the ONNX export of the same fused network (inference output only),
                     CPUExecutionProvider, all graph optimisations, same thread count.

Calls are interleaved (one call of each backend per round) so that load from other
processes on the machine hits all backends alike; the median of ``--repeats`` rounds is
reported after ``--warmup`` rounds. Ratios > 1 mean onnxruntime is faster. The max abs
difference of each backend's logits from eager torch is printed too.

    .venv/bin/python scripts/onnx_vs_torch.py                       # all networks, card sizes
    .venv/bin/python scripts/onnx_vs_torch.py --models unet m2snet --size 256 256 --repeats 9
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from LesionSegLib import models, resolver  # noqa: E402
from LesionSegLib.inference import onnx as onnx_backend  # noqa: E402
from LesionSegLib.models.fusion import fuse_for_inference  # noqa: E402


def to_channels_last(net):
    """``net.to(memory_format=channels_last)`` for the 4-D tensors only (MS-LKSeg's dynamic
    convolution keeps a 5-D kernel bank, which ``Module.to`` refuses to convert)."""
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return net


def measure(name: str, size, batch: int, repeats: int, warmup: int, threads: int) -> dict:
    card = resolver.network_card(name, None, None)
    size = tuple(size) if size else onnx_backend.default_size(card)
    channels = onnx_backend.input_channels(card, models.config(name))
    net = fuse_for_inference(models.create(name))
    net_cl = to_channels_last(copy.deepcopy(net))
    x = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x_np = x.numpy()

    t0 = time.perf_counter()
    data, facts = onnx_backend.export_bytes(net, name, size, channels, batch=batch, verify=False)
    export_s = time.perf_counter() - t0
    session = onnx_backend.OnnxSession(data, num_threads=threads)

    def run_torch():
        with torch.inference_mode():
            return models.inference_output(name, net(x))

    def run_torch_cl():
        with torch.inference_mode():
            return models.inference_output(name, net_cl(x_cl))

    backends = {"torch": run_torch, "torch_cl": run_torch_cl, "onnxruntime": lambda: session.run(x_np)}
    outputs = {k: f() for k, f in backends.items()}
    reference = outputs["torch"].float().numpy()
    diffs = {k: float(np.abs(np.asarray(v.float().contiguous() if hasattr(v, "float") else v) - reference).max())
             for k, v in outputs.items()}
    times = {k: [] for k in backends}
    for r in range(warmup + repeats):
        for k, f in backends.items():
            t = time.perf_counter()
            f()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    best_torch = min(med["torch"], med["torch_cl"])
    return {"model": name, "size": list(size), "batch": batch, "channels": channels, "export_s": round(export_s, 2),
            "exporter": facts["exporter"], "median_ms": {k: round(v, 1) for k, v in med.items()},
            "ratio_torch_over_ort": round(med["torch"] / med["onnxruntime"], 3),
            "ratio_best_torch_over_ort": round(best_torch / med["onnxruntime"], 3),
            "max_abs_diff_vs_torch": diffs, "output_scale": float(np.abs(reference).max()),
            "fastest": min(med, key=med.get)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=models.list_models())
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="default: each preset's input size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    print(f"# torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch}, median of {args.repeats} after {args.warmup} warm-up")
    print("| network | input | torch ms | torch channels_last ms | onnxruntime ms | torch/ORT | best torch/ORT | "
          "ORT max abs diff (relative) | fastest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for name in args.models:
        r = measure(name, args.size, args.batch, args.repeats, args.warmup, args.threads)
        rows.append(r)
        m = r["median_ms"]
        print(f"| {name} | {r['channels']}×{r['size'][0]}×{r['size'][1]} | {m['torch']:.1f} | {m['torch_cl']:.1f} | "
              f"{m['onnxruntime']:.1f} | {r['ratio_torch_over_ort']:.2f} | {r['ratio_best_torch_over_ort']:.2f} | "
              f"{r['max_abs_diff_vs_torch']['onnxruntime']:.2g} "
              f"({r['max_abs_diff_vs_torch']['onnxruntime'] / max(r['output_scale'], 1e-30):.1g}) | "
              f"{r['fastest']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
