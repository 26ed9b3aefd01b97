"""Tests of the U-Net baseline (LesionSegLib/models/unet.py, cards/unet.json)."""
import pytest
import torch

from LesionSegLib import models
from LesionSegLib.models.fusion import count_batchnorms, fuse_for_inference
from LesionSegLib.models.unet import UNet


def expected_parameter_count(cin: int, classes: int, w: int, depth: int) -> int:
    """Hand count: conv3×3 without bias + BN (γ, β) twice per level; transposed conv
    2×2 with bias; 1×1 head with bias."""
    def double(a, b):
        return 9 * a * b + 2 * b + 9 * b * b + 2 * b
    widths = [w * 2 ** i for i in range(depth)]
    n, c = 0, cin
    for v in widths:
        n += double(c, v)
        c = v
    for lo, hi in zip(widths[:-1], widths[1:]):
        n += 4 * hi * lo + lo + double(2 * lo, lo)
    return n + widths[0] * classes + classes


def test_parameter_count_default_and_card():
    m = UNet()
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == expected_parameter_count(1, 1, 32, 5) == 7762465
    assert models.card("unet")["parameters"]["trainable"] == n
    assert sum(p.numel() for p in UNet(base_width=64).parameters()) == expected_parameter_count(1, 1, 64, 5)


def test_output_shape_and_channels():
    torch.manual_seed(0)
    m = UNet().eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 64, 48)).shape == (2, 1, 64, 48)
        assert UNet(in_channels=3, num_classes=3).eval()(torch.randn(2, 3, 32, 80)).shape == (2, 3, 32, 80)
        assert UNet(depth=3)(torch.randn(2, 1, 36, 20)).shape == (2, 1, 36, 20)


def test_size_not_divisible_raises():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet()(torch.randn(1, 1, 72, 40))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(depth=3)(torch.randn(1, 1, 34, 20))


def _input_gradient(model, pixel, size=64):
    x = torch.randn(1, 1, size, size, requires_grad=True)
    model(x)[0, 0, pixel[0], pixel[1]].backward()
    return x.grad[0, 0]


def test_bottleneck_reaches_far_pixels():
    """Through the 4 poolings, out[0, 0] depends on the opposite corner of a 64² input;
    a 2-level U-Net (receptive field ≈ 20 px) cannot see that far."""
    torch.manual_seed(0)
    g = _input_gradient(UNet().eval(), (0, 0))
    assert g[63, 63].abs() > 0
    g2 = _input_gradient(UNet(depth=2).eval(), (0, 0))
    assert g2[63, 63] == 0 and g2[40:, 40:].abs().sum() == 0
    assert g2[0, 0].abs() > 0


def test_skip_connection_carries_local_detail():
    """With every up-convolution zeroed, the deep path is cut; the output still depends
    on nearby pixels (through the level-1 skip) but on nothing far away."""
    torch.manual_seed(0)
    m = UNet().eval()
    with torch.no_grad():
        for up in m.decoder:
            up.up.weight.zero_()
            up.up.bias.zero_()
    g = _input_gradient(m, (32, 32))
    assert g[32, 32].abs() > 0
    # level-1 path: 2 convs + 2 convs + 1×1 head → receptive field 9×9 (radius 4)
    outside = torch.ones_like(g, dtype=torch.bool)
    outside[28:37, 28:37] = False
    assert g[outside].abs().max() == 0
    assert g[28, 28].abs() > 0 and g[36, 36].abs() > 0  # the window's corners are reached
    # the decoder concatenates [skip, up] in that order
    first = m.decoder[-1].conv[0][0]
    assert first.in_channels == 64 and first.weight.shape[1] == 64


def test_every_parameter_gets_a_gradient():
    m = UNet(num_classes=2)
    m(torch.randn(2, 1, 32, 32)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fuse_for_inference_with_random_bn_stats():
    torch.manual_seed(1)
    m = UNet(in_channels=3, num_classes=2)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
    m.eval()
    fused = fuse_for_inference(m)
    assert count_batchnorms(m) == 18 and fused.lesionseg_fused_bn == 18 and count_batchnorms(fused) == 0
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        a, b = m(x), fused(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_card_and_presets():
    card = models.card("unet")
    assert card["outputs"]["activation"] == "sigmoid" and card["architecture"]["config"]["num_classes"] == 1
    for name in ("covid-ct", "polyp", "breast-us", "stroke-t1", "stroke-dwi"):
        p = models.preset("unet", name)
        cfg = p.get("config", {})
        m = models.create("unet", **cfg).eval()
        ch = p["input"]["channels"]
        assert m.encoder[0][0][0].in_channels == ch
        d = p["input"]["size_divisor"]
        h = -(-max(p["input"]["min_size"], 64) // d) * d
        with torch.no_grad():
            assert m(torch.randn(1, ch, h, h)).shape == (1, 1, h, h)
    assert models.preset("unet", "polyp")["input"]["channel_order"] == "RGB"


def test_fundus_preset_is_lseg_comparable():
    """The fundus baseline has L-Seg's four overlapping outputs, classes and training loss."""
    from LesionSegLib.losses import LSegLoss, build_loss
    unet, lseg = models.preset("unet", "fundus-dr"), models.preset("lseg", "fundus-dr")
    assert unet["outputs"]["multi_label"] and unet["outputs"]["channels"] == 4
    assert [c["name"] for c in unet["classes"]] == [c["name"] for c in lseg["classes"]]
    assert isinstance(build_loss("unet", "fundus-dr"), LSegLoss)
    m = models.create("unet", **unet["config"]).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 96)).shape == (1, 4, 64, 96)
