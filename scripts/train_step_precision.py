#!/usr/bin/env python
"""Training-step time on the CPU in fp32 and in bf16 autocast (what ``amp: auto`` picks on a
CPU with native bf16), same run, interleaved: docs/performance.md, "Training on the CPU".

    .venv/bin/python scripts/train_step_precision.py --models unet,msenet --size 224 --batch 2 --steps 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet,msenet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from LesionSegLib import models
    from LesionSegLib.inference import runtime
    torch.set_num_threads(args.threads)
    feats = runtime.cpu_features()
    print(f"CPU: {runtime.cpu_name()}; native bf16: {feats['native_bf16']} (AMX {feats['amx_bf16']}, "
          f"AVX512-BF16 {feats['avx512_bf16']}); amp auto → {runtime.cpu_autocast_dtype()}; "
          f"{args.threads} thread(s)")
    print("| network | input, batch | fp32 step | bf16 step | bf16 / fp32 speed |")
    print("|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        net = models.create(name).train()
        c = int(models.card(name)["input"]["channels"])
        opt = torch.optim.Adam(net.parameters(), 1e-4)
        x = torch.randn(args.batch, c, args.size, args.size)
        y = (torch.rand(args.batch, 1, args.size, args.size) > 0.5).float()

        def step(dtype):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = models.inference_output(name, net(x))
            loss = F.binary_cross_entropy_with_logits(out.float()[:, :1], y)
            loss.backward()
            opt.step()

        times = {None: [], torch.bfloat16: []}
        for d in times:
            step(d)  # warm-up
        for _ in range(args.steps):
            for d in times:
                t0 = time.perf_counter()
                step(d)
                times[d].append(time.perf_counter() - t0)
        a, b = statistics.median(times[None]), statistics.median(times[torch.bfloat16])
        print(f"| {name} | {c}×{args.size}², {args.batch} | {a:.2f} s | {b:.2f} s | {a / b:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
