"""Tests of the MSE-Net reconstruction (LesionSegLib/models/msenet.py, cards/msenet.json)."""
import math

import pytest
import torch
import torch.nn as nn

from LesionSegLib import models
from LesionSegLib.models.fusion import count_batchnorms, fuse_for_inference
from LesionSegLib.models.msenet import ASFF, MSENet, ResidualEncoder

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create("msenet")


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_card_parameter_count_is_exact(net):
    assert trainable(net) == models.card("msenet")["parameters"]["trainable"] == 9120481
    # inside the range of the baselines the README compares with (D-UNet 8.64 M, X-Net 15.1 M)
    assert 8_000_000 < trainable(net) < 15_100_000


def test_output_shape_default_size_and_smaller(net):
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 192, 192)).shape == (1, 1, 192, 192)
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)
        # X-Net's 224x192 grid scaled down by 2, non-square
        assert net(torch.randn(1, 1, 112, 96)).shape == (1, 1, 112, 96)


def test_asff_branches_have_configured_rates_and_keep_size(net):
    rates = models.card("msenet")["architecture"]["config"]["atrous_rates"]
    asff = net.asff
    assert asff.rates == rates == [1, 6, 12, 18]
    assert len(asff.branches) == 4 and asff.image_pool is not None
    for rate, branch in zip(rates, asff.branches):
        conv = branch[0]
        assert conv.dilation == (rate, rate)
        assert conv.kernel_size == ((1, 1) if rate == 1 else (3, 3))
        assert conv.padding == ((0, 0) if rate == 1 else (rate, rate))
    seen = []

    def record(module, inputs, output):
        seen.append((inputs[0].shape, output.shape))

    handles = [b.register_forward_hook(record) for b in asff.branches]
    net.eval()
    with torch.no_grad():
        net(torch.randn(1, 1, 64, 64))
    for h in handles:
        h.remove()
    assert len(seen) == 4
    for in_shape, out_shape in seen:
        assert in_shape[-2:] == out_shape[-2:] == (8, 8)   # stride-8 bottleneck of a 64x64 input
        assert in_shape[1] == 512 and out_shape[1] == 128


@pytest.mark.parametrize("rate", [2, 6])
def test_atrous_branch_samples_at_its_rate(rate):
    """An impulse through an all-ones 3x3 conv of dilation r lights exactly the 9 pixels
    at offsets {-r, 0, r}^2 — the taps are really r apart."""
    asff = ASFF(1, 1, 1, rates=[rate], image_pooling=False)
    conv = asff.branches[0][0]
    with torch.no_grad():
        conv.weight.fill_(1.0)
        x = torch.zeros(1, 1, 31, 31)
        x[0, 0, 15, 15] = 1.0
        y = conv(x)[0, 0]
    assert y.shape == (31, 31)
    hits = {(int(i) - 15, int(j) - 15) for i, j in torch.nonzero(y)}
    assert hits == {(a, b) for a in (-rate, 0, rate) for b in (-rate, 0, rate)}


def test_asff_parameter_count_by_hand():
    # 1x1 branch 8*2 + BN 2*2; 3x3 rate-2 branch 8*2*9 + BN 4; pooling conv 8*2 + bias 2;
    # projection (3*2)*4 + BN 4*2  ->  20 + 148 + 18 + 32 = 218
    asff = ASFF(8, 4, 2, rates=[1, 2], image_pooling=True)
    assert sum(p.numel() for p in asff.parameters()) == 218
    assert sum(p.numel() for p in ASFF(8, 4, 2, rates=[1, 2], image_pooling=False).parameters()) == 20 + 148 + 4 * 4 + 8


def test_asff_rejects_bad_rates():
    with pytest.raises(ValueError):
        ASFF(8, 4, 2, rates=[0, 6])


