"""Predictor behaviour: sources (checkpoint files, presets), progress and cancel,
out-of-memory retries, TTA, softmax classes, minimum lesion size, fusion, devices."""
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import randomize_norm_stats
from LesionSegLib import checkpoint, models
from LesionSegLib.inference import CancelToken, Cancelled, Predictor, runtime
from LesionSegLib.preprocessing import InputError
from helpers import shifted_threshold_unet


def ct_volume(slices=7, blobs=((2, 10, 12, 6),)):
    """Lung-window CT-like volume with bright cubes (z, y, x, side)."""
    vol = np.full((slices, 40, 48), -850, np.int16)
    for z, y, x, s in blobs:
        vol[z:z + 2, y:y + s, x:x + s] = 200
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.8, 2.0))
    return img


@pytest.fixture(scope="module")
def pointwise():
    return Predictor(shifted_threshold_unet(dy=0, dx=0), device="cpu", batch_size=2)


def test_progress_is_monotone_per_batch_and_ends_at_one(pointwise):
    calls = []
    pointwise.predict_volume(ct_volume(), mode="native", progress=lambda f, m: calls.append((f, m)))
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 <= fractions[0]
    assert sum(m.startswith("slice") for _, m in calls) == 4          # 7 slices, batch 2: 4 batches
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_cancel_between_batches_returns_nothing(pointwise):
    token = CancelToken()
    calls = []

    def progress(f, m):
        calls.append(m)
        if m.startswith("slice"):
            token.cancel()  # the user clicks Cancel while the first batch is reported

    with pytest.raises(Cancelled):
        pointwise.predict_volume(ct_volume(), mode="native", progress=progress, cancel=token)
    assert sum(m.startswith("slice") for m in calls) == 1 and "done" not in calls
    assert token.cancelled
    with pytest.raises(Cancelled):  # a token cancelled before the start stops at once
        pointwise.predict_image(np.zeros((32, 32), np.uint8), cancel=token)
    fresh = CancelToken()
    fresh.raise_if_cancelled()  # a fresh token lets the run go


def test_out_of_memory_halves_the_batch_and_gives_the_same_result():
    """The allocator failing for batches above 2 (a forward pre-hook raises the error
    torch raises) → the predictor retries the same slices with halved batches."""
    ref = Predictor(shifted_threshold_unet(dy=1, dx=0), device="cpu", batch_size=1)
    p = Predictor(shifted_threshold_unet(dy=1, dx=0), device="cpu", batch_size=8)
    sizes = []

    def fail_big(module, args):
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    p.model.register_forward_pre_hook(fail_big)
    img = ct_volume(slices=9, blobs=((1, 5, 5, 8), (6, 20, 30, 5)))
    got = p.predict_volume(img, mode="native")
    want = ref.predict_volume(img, mode="native")
    assert np.array_equal(sitk.GetArrayFromImage(got.labels), sitk.GetArrayFromImage(want.labels))
    assert sizes[:3] == [8, 4, 2] and got.info["batch_size"] == 2 and p.batch_size == 2
    assert sum(s for s in sizes if s <= 2) == 9                 # every slice run exactly once

    one = Predictor(shifted_threshold_unet(), device="cpu", batch_size=1)
    one.model.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(MemoryError, match="does not fit"):
        one.predict_volume(img, mode="native")


def test_checkpoint_file_keeps_its_preset_and_gives_the_same_labels(tmp_path, pointwise):
    net = shifted_threshold_unet(dy=0, dx=0)
    path = checkpoint.save(tmp_path / "unet.lesionseg.pt", net, preset="covid-ct",
                           provenance={"note": "hand-set threshold"})
    p = Predictor(str(path), device="cpu", batch_size=2)
    assert p.preset == "covid-ct" and p.card["input"]["window"] == {"center": -600, "width": 1500}
    assert p.classes[0]["name"] == "Lung infection" and p.provenance["note"] == "hand-set threshold"
    img = ct_volume()
    a = p.predict_volume(img, mode="native")
    b = pointwise.predict_volume(img, mode="native")
    assert np.array_equal(sitk.GetArrayFromImage(a.labels), sitk.GetArrayFromImage(b.labels))
    assert sitk.GetArrayFromImage(a.labels).sum() == 2 * 6 * 6
    # an explicit different preset is honoured (stroke-dwi: 112² input, z-score)
    q = Predictor(str(path), preset="stroke-dwi", device="cpu")
    assert q.preset == "stroke-dwi" and q.card["input"]["size"] == [112, 112]
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        Predictor(str(tmp_path / "missing.pt"))


