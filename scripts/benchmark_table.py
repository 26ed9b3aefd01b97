#!/usr/bin/env python3
"""Merge the per-network JSON files of scripts/benchmark_cpu.sh into the tables of
docs/performance.md.

    python scripts/benchmark_table.py OUTDIR [--default-batch 2]

"LesionSeg default" is the column of the batch the Predictor now chooses on the CPU for
the network's input size and the run's thread count (LesionSegLib/inference/runtime.py
``cpu_batch_size``). Every ratio is against the reference loop of the same run of the
same network.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORDER = ["unet", "msenet", "mslkseg", "m2snet", "msnet", "bsnet", "lseg"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    args = ap.parse_args(argv)
    rows = []
    for path in sorted(Path(args.folder).glob("*.json")):
        data = json.loads(path.read_text())
        for r in data["rows"]:
            r["_command"], r["_machine"], r["_date"] = data["command"], data["machine"], data["date"]
            rows.append(r)
    if not rows:
        print(f"no benchmark JSON files in {args.folder}", file=sys.stderr)
        return 1
    rows.sort(key=lambda r: ORDER.index(r["model"]) if r["model"] in ORDER else len(ORDER))
    m = rows[0]["_machine"]
    print(f"Date {rows[0]['_date']}; {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s); "
          f"torch {m['torch']}\n")
    from LesionSegLib.inference.runtime import cpu_batch_size

    def default_key(r):
        return f"bs{cpu_batch_size(*r['network_input'], threads=r['_machine']['torch_threads'])}"
    print("| network | net input | reference | batch 1 | batch 2 | batch 4 | batch 8 | onnxruntime | "
          "**LesionSeg default** (batch) | best | best config |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        dflt = default_key(r)
        sps = r["slices_per_s"]
        ref = sps["reference"]

        def cell(k):
            return f"{sps[k]:.2f} ({sps[k] / ref:.2f}×)" if k in sps else "–"
        best_k = max((k for k in sps if k != "reference"), key=lambda k: sps[k])
        print(f"| {r['model']} | {'×'.join(map(str, r['network_input']))} | {ref:.2f} | {cell('bs1')} | "
              f"{cell('bs2')} | {cell('bs4')} | {cell('bs8')} | {cell('onnx')} | **{cell(dflt)}** ({dflt[2:]}) | "
              f"{sps[best_k] / ref:.2f}× | {best_k} |")
    print("\n| network | latency, 1 slice (reference) | peak MB reference | auto batch | peak MB auto, "
          f"{rows[0]['slices']} slices | auto, 2× slices: time ratio | auto, 2× slices: peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pk, lin = r["peak_mb"], r.get("linearity") or {}
        print(f"| {r['model']} | {r['latency_ms_one_slice']:.0f} ms ({r['reference_latency_ms_one_slice']:.0f} ms) | "
              f"{pk.get('reference', float('nan')):.0f} | {r.get('auto_batch')} | {pk.get('auto', float('nan')):.0f} | "
              f"{lin.get('time_ratio', float('nan')):.2f} | {lin.get('peak_mb', float('nan')):.0f} |")
    print("\nCommands:")
    for r in rows:
        print(f"    {r['_command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
