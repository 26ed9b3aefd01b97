"""``lesionseg benchmark`` in CI size: a real subprocess on a tiny U-Net configuration.
No speed is asserted (timings belong in docs/performance.md); the test checks that
every measurement is made and reported, and that the reference loop does the same work
as the predictor (same labels), so that the speedup compares like with like."""
import json
import os
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

from LesionSegLib.benchmarking import reference_loop, synthetic_volume
from LesionSegLib.inference import Predictor
from helpers import shifted_threshold_unet

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_and_reports_every_measurement(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "LesionSegLib", "benchmark", "--models", "unet", "--size", "32",
                        "--slices", "3", "--slice-size", "40", "--batch-sizes", "1,2", "--repeats", "1",
                        "--linearity", "--onnx", "--devices", "cpu,cuda", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    (row,) = [x for x in data["rows"] if x["device"] == "cpu"]
    assert set(row["slices_per_s"]) == {"reference", "bs1", "bs2", "auto", "onnx"}
    assert all(v > 0 for v in row["slices_per_s"].values())
    assert row["network_input"] == [32, 32] and row["slices"] == 3
    assert row["speedup_auto"] == row["slices_per_s"]["auto"] / row["slices_per_s"]["reference"]
    assert row["speedup_onnx"] == row["slices_per_s"]["onnx"] / row["slices_per_s"]["reference"]
    assert row["linearity"]["slices"] == 6 and row["linearity"]["time_ratio"] > 0
    assert row["latency_ms_one_slice"] > 0 and "auto" in row["peak_mb"]
    assert data["machine"]["cores"] == os.cpu_count() and data["command"].startswith("lesionseg benchmark")
    from LesionSegLib.inference import runtime
    auto = "bf16" if runtime.cpu_features()["native_bf16"] else "fp32"  # what 'auto' picks on this CPU
    assert f"| unet | cpu {auto} | 32×32 |" in r.stdout
    assert "speedup over the reference loop" in r.stdout and "onnxruntime" in r.stdout
    import torch
    if not torch.cuda.is_available():
        assert "cuda: no CUDA GPU available here; skipped" in r.stderr


def test_reference_loop_computes_what_the_predictor_computes():
    """Same labels from the official-style loop (PIL resize, batch 1, unfused) and from
    the predictor (torch resize on the device, batched, fused) on the benchmark volume."""
    net = shifted_threshold_unet(preset="covid-ct", dy=0, dx=0, t=0.5)  # body vs lungs and air
    p = Predictor(net, device="cpu")
    p.card["input"]["size"] = [48, 48]
    image = synthetic_volume(p.card, 2, 64)
    ref = reference_loop(net, "unet", p.card, image, (48, 48))
    got = sitk.GetArrayFromImage(p.predict_volume(image).labels)
    assert 0.2 < ref.mean() < 0.8                      # the threshold cuts through the image
    assert (ref == got).mean() > 0.98