def softmax_checkpoint(tmp_path):
    """A 3-channel softmax U-Net (background + classes 3 and 7) saved with its own card:
    dark → class 7, bright → class 3, mid-grey → background."""
    net = models.create("unet", num_classes=3)
    with torch.no_grad():
        ref = shifted_threshold_unet(dy=0, dx=0)
        net.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("head")}, strict=False)
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.weight[1, 0] = 20.0
        net.head.bias[1] = -10.0     # 20 (r − 0.5)
        net.head.weight[2, 0] = -20.0
        net.head.bias[2] = 4.0       # 20 (0.2 − r)
    preset = models.preset("unet", "covid-ct")
    preset.update(name="two-class",
                  outputs={"names": ["logits"], "inference": "logits", "channels": 3, "activation": "softmax"},
                  classes=[{"value": 3, "name": "Consolidation", "color": [255, 0, 0], "terminology": {}},
                           {"value": 7, "name": "Air", "color": [0, 0, 255], "terminology": {}}])
    card = dict(models.card("unet"), preset=preset)
    return checkpoint.save(tmp_path / "softmax.pt", net, card=card, config=models.config("unet", num_classes=3))


def test_softmax_classes_map_to_their_values(tmp_path):
    p = Predictor(str(softmax_checkpoint(tmp_path)), device="cpu")
    assert p.activation == "softmax" and [c["value"] for c in p.classes] == [3, 7]
    img = np.zeros((32, 48), np.int16)
    img[:, :16] = -1300     # window bottom: r = 0 → logits (0, −10, 4) → class 7
    img[:, 16:32] = -337    # r = 0.35 → logits (0, −3, −3) → background
    img[:, 32:] = 150       # window top: r = 1 → logits (0, 10, −16) → class 3
    pred = p.predict_image(img, mode="native", return_probabilities=True, window={"center": -600, "width": 1500})
    assert np.all(pred.labels[:, :16] == 7) and np.all(pred.labels[:, 16:32] == 0)
    assert np.all(pred.labels[:, 32:] == 3)
    assert pred.probabilities.shape == (2, 32, 48)              # per class, background excluded
    assert np.allclose(pred.probabilities[0][:, 40], 1 / (1 + np.exp(-10) + np.exp(-26)), atol=1e-6)
    assert np.allclose(pred.probabilities[1][:, 5], 1 / (1 + np.exp(-4) + np.exp(-14)), atol=1e-6)
    assert np.array_equal(pred.masks[3], pred.labels == 3) and np.array_equal(pred.masks[7], pred.labels == 7)


def test_test_time_augmentation_averages_the_mirrored_prediction():
    """With a network reading the right neighbour, the mirrored pass reads the left
    one: TTA's probabilities are the mean of the two single-direction networks."""
    right = Predictor(shifted_threshold_unet(dy=0, dx=1, gain=3.0), device="cpu")
    left = Predictor(shifted_threshold_unet(dy=0, dx=-1, gain=3.0), device="cpu")
    tta = Predictor(shifted_threshold_unet(dy=0, dx=1, gain=3.0), device="cpu", tta=True)
    img = np.full((32, 48), 40, np.uint8)
    img[10:20, 10:30] = 250
    pr, pl, pt = (q.predict_image(img, mode="native", return_probabilities=True).probabilities
                  for q in (right, left, tta))
    assert not np.allclose(pr, pl)
    assert np.allclose(pt, (pr + pl) / 2, atol=1e-6)


