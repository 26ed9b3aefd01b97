"""``lesionseg benchmark``: inference speed and memory of each network, measured against
a reference loop shaped like the papers' official predict scripts, in the same run.

For each network and device it segments a synthetic volume (CT-like int16 slices, or
RGB uint8 images for networks that take colour) of ``--slices`` slices of
``--slice-size``² pixels, with the network's random weights (speed does not depend on
the weight values):

* **reference**: one slice at a time, batch 1, fp32, the network as built (no BatchNorm
  folding, NCHW), ``torch.no_grad``; each slice clipped/normalised with numpy and
  resized with PIL on the CPU, the logits resized back and thresholded — what the
  official ``test.py`` scripts do for each image;
* **LesionSeg** (``Predictor.predict_volume``) at each ``--batch-sizes`` value and at
  ``auto``: the whole path, orientation and lesion table included.

Each configuration is warmed up once, then timed ``--repeats`` times, alternating the
configurations within each repeat so that a busy machine slows all of them alike; the
median is reported. Throughput is slices/s; the speedup is LesionSeg (auto batch) over
the reference, as a ratio of the same run. ``--linearity`` also runs the auto
configuration on twice the slices: time should double, peak memory should not grow
beyond the larger output. Peak memory: the host's resident high-water mark above the
level before the run on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from ..benchmarking import PeakMemory, load_average, reference_loop, synthetic_volume, timed


def register(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="measure inference speed and memory against a reference loop",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help="comma-separated network names (default: all registered)")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated devices; unavailable ones are skipped")
    p.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes to time besides auto (default 1,2,4,8)")
    p.add_argument("--slices", type=int, default=8, help="slices in the synthetic volume (default 8)")
    p.add_argument("--slice-size", type=int, default=512, help="side of each input slice in pixels (default 512)")
    p.add_argument("--size", default="card",
                   help="network input size: 'card' (default) or N or HxW; also 'model=HxW,...' per network")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (default 3)")
    p.add_argument("--threads", help="torch CPU threads, or a list (1,2): everything is measured at each "
                                     "(default: torch's choice)")
    p.add_argument("--precision", default="auto", help="Predictor precision of the batch/auto rows (default auto)")
    p.add_argument("--precisions", default="",
                   help="also time the Predictor (auto batch, CPU) at these precisions, e.g. fp32,bf16,int8; "
                        "int8 is calibrated on the synthetic slices (speed only), bf16 is marked emulated "
                        "where the CPU has no native bf16")
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument("--onnx", action="store_true",
                   help="on the CPU, also time the Predictor with the onnxruntime backend (auto batch)")
    p.add_argument("--linearity", action="store_true", help="also time 2× the slices (cost and memory scaling)")
    p.add_argument("--json", help="write all measurements to this JSON file")
    p.set_defaults(func=run_benchmark)


# ---------------------------------------------------------------------- the run
def _parse_sizes(value: str, names: List[str]) -> Dict[str, Optional[List[int]]]:
    def one(v):
        if v == "card":
            return None
        parts = v.lower().split("x")
        return [int(parts[0]), int(parts[-1])]
    sizes: Dict[str, Optional[List[int]]] = {n: None for n in names}
    if "=" in value:
        for item in value.split(","):
            k, v = item.split("=")
            sizes[k.strip()] = one(v.strip())
    else:
        for n in names:
            sizes[n] = one(value.strip())
    return sizes


def machine_description() -> Dict[str, Any]:
    import torch
    from ..inference import runtime
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": runtime.cpu_name(), "cpu_features": runtime.cpu_features(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def bench_model(name: str, device_name: str, args, size: Optional[List[int]], log) -> Optional[Dict[str, Any]]:
    import copy
    import torch
    from .. import models
    from ..inference import Predictor
    net = models.create(name).eval()
    predictor = Predictor(net, device=device_name, precision=args.precision, batch_size=1)
    if size:
        predictor.card["input"]["size"] = list(size)
    card = predictor.card
    net_size = tuple(card["input"]["size"])
    device = torch.device(predictor.device)
    image = synthetic_volume(card, args.slices, args.slice_size)
    small = synthetic_volume(card, 1, args.slice_size, seed=1)
    reference_net = copy.deepcopy(net).eval()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    def at_batch(p, batch):
        def segment(img):
            p.batch_size = batch
            return p.predict_volume(img)
        return segment

    # every configuration segments a given volume; all alternate within each repeat
    configs: Dict[str, Callable[[Any], Any]] = {}
    if not args.no_reference and device.type == "cpu":
        configs["reference"] = lambda img: reference_loop(reference_net, name, card, img, net_size)
    for b in batch_sizes:
        configs[f"bs{b}"] = at_batch(predictor, b)
    configs["auto"] = at_batch(predictor, "auto")
    if getattr(args, "onnx", False) and device.type == "cpu":
        # the same network through onnxruntime: exported once per input shape during warm-up
        onnx_predictor = Predictor(copy.deepcopy(net), device="cpu", backend="onnxruntime")
        onnx_predictor.card["input"]["size"] = list(net_size)
        configs["onnx"] = at_batch(onnx_predictor, "auto")

    extra = [x.strip().lower() for x in (getattr(args, "precisions", "") or "").split(",") if x.strip()]
    if device.type == "cpu":
        for prec in extra:
            torch.manual_seed(0)  # the same weights at every thread count: int8 comes from the cache
            p_x = Predictor(copy.deepcopy(net), device="cpu", precision=prec, calibration=[small, image]
                            if prec == "int8" else None, cache_dir=getattr(args, "int8_cache", None))
            p_x.card["input"]["size"] = list(net_size)
            configs[prec] = at_batch(p_x, "auto")

    def run(key, img=None):
        return configs[key](image if img is None else img)

    load_start = load_average()
    t_warm = {}
    log(f"{name} on {predictor.device}: input {net_size[0]}×{net_size[1]}, {args.slices} slices of "
        f"{args.slice_size}², warming up (load average {load_start})")
    for key in configs:  # warm-up: allocator, oneDNN primitive caches, cuDNN autotuning; int8 quantizes here
        t0 = time.perf_counter()
        run(key, small)
        t_warm[key] = time.perf_counter() - t0
    times: Dict[str, List[float]] = {k: [] for k in configs}
    cpu: Dict[str, List[float]] = {k: [] for k in configs}
    peaks: Dict[str, int] = {}
    used_batch: Dict[str, int] = {}
    for r in range(args.repeats):
        for key in configs:
            with PeakMemory(device) as mem:
                t, res = timed(lambda: run(key), device, cpu[key])
            times[key].append(t)
            if mem.peak_bytes is not None:
                peaks[key] = max(peaks.get(key, 0), mem.peak_bytes)
            if hasattr(res, "info"):
                used_batch[key] = res.info["batch_size"]
        log(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {statistics.median(v):.2f} s"
                                                             for k, v in times.items()))
    # single-slice latency, end to end
    predictor.batch_size = "auto"
    lat = [timed(lambda: predictor.predict_volume(small), device)[0] for _ in range(max(1, args.repeats))]
    ref_lat = None
    if "reference" in configs:
        ref_lat = statistics.median(timed(lambda: reference_loop(reference_net, name, card, small, net_size),
                                           device)[0] for _ in range(max(1, args.repeats)))
    row: Dict[str, Any] = {"model": name, "device": predictor.device, "precision": predictor.precision,
                           "network_input": list(net_size), "slice_size": args.slice_size, "slices": args.slices,
                           "seconds": {k: statistics.median(v) for k, v in times.items()},
                           "cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
                           "slices_per_s": {k: args.slices / statistics.median(v) for k, v in times.items()},
                           "ms_per_batch": {}, "peak_mb": {k: v / 2 ** 20 for k, v in peaks.items()},
                           "auto_batch": used_batch.get("auto"),
                           "latency_ms_one_slice": 1000 * statistics.median(lat),
                           "reference_latency_ms_one_slice": None if ref_lat is None else 1000 * ref_lat,
                           "load_average": [load_start, load_average()], "threads": torch.get_num_threads(),
                           "warmup_seconds": t_warm}
    for k, v in times.items():
        b = used_batch.get(k, 1)
        row["ms_per_batch"][k] = 1000 * statistics.median(v) / -(-args.slices // b)
    if "reference" in row["slices_per_s"]:
        ref = row["slices_per_s"]["reference"]
        row["speedup_auto"] = row["slices_per_s"]["auto"] / ref
        row["speedup_best"] = max(v for k, v in row["slices_per_s"].items() if k != "reference") / ref
        row["speedup_auto_cpu_time"] = row["cpu_seconds"]["reference"] / row["cpu_seconds"]["auto"]
        if "onnx" in row["slices_per_s"]:
            row["speedup_onnx"] = row["slices_per_s"]["onnx"] / ref
        row["speedup"] = {k: v / ref for k, v in row["slices_per_s"].items() if k != "reference"}
    if args.linearity:
        big = synthetic_volume(card, 2 * args.slices, args.slice_size)
        predictor.batch_size = "auto"
        t2 = []
        peak2 = 0
        for _ in range(args.repeats):
            with PeakMemory(device) as mem:
                t2.append(timed(lambda: predictor.predict_volume(big), device)[0])
            peak2 = max(peak2, mem.peak_bytes or 0)
        row["linearity"] = {"slices": 2 * args.slices, "seconds": statistics.median(t2),
                            "time_ratio": statistics.median(t2) / row["seconds"]["auto"],
                            "peak_mb": peak2 / 2 ** 20}
    return row


def _table(rows: List[Dict[str, Any]], batch_keys: List[str]) -> str:
    head = ["model", "device", "net input", "reference"] + batch_keys + ["auto (batch)", "speedup (auto)",
                                                                        "speedup (best)", "speedup (CPU time)",
                                                                        "threads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sps = r["slices_per_s"]
        cells = [r["model"], f"{r['device']} {r['precision']}", "×".join(map(str, r["network_input"])),
                 f"{sps['reference']:.2f}" if "reference" in sps else "-"]
        cells += [f"{sps[k]:.2f}" if k in sps else "-" for k in batch_keys]
        cells += [f"{sps['auto']:.2f} ({r['auto_batch']})",
                  f"{r['speedup_auto']:.2f}×" if "speedup_auto" in r else "-",
                  f"{r['speedup_best']:.2f}×" if "speedup_best" in r else "-",
                  f"{r['speedup_auto_cpu_time']:.2f}×" if "speedup_auto_cpu_time" in r else "-",
                  str(r.get("threads", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _memory_table(rows: List[Dict[str, Any]]) -> str:
    head = ["model", "device", "latency 1 slice (ref)", "ms/batch (auto)", "peak MB ref", "peak MB auto",
            "2× slices: time ratio", "2× slices: peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pk = r["peak_mb"]
        lin = r.get("linearity")
        ref_lat = r["reference_latency_ms_one_slice"]
        cells = [r["model"], r["device"],
                 f"{r['latency_ms_one_slice']:.0f} ms" + (f" ({ref_lat:.0f} ms)" if ref_lat else ""),
                 f"{r['ms_per_batch']['auto']:.0f}",
                 f"{pk['reference']:.0f}" if "reference" in pk else "-", f"{pk.get('auto', float('nan')):.0f}",
                 f"{lin['time_ratio']:.2f}" if lin else "-", f"{lin['peak_mb']:.0f}" if lin else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def features_line(features: Dict[str, bool]) -> str:
    """The CPU features that decide precision, for headers: ``AMX yes, AVX512-BF16 no …``."""
    names = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("vnni", "VNNI"), ("avx512", "AVX512"),
             ("avx2", "AVX2")]
    native = "native bf16" if features.get("native_bf16") else "bf16 emulated (slower than fp32)"
    return ", ".join(f"{label} {'yes' if features.get(k) else 'no'}" for k, label in names) + f"; {native}"


def run_benchmark(args: argparse.Namespace) -> int:
    import tempfile
    import torch
    from .. import models
    try:
        thread_counts = [int(t) for t in str(args.threads).split(",") if t.strip()] if args.threads else [None]
    except ValueError:
        print(f"lesionseg benchmark: error: --threads takes N or a list N,M, not {args.threads!r}", file=sys.stderr)
        return 2
    if thread_counts[0]:
        torch.set_num_threads(thread_counts[0])
    names = models.list_models() if args.models == "all" else [models.registry_name(n) for n in args.models.split(",")]
    sizes = _parse_sizes(args.size, names)
    devices = []
    for d in (s.strip() for s in args.devices.split(",") if s.strip()):
        if d.startswith("cuda") and not torch.cuda.is_available():
            print(f"benchmark: {d}: no CUDA GPU available here; skipped", file=sys.stderr)
            continue
        devices.append(d)
    if args.slices < 1 or args.repeats < 1 or args.slice_size < 8:
        print("lesionseg benchmark: error: --slices and --repeats must be ≥ 1, --slice-size ≥ 8", file=sys.stderr)
        return 2
    machine = machine_description()
    command = "lesionseg " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("lesionseg", "__main__.py")) \
        else "lesionseg benchmark " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                               if k not in ("func", "verb") and v not in (None, False))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
        f"GPU: {machine['gpu'] or 'none'}; torch {machine['torch']}")
    log(f"CPU features: {features_line(machine['cpu_features'])}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lesionseg-bench-int8-") as int8_cache:
        args.int8_cache = int8_cache  # random weights: their int8 graphs are not worth keeping
        for threads in thread_counts:
            if threads:
                torch.set_num_threads(threads)
            for name in names:
                for d in devices:
                    rows.append(bench_model(name, d, args, sizes.get(name), log))
    batch_keys = [f"bs{int(b)}" for b in args.batch_sizes.split(",") if b.strip()]
    if any("onnx" in r["slices_per_s"] for r in rows):
        batch_keys.append("onnx")
    for prec in (x.strip().lower() for x in (args.precisions or "").split(",") if x.strip()):
        if prec not in batch_keys:
            batch_keys.append(prec)
    date = _dt.date.today().isoformat()
    print(f"LesionSeg benchmark, {date}; {machine['cpu']} ({machine['cores']} cores, {machine['torch_threads']} "
          f"torch threads), GPU: {machine['gpu'] or 'none'}; torch {machine['torch']}")
    print(f"command: {command}")
    print(f"CPU features: {features_line(machine['cpu_features'])}")
    print(f"{args.slices} slices of {args.slice_size}² per volume; slices/s, median of {args.repeats} repeats\n")
    print(_table(rows, batch_keys))
    print()
    print(_memory_table(rows))
    for r in rows:
        if "speedup_auto" in r:
            print(f"{r['model']} {r['device']}: speedup over the reference loop "
                  f"{r['speedup_auto']:.2f}× (auto batch {r['auto_batch']}), best {r['speedup_best']:.2f}×"
                  + (f", onnxruntime {r['speedup_onnx']:.2f}×" if "speedup_onnx" in r else "") + "; "
                  f"load average {r['load_average'][0]} → {r['load_average'][1]}")
            emulated = "bf16" in r["speedup"] and not machine["cpu_features"].get("native_bf16")
            print(f"  {r['threads']} thread(s), over the reference of the same run: " + ", ".join(
                f"{k}{' (emulated)' if k == 'bf16' and emulated else ''} {v:.2f}×" for k, v in r["speedup"].items()))
    if args.json:
        from ..inference.io import write_text
        write_text(json.dumps({"date": date, "machine": machine, "command": command, "rows": rows}, indent=2),
                   args.json)
    return 0