def test_residual_encoder_keeps_high_resolution(net):
    """The residual encoder's semantic stage stays at stride 8 (a ResNet would be at 16)
    and is dilated; the plain encoder ends at stride 8 too."""
    net.eval()
    with torch.no_grad():
        feats = net.forward_features(torch.randn(1, 1, 64, 64))
    assert [f.shape[-1] for f in feats["plain"]] == [64, 32, 16, 8]
    assert [f.shape[1] for f in feats["plain"]] == [32, 64, 128, 256]
    assert [f.shape[-1] for f in feats["residual"]] == [64, 32, 16, 8, 8]
    assert [f.shape[1] for f in feats["residual"]] == [32, 64, 128, 256, 256]
    assert net.residual_encoder.strides == [1, 2, 4, 8, 8]
    assert [f.shape[-1] for f in feats["skips"]] == [64, 32, 16]
    assert feats["bottleneck"].shape == (1, 256, 8, 8)
    semantic = net.residual_encoder.semantic
    assert len(semantic) == 2
    for block in semantic:
        for conv in (block.conv1[0], block.conv2[0]):
            assert conv.stride == (1, 1) and conv.dilation == (2, 2) and conv.padding == (2, 2)
    # the same through a hook on the module itself (not only forward_features' bookkeeping)
    out = {}

    def record(module, inputs, output):  # returns None, so the output is not replaced
        out["shape"] = output.shape

    h = semantic.register_forward_hook(record)
    with torch.no_grad():
        net(torch.randn(1, 1, 96, 96))
    h.remove()
    assert out["shape"] == (1, 256, 12, 12)


def test_residual_encoder_without_semantic_dilation_still_stride_8():
    enc = ResidualEncoder(1, [4, 8, 16], [1, 1, 1], semantic_blocks=1, semantic_dilation=4)
    feats = enc(torch.randn(2, 1, 32, 32))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 8]
    assert enc.semantic[0].conv1[0].dilation == (4, 4)


def test_two_point_five_d_input():
    torch.manual_seed(1)
    model = models.create("msenet", in_channels=3).eval()
    assert model.plain_encoder.levels[0][0][0].in_channels == 3
    assert model.residual_encoder.stages[0][0][0].in_channels == 3
    # only the two first convs grow: 2 encoders x 32 x 2 extra channels x 9
    assert trainable(model) - models.card("msenet")["parameters"]["trainable"] == 2 * 32 * 2 * 9
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1, 64, 64)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 1, 64, 64))


def test_head_starts_at_lesion_prior(net):
    assert net.head.bias.item() == pytest.approx(math.log(0.01 / 0.99), abs=1e-6)  # -4.59512
    assert net.head.bias.item() == pytest.approx(-4.59512, abs=1e-5)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(2)
    model = MSENet(widths=(8, 16, 32, 64), asff_channels=16).train()
    model(torch.randn(2, 1, 64, 64)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_fuse_for_inference_with_random_bn_stats():
    torch.manual_seed(3)
    model = models.create("msenet")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    model.eval()
    fused = fuse_for_inference(model)
    n_bn = count_batchnorms(model)
    assert n_bn > 0 and count_batchnorms(fused) == 0
    assert fused.lesionseg_fused_bn == n_bn
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert ref.abs().max() > 1e-2  # not a trivial all-zero comparison
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched


def test_card_lesion_size_levels_consistent():
    levels = models.card("msenet")["lesion_size_levels"]
    assert levels["names"] == ["small", "medium", "large"]
    t = levels["thresholds"]
    assert len(t) == len(levels["names"]) - 1 and t[0] < t[1]
    # thresholds are the areas of 20 mm and 40 mm circles
    for area, d in zip(t, levels["equivalent_diameter_mm"]):
        assert area == pytest.approx(math.pi * (d / 2) ** 2, abs=0.01)
    px = levels["pixels_at_default_grid"]
    spacing = models.card("msenet")["input"]["pixel_spacing_mm"]
    assert px["pixel_area_mm2"] == pytest.approx(spacing[0] * spacing[1]) == pytest.approx((180 / 192) ** 2)
    assert px["thresholds"] == [round(a / px["pixel_area_mm2"]) for a in t] == [357, 1430]


def test_presets_and_terminology():
    p = models.preset("msenet")
    assert p["name"] == "atlas-t1" and p["input"]["channels"] == 1
    cls = p["classes"][0]
    assert cls["terminology"]["type"][1] == "55641003" and cls["terminology"]["anatomic_region"][1] == "12738006"
    dwi = models.preset("msenet", "isles-dwi")
    assert dwi["input"]["channels"] == 1 and "DWI" in dwi["modality"]
    card = models.card("msenet")
    assert card["outputs"]["names"] == ["logits"] and card["outputs"]["channels"] == 1
    assert all({"part", "reason"} <= set(r) for r in card["reconstructed"])