def test_minimum_lesion_size_drops_small_lesions_everywhere(pointwise):
    img = ct_volume(blobs=((1, 5, 5, 8), (4, 25, 30, 2)))   # 128 mm² × … vs a 2×2×2 cube
    full = pointwise.predict_volume(img, mode="native")
    assert len(full.lesions) == 2
    big_mm3 = 8 * 8 * 2 * 0.8 * 0.8 * 2.0
    small_mm3 = 2 * 2 * 2 * 0.8 * 0.8 * 2.0
    assert sorted(r["volume_mm3"] for r in full.lesions) == pytest.approx([small_mm3, big_mm3])
    kept = pointwise.predict_volume(img, mode="native", min_lesion_size_mm3=small_mm3 + 1)
    (row,) = kept.lesions
    assert row["volume_mm3"] == pytest.approx(big_mm3)
    labels = sitk.GetArrayFromImage(kept.labels)
    assert labels.sum() == 8 * 8 * 2 and kept.masks[1].sum() == 8 * 8 * 2


def test_fusion_and_channels_last_do_not_change_the_result():
    torch.manual_seed(0)
    net = models.create("unet", preset="breast-us")
    randomize_norm_stats(net, seed=2)
    img = (np.random.default_rng(0).random((40, 56)) * 255).astype(np.uint8)
    # fp32 on both sides: on CPUs with native bf16 'auto' would compare bf16 roundings
    plain = Predictor(net, preset="breast-us", device="cpu", precision="fp32", fuse=False, channels_last=False)
    fast = Predictor(net, preset="breast-us", device="cpu", precision="fp32")
    a = plain.predict_image(img, mode="native", return_probabilities=True).probabilities
    b = fast.predict_image(img, mode="native", return_probabilities=True).probabilities
    assert np.allclose(a, b, atol=1e-5)
    assert getattr(fast.model, "lesionseg_fused_bn", 0) > 0 and net.training  # the caller's net untouched
    assert fast.model.encoder[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_device_precision_and_backend_choices(monkeypatch):
    net = shifted_threshold_unet()
    p = Predictor(net, device="auto")
    if not torch.cuda.is_available():
        auto = "bf16" if runtime.cpu_features()["native_bf16"] else "fp32"
        assert p.device == "cpu" and "no usable GPU" in p.device_message and p.precision == auto
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            Predictor(net, device="cuda")
    with pytest.raises(ValueError, match="unknown precision"):
        Predictor(net, precision="int4")
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(net, batch_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor(net, backend="tensorrt")
    monkeypatch.setitem(sys.modules, "LesionSegLib.inference.onnx", None)  # the package is absent
    import LesionSegLib.inference
    monkeypatch.delattr(LesionSegLib.inference, "onnx", raising=False)   # also once imported by other tests
    with pytest.raises(RuntimeError, match="onnxruntime"):
        Predictor(net, backend="onnxruntime")
    with pytest.raises(InputError, match="input channel"):
        Predictor(models.create("unet", in_channels=2))
    assert Predictor(net, precision="bf16", device="cpu").precision == "bf16"


def test_cpu_batch_follows_threads_and_input_size():
    """On the CPU large batches are slower once feature maps outgrow the caches
    (docs/performance.md): at most two inputs per thread, fewer for large inputs."""
    from LesionSegLib.inference.runtime import cpu_batch_size
    assert cpu_batch_size(352, 352, threads=1) == 2
    assert cpu_batch_size(352, 352, threads=2) == 4
    assert cpu_batch_size(352, 352, threads=16) == 4       # the pixel budget
    assert cpu_batch_size(64, 64, threads=16) == 16        # the cap
    assert cpu_batch_size(960, 1440, threads=2) == 1       # one fundus image
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p = Predictor(shifted_threshold_unet(), device="cpu")
        out = p.predict_volume(ct_volume(slices=5))
        assert out.info["batch_size"] == cpu_batch_size(*p.card["input"]["size"], threads=1)
    finally:
        torch.set_num_threads(previous)


def test_fft_depthwise_convolution_equals_the_direct_one():
    """MS-LKSeg's fused 21×21 depthwise convolutions run through the FFT on the CPU:
    same outputs as nn.Conv2d (odd sizes, padding, bias, channels-last), and the same
    predictions from the whole network."""
    import torch.nn as nn
    from LesionSegLib.inference.fastconv import FFTDepthwiseConv2d, is_fft_candidate
    torch.manual_seed(0)
    for k, pad, size in [(21, 10, (37, 50)), (15, 3, (20, 17)), (3, 1, (9, 9))]:
        conv = nn.Conv2d(6, 6, k, padding=pad, groups=6, bias=True)
        x = torch.randn(2, 6, *size)
        with torch.no_grad():
            want = conv(x)
            got = FFTDepthwiseConv2d(conv)(x)
            cl = FFTDepthwiseConv2d(conv)(x.contiguous(memory_format=torch.channels_last))
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5 * want.abs().max())
        assert torch.allclose(cl, want, atol=1e-5 * want.abs().max())
        assert cl.is_contiguous(memory_format=torch.channels_last)
    assert not is_fft_candidate(nn.Conv2d(6, 6, 21, padding=10, groups=3))
    assert not is_fft_candidate(nn.Conv2d(6, 6, 21, padding=10, groups=6, stride=2))
    assert not is_fft_candidate(nn.Conv2d(6, 6, 13, padding=6, groups=6))  # oneDNN is fast up to 13×13

    net = models.create("mslkseg")
    randomize_norm_stats(net, seed=3)
    p = Predictor(net, device="cpu")
    assert p.fft_convolutions == 4 and sum(isinstance(m, FFTDepthwiseConv2d) for m in p.model.modules()) == 4
    assert not any(isinstance(m, FFTDepthwiseConv2d) for m in net.modules())  # the caller's net is untouched
    from LesionSegLib.models.fusion import fuse_for_inference
    direct = fuse_for_inference(net)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = direct(x)
        got = p.model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max())


