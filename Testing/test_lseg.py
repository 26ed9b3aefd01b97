"""Tests of the L-Seg port (LesionSegLib/models/lseg.py, cards/lseg.json)."""
import pytest
import torch

from LesionSegLib import models
from LesionSegLib.models.fusion import fuse_for_inference
from LesionSegLib.models.lseg import SIDE_STRIDES, LSeg

torch.manual_seed(0)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LSeg().eval()


def test_fusion_convs_start_at_constant_0_2(net):
    assert len(net.class_fusion) == 4
    for conv in net.class_fusion:
        assert conv.weight.shape == (1, 5, 1, 1)
        assert torch.all(conv.weight == 0.2)
        assert torch.all(conv.bias == 0)
    for side in net.side_outputs:
        assert torch.all(side.conv.bias == 0)
        assert 0.005 < side.conv.weight.std().item() < 0.02  # N(0, 0.01²)


def test_side_init_std_zero_is_caffe_default():
    m = LSeg(side_init_std=0)
    assert all(torch.all(s.conv.weight == 0) for s in m.side_outputs)


def test_upsampling_kernels_are_exact_bilinear(net):
    assert net.side_outputs[0].up is None  # side 1 is at full resolution
    k2 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    w = net.side_outputs[1].up.weight  # factor 2, kernel 4
    assert w.shape == (4, 1, 4, 4)
    for c in range(4):
        assert torch.allclose(w[c, 0], k2[:, None] * k2[None, :], atol=0)
    k4 = torch.tensor([1, 3, 5, 7, 7, 5, 3, 1]) / 8.0  # factor 4, kernel 8
    assert torch.allclose(net.side_outputs[2].up.weight[0, 0], k4[:, None] * k4[None, :], atol=1e-7)
    # fixed: buffers, not parameters, and not in the state dict
    assert not any("up.weight" in k for k in net.state_dict())
    assert [s.up.factor for s in net.side_outputs[1:]] == [2, 4, 8, 16]


@pytest.mark.parametrize("side", [1, 2, 3, 4])
def test_crop_offset_zero_constant_map(side):
    """A constant stage map upsamples to the constant everywhere except the first s
    rows/columns, which Caffe's Crop at offset 0 keeps: there only one input cell
    contributes, with bilinear weight (o + 0.5)/s."""
    up = LSeg().side_outputs[side].up
    s = SIDE_STRIDES[side]
    h, w = 48, 32
    stage = torch.ones(1, 4, -(-h // s), -(-w // s))
    out = up(stage, (h, w))
    assert out.shape == (1, 4, h, w)
    assert torch.allclose(out[..., s:, s:], torch.ones(1, 4, h - s, w - s), atol=1e-6)
    ramp = (torch.arange(s) + 0.5) / s
    assert torch.allclose(out[0, 0, :s, s + 3], ramp, atol=1e-6)
    assert torch.allclose(out[0, 0, s + 3, :s], ramp, atol=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(ramp[0].item() ** 2)


def test_crop_offset_zero_shifts_by_half_stride():
    """A single stage-4 cell (stride 8, covering pixels 8i…8i+7, centre 8i+3.5) peaks
    at 8i+7.5 after the offset-0 crop: the s/2 shift documented in the card."""
    up = LSeg().side_outputs[3].up
    stage = torch.zeros(1, 4, 6, 6)
    stage[..., 2, 3] = 1.0
    out = up(stage, (48, 48))[0, 0]
    rows = out.sum(dim=1)
    cols = out.sum(dim=0)
    assert rows.argmax().item() in (8 * 2 + 7, 8 * 2 + 8)
    assert rows[8 * 2 + 7] == pytest.approx(rows[8 * 2 + 8].item())
    assert cols[8 * 3 + 7] == pytest.approx(cols.max().item())
    centre_of_mass = (rows * torch.arange(48)).sum() / rows.sum()
    assert centre_of_mass.item() == pytest.approx(8 * 2 + 7.5, abs=1e-4)


@pytest.mark.parametrize("size", [(48, 80), (100, 84), (33, 17)])
def test_six_outputs_at_input_size(net, size):
    with torch.no_grad():
        outs = net(torch.randn(2, 3, *size))
    assert isinstance(outs, tuple) and len(outs) == 6
    for o in outs:
        assert o.shape == (2, 4, *size)
        assert torch.isfinite(o).all()


def test_caffe_ceil_pooling_grid():
    stages = LSeg().vgg.forward_stages(torch.randn(1, 3, 100, 84))
    assert [tuple(f.shape[-2:]) for f in stages] == [(100, 84), (50, 42), (25, 21), (13, 11), (7, 6)]
    assert [f.shape[1] for f in stages] == [64, 128, 256, 512, 512]


def test_fuse_is_per_class_weighted_sum_of_sides(net):
    """At initialisation fuse[:, c] = 0.2 · Σ_k dsn_k[:, c]; class c ignores other channels."""
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 48, 48))
    sides, fuse = torch.stack(outs[:5]), outs[5]
    assert torch.allclose(fuse, 0.2 * sides.sum(0), atol=1e-5)
    m = LSeg()
    with torch.no_grad():
        m.class_fusion[1].weight.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0]).view(1, 5, 1, 1))
        m.class_fusion[1].bias.fill_(0.7)
        outs = m(torch.randn(1, 3, 32, 48))
    expected = 0.7 + outs[0][:, 1] - 2 * outs[1][:, 1] + 3 * outs[2][:, 1] + 0.5 * outs[3][:, 1]
    assert torch.allclose(outs[5][:, 1], expected, atol=1e-5)
    assert torch.allclose(outs[5][:, 0], 0.2 * torch.stack(outs[:5])[:, :, 0].sum(0), atol=1e-5)


