"""ONNX export (fused inference form, inference output only, card in the metadata) and the
onnxruntime session. Skipped when onnx / onnxruntime are not installed."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from LesionSegLib import models  # noqa: E402
from LesionSegLib.inference import onnx as onnx_backend  # noqa: E402
from LesionSegLib.models.fusion import fuse_for_inference  # noqa: E402

from conftest import ROOT, randomize_norm_stats  # noqa: E402


def _reference(net, name, x):
    with torch.inference_mode():
        return models.inference_output(name, net.eval()(torch.from_numpy(x))).numpy()


@pytest.mark.parametrize("name", ["unet", "m2snet"])
def test_onnx_output_equals_torch_at_64(name, tmp_path):
    net = models.create(name)
    randomize_norm_stats(net, seed=3)
    channels = models.card(name)["input"]["channels"]
    path = tmp_path / f"{name}.onnx"
    # export() verifies by itself; for the slower M2SNet this test's own comparison suffices
    info = onnx_backend.export(net, path, size=(64, 64), dynamic_batch=True, verify=name == "unet")
    assert (name != "unet") or 0 <= info["max_abs_diff"] < 1e-3
    session = onnx_backend.OnnxSession(path, num_threads=2)
    assert session.input_shape == (None, channels, 64, 64)
    x = np.random.default_rng(0).standard_normal((3, channels, 64, 64)).astype(np.float32)
    out = session.run(x)
    ref = _reference(net, name, x)          # the unfused network in eval mode
    assert out.shape == ref.shape == (3, 1, 64, 64)
    # randomised BN statistics make large logits: compare relative to their scale
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # the card (with its preset) travels in the file
    meta = onnx_backend.metadata(path)
    assert meta["model"] == name and meta["card"]["name"] == name
    assert meta["card"]["preset"]["name"] == models.card(name)["default_preset"]
    assert meta["output"] == models.card(name)["outputs"]["inference"]
    assert meta["input_size"] == "64,64" and meta["batch"] == "dynamic"
    assert session.card == meta["card"]


def test_deep_supervision_graph_has_only_the_inference_output(tmp_path):
    net = models.create("lseg")
    path = tmp_path / "lseg.onnx"
    onnx_backend.export(net, path, size=(64, 64))
    import onnx
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["logits"]
    x = np.random.default_rng(1).random((1, 3, 64, 64)).astype(np.float32) * 255
    out = onnx_backend.OnnxSession(path).run(x)
    with torch.inference_mode():
        outputs = net.eval()(torch.from_numpy(x))
    fuse = outputs[models.output_names("lseg").index("fuse")].numpy()
    assert out.shape == (1, 4, 64, 64)
    np.testing.assert_allclose(out, fuse, rtol=1e-4, atol=1e-4 * np.abs(fuse).max())
    # … and not one of the side outputs
    assert np.abs(out - outputs[0].numpy()).max() > 1e-3


def test_fixed_batch_graph_runs_any_batch_in_chunks(tmp_path):
    net = fuse_for_inference(models.create("unet"))
    path = tmp_path / "u2.onnx"
    onnx_backend.export(net, path, size=(32, 48), batch=2)
    session = onnx_backend.OnnxSession(path)
    assert session.input_shape == (2, 1, 32, 48)
    x = np.random.default_rng(2).standard_normal((5, 1, 32, 48)).astype(np.float32)
    out = session.run(x)            # chunks of 2, the last one padded
    np.testing.assert_allclose(out, _reference(net, "unet", x), atol=1e-5)
    with pytest.raises(onnx_backend.OnnxError, match=r"exported for input \(N, 1, 32, 48\) but got height 64"):
        session.run(np.zeros((1, 1, 64, 48), np.float32))


def test_session_from_a_network_exports_per_shape_and_falls_back_to_fixed_batch():
    net = models.create("mslkseg")
    session = onnx_backend.OnnxSession(net, verify=False)    # compared with torch below
    assert session.model_name == "mslkseg" and session.card["name"] == "mslkseg"
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = session.run(torch.from_numpy(x))          # tensors are accepted too
    # MS-LKSeg's dynamic convolution makes the graph batch-dependent: the reason is kept
    assert "dynamic batch is impossible" in session.dynamic_batch_error
    assert list(session._sessions) == [(3, 32, 32)]
    np.testing.assert_allclose(out, _reference(net, "mslkseg", x), rtol=1e-4, atol=1e-5)
    # a batch of another size reuses the fixed-batch graph in chunks
    np.testing.assert_allclose(session.run(x[:1]), out[:1], rtol=1e-4, atol=1e-5)
    assert list(session._sessions) == [(3, 32, 32)]


def test_session_cache_dir_reuses_exports_keyed_by_weights(tmp_path):
    net = models.create("unet")
    x = np.random.default_rng(5).standard_normal((2, 1, 32, 32)).astype(np.float32)
    first = onnx_backend.OnnxSession(net, cache_dir=tmp_path, verify=False)
    out = first.run(x)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("unet-") and "-1x32x32-dyn-" in files[0]
    assert onnx_backend.metadata(tmp_path / files[0])["card"]["name"] == "unet"
    # a second session finds the graph: export_bytes is not needed any more
    from LesionSegLib.inference.onnx import session as onnx_session
    real_export, calls = onnx_session.export_bytes, []
    onnx_session.export_bytes = lambda *a, **k: calls.append(a) or real_export(*a, **k)
    try:
        np.testing.assert_array_equal(onnx_backend.OnnxSession(net, cache_dir=tmp_path).run(x), out)
        assert calls == []
        with torch.no_grad():                        # other weights → another cache entry
            next(net.parameters()).add_(1.0)
        onnx_backend.OnnxSession(net, cache_dir=tmp_path, verify=False).run(x)
        assert len(calls) == 1 and len(list(tmp_path.iterdir())) == 2
    finally:
        onnx_session.export_bytes = real_export


def test_size_is_checked_against_the_card(tmp_path):
    with pytest.raises(onnx_backend.OnnxError, match="multiples of 16"):
        onnx_backend.export("unet", tmp_path / "x.onnx", size=(60, 60))
    assert not (tmp_path / "x.onnx").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "LesionSegLib", "export-onnx", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_export_onnx_cli_with_checkpoint_and_no_overwrite(tmp_path):
    from LesionSegLib import checkpoint
    net = models.create("unet", preset="polyp")       # 3 input channels from the preset's config
    randomize_norm_stats(net, seed=5)
    ck = checkpoint.save(tmp_path / "unet.pt", net, config=models.config("unet", in_channels=3), preset="polyp",
                         provenance={"data": "test"})
    out = tmp_path / "unet.onnx"
    r = _cli("--checkpoint", ck, "-o", out, "--size", 64, 96)
    assert r.returncode == 0, r.stderr
    assert "unet (preset polyp)" in r.stdout and "1×3×64×96" in r.stdout and "verified against torch" in r.stdout
    meta = onnx_backend.metadata(out)
    assert meta["preset"] == "polyp" and meta["provenance"]["data"] == "test"
    assert meta["card"]["preset"]["classes"][0]["name"] == "Polyp"
    x = np.random.default_rng(4).standard_normal((1, 3, 64, 96)).astype(np.float32)
    np.testing.assert_allclose(onnx_backend.OnnxSession(out).run(x), _reference(net, "unet", x),
                               rtol=1e-4, atol=1e-4 * max(1.0, np.abs(_reference(net, "unet", x)).max()))
    before = out.read_bytes()
    r = _cli("--model", "unet", "-o", out, "--size", 64, 64)
    assert r.returncode == 1 and "exists" in r.stderr
    assert out.read_bytes() == before
    r = _cli("--model", "unet", "-o", ck, "--checkpoint", ck, "--overwrite")
    assert r.returncode == 1 and "overwrite the input checkpoint" in r.stderr
    json.dumps(meta["card"])  # the stored card is plain JSON


def test_predictor_onnxruntime_backend_matches_torch(tmp_path):
    inference = pytest.importorskip("LesionSegLib.inference")
    net = models.create("unet")
    randomize_norm_stats(net, seed=1)
    img = (np.random.default_rng(0).random((80, 96)) * 255).astype(np.uint8)
    ref = inference.Predictor(net, device="cpu", backend="torch", precision="fp32").predict_image(img, return_probabilities=True)
    # (an in-memory network goes through the same create_runner → OnnxSession path as above)
    path = tmp_path / "unet.onnx"
    onnx_backend.export(net, path, size=(352, 352), verify=False)
    assert onnx_backend.read_metadata(path)[0] == "unet"
    from_file = inference.Predictor(path, device="cpu", backend="onnxruntime").predict_image(
        img, return_probabilities=True)
    np.testing.assert_allclose(from_file.probabilities, ref.probabilities, atol=1e-5)
    np.testing.assert_array_equal(from_file.labels, ref.labels)