def test_trainable_fft_depthwise_gives_the_convolution_gradients():
    """Training on the CPU runs large depthwise kernels through the FFT: same output and
    same gradients (input, weight, bias) as nn.Conv2d, on the convolution's own
    parameters, and restore_convolutions gives the nn.Conv2d back."""
    import torch.nn as nn
    from LesionSegLib.inference.fastconv import FFTDepthwiseConv2d, replace_large_depthwise, restore_convolutions
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 21, padding=10, groups=4, bias=True)
    x = torch.randn(2, 4, 30, 26, requires_grad=True)
    g = torch.randn(2, 4, 30, 26)
    (conv(x) * g).sum().backward()
    want = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    for t in (x, conv.weight, conv.bias):
        t.grad = None
    fft = FFTDepthwiseConv2d(conv, trainable=True)
    assert fft.weight is conv.weight and fft.bias is conv.bias
    (fft(x) * g).sum().backward()
    for got, ref in zip((x.grad, conv.weight.grad, conv.bias.grad), want):
        assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max()), (got - ref).abs().max()
    # the kernel changes at each optimiser step: no stale spectrum
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    with torch.no_grad():
        assert torch.allclose(fft(x), conv(x), atol=1e-4 * conv(x).abs().max())

    net = models.create("mslkseg", widths=[8, 16, 32, 64, 128])
    keys = list(net.state_dict())
    params = list(net.parameters())
    assert replace_large_depthwise(net, trainable=True) == 4
    assert list(net.state_dict()) == keys and all(a is b for a, b in zip(net.parameters(), params))
    assert restore_convolutions(net) == 4
    assert not any(isinstance(m, FFTDepthwiseConv2d) for m in net.modules())
    assert list(net.state_dict()) == keys and all(a is b for a, b in zip(net.parameters(), params))