def test_every_parameter_gets_a_gradient():
    m = LSeg()
    sum(o.sum() for o in m(torch.randn(2, 3, 32, 32))).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_caffe_param_groups():
    m = LSeg()
    groups = {g["name"]: g for g in m.caffe_param_groups(1e-6, weight_decay=2e-4)}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(m.parameters()))
    assert {id(p) for g in groups.values() for p in g["params"]} == {id(p) for p in m.parameters()}
    conv5 = groups["conv5.weight"]
    assert [p.shape for p in conv5["params"]] == [torch.Size([512, 512, 3, 3])] * 3
    assert conv5["lr"] == pytest.approx(1e-4) and conv5["weight_decay"] == pytest.approx(2e-4)
    assert groups["conv5.bias"]["lr"] == pytest.approx(2e-4) and groups["conv5.bias"]["weight_decay"] == 0
    assert groups["side.weight"]["lr"] == pytest.approx(1e-8)
    assert len(groups["conv1-4.weight"]["params"]) == 10
    assert m.vgg.features[0].weight in groups["conv1-4.weight"]["params"]
    torch.optim.SGD(m.caffe_param_groups(1e-6), lr=1e-6, momentum=0.9)  # accepted by an optimizer


def test_fuse_for_inference_matches_eval(net):
    fused = fuse_for_inference(net)
    assert fused.lesionseg_fused_bn == 0  # no BatchNorm in L-Seg
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        for a, b in zip(net(x), fused(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_card_matches_model():
    card = models.card("lseg")
    m = models.create("lseg")
    assert isinstance(m, LSeg)
    assert card["parameters"]["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad) == 14720620
    assert card["outputs"]["names"] == ["dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"]
    assert card["outputs"]["inference"] == "fuse" and card["outputs"]["channels"] == 4
    assert [c["name"][-4:] for c in card["classes"]] == ["(EX)", "(HE)", "(MA)", "(SE)"]
    assert [c["color"] for c in card["classes"]] == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
    norm = card["input"]["normalization"]
    assert norm["kind"] == "caffe_bgr_mean" and norm["mean_bgr"] == [16.3090, 56.4373, 116.5132]
    prefix = card["architecture"]["backbone_prefix"]
    keys = set(m.state_dict())
    from LesionSegLib.models.vgg import VGG16Features
    assert {prefix + k for k in VGG16Features().state_dict()} <= keys
    assert "vgg.features.28.weight" in keys
    d = card["input"]["size_divisor"]
    h = max(card["input"]["min_size"], 64)
    h = -(-h // d) * d
    with torch.no_grad():
        outs = m(torch.randn(1, 3, h, h))
    assert models.inference_output("lseg", outs) is outs[5]