def test_onnxruntime_backend_gives_the_torch_labels():
    """The onnxruntime hook end to end (LesionSegLib.inference.onnx exports the fused
    network in memory): same geometry handling, same labels as the torch backend."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = shifted_threshold_unet(dy=1, dx=0)
    img = ct_volume(slices=3, blobs=((0, 6, 8, 10),))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    want = Predictor(net, device="cpu").predict_volume(img, mode="native")
    p = Predictor(net, device="cpu", backend="onnxruntime")
    assert p.model is None and p.precision == "fp32"
    got = p.predict_volume(img, mode="native")
    assert np.array_equal(sitk.GetArrayFromImage(got.labels), sitk.GetArrayFromImage(want.labels))
    assert sitk.GetArrayFromImage(got.labels).sum() == 2 * 10 * 10
    # onnxruntime follows torch's CPU thread setting instead of taking every core
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert Predictor(net, device="cpu", backend="onnxruntime").runner.session.num_threads == 1
    finally:
        torch.set_num_threads(previous)


def test_only_stroke_cards_and_presets_grade_lesions_by_size(pointwise):
    """MSE-Net's small/medium/large stroke-lesion levels belong to stroke: a CT infection
    network's lesion table leaves the size level empty; U-Net's stroke presets use them."""
    image = ct_volume()
    rows = pointwise.predict_volume(image).lesions
    assert rows and all(r["size_level"] is None for r in rows)
    assert pointwise.size_levels is None
    msenet = Predictor(models.create("msenet"), device="cpu")
    assert msenet.size_levels == models.card("msenet")["lesion_size_levels"]
    stroke_unet = Predictor(models.create("unet", preset="stroke-dwi"), preset="stroke-dwi", device="cpu")
    assert stroke_unet.size_levels == msenet.size_levels


def two_squares():
    """A bright square (probability ≈ 1 under the pointwise network) and a dim one (≈ 0.8)."""
    img = np.full((48, 64), 40, np.uint8)
    img[10:22, 4:20] = 250
    img[26:40, 30:50] = 200
    return img


def test_a_seed_threshold_keeps_only_lesions_that_reach_it(pointwise):
    img = two_squares()
    probs = pointwise.predict_image(img, return_probabilities=True).probabilities[0]
    assert probs[15, 10] > 0.99 and 0.5 < probs[30, 40] < 0.9          # the premise
    assert pointwise.seed_threshold is None and len(pointwise.predict_image(img).lesions) == 2
    kept = pointwise.predict_image(img, seed_threshold=0.95)
    assert len(kept.lesions) == 1 and kept.info["seed_threshold"] == 0.95
    assert kept.labels[15, 10] == 1 and kept.labels[30, 40] == 0
    assert kept.masks[1][15, 10] and not kept.masks[1][30, 40]
    assert pointwise.predict_image(img, seed_threshold=0).info["seed_threshold"] is None
    with pytest.raises(InputError, match="seed threshold 0.4 must be above the threshold 0.5"):
        pointwise.predict_image(img, seed_threshold=0.4)
    with pytest.raises(InputError, match="seed threshold"):
        pointwise.predict_image(img, seed_threshold=1.5)


def test_a_seed_threshold_judges_volumes_by_their_3d_lesions(pointwise):
    """A dim region is kept when it reaches a seed in another slice: lesions are 3-D."""
    hu = np.full((4, 40, 48), -850, np.int16)
    hu[0:2, 4:12, 4:12] = 200      # bright: probability ≈ 1
    hu[0:2, 20:32, 20:32] = -180   # dim: probability ≈ 0.75
    def run(volume):
        img = sitk.GetImageFromArray(volume)
        img.SetSpacing((0.8, 0.8, 2.0))
        return pointwise.predict_volume(img, mode="native", seed_threshold=0.95, return_probabilities=True)
    alone = run(hu)
    assert 0.5 < alone.probabilities[0, 0, 25, 25] < 0.9 and alone.probabilities[0, 0, 8, 8] > 0.99
    labels = sitk.GetArrayFromImage(alone.labels)
    assert len(alone.lesions) == 1 and labels[0, 8, 8] == 1 and not labels[:, 20:32, 20:32].any()
    hu[2, 24:28, 24:28] = 200      # a bright core in the next slice seeds the dim region
    joined = run(hu)
    labels = sitk.GetArrayFromImage(joined.labels)
    assert len(joined.lesions) == 2 and labels[0:2, 20:32, 20:32].all()
