"""Tests of the reconstructed MS-LKSeg (LesionSegLib/models/mslkseg.py)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from LesionSegLib import models
from LesionSegLib.models.fusion import count_batchnorms, fuse_for_inference
from LesionSegLib.models.mslkseg import (DynamicConvBNReLU, LDBlock, MISBlock, MSLKSeg,
                                         MultiSemanticSpatialAttention,
                                         ProgressiveChannelSelfAttention, ReparamDepthwiseConv)

SMALL = dict(widths=[8, 16, 16, 32, 32], midm_heads=4)


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running statistics and affine parameters, random GN affine parameters,
    so that fusion checks are not trivially satisfied by identity BNs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------ whole network
def test_default_output_shape_and_card():
    torch.manual_seed(0)
    net = models.create("mslkseg").eval()
    card = models.card("mslkseg")
    x = torch.randn(2, card["input"]["channels"], 96, 96)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, card["outputs"]["channels"], 96, 96)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == card["parameters"]["trainable"]
    # 4 LD skips, 5 encoder levels of 2 MIS blocks, 4 decoder levels
    assert len(net.skips) == 4 and len(net.decoder) == 4
    assert sum(isinstance(m, MISBlock) for m in net.modules()) == 10
    # LD kernels as in the paper's README (21x21 and 3x3)
    assert net.skips[0].spatial.large_conv.kernel_size == (21, 21)
    assert net.skips[0].spatial.small_conv.kernel_size == (3, 3)


def test_overrides_and_min_size():
    card = models.card("mslkseg")
    net = models.create("mslkseg", in_channels=1, num_classes=3, **SMALL).eval()
    s = card["input"]["min_size"]
    assert s % card["input"]["size_divisor"] == 0
    with torch.no_grad():
        assert net(torch.randn(2, 1, s, s)).shape == (2, 3, s, s)
        assert net(torch.randn(1, 1, 48, 80)).shape == (1, 3, 48, 80)


def test_whole_net_fused_equals_unfused():
    torch.manual_seed(1)
    net = randomise_norms(models.create("mslkseg")).eval()
    x = torch.randn(2, 3, 64, 64)
    fused = fuse_for_inference(net)
    assert count_batchnorms(fused) == 0  # every BN folded somewhere
    assert count_batchnorms(net) > 0  # the original is untouched
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) < 1e-4


def test_every_parameter_gets_a_gradient_in_training():
    torch.manual_seed(2)
    net = MSLKSeg(**SMALL).train()
    net.set_dyconv_temperature(30.0)  # Chen et al.'s starting temperature
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


# ------------------------------------------------------------------------ DyConv
def test_dyconv_attention_sums_to_one_and_temperature_flattens_it():
    torch.manual_seed(3)
    conv = DynamicConvBNReLU(8, 16, num_kernels=4)
    x = torch.randn(5, 8, 12, 12)
    attn = conv.kernel_attention(x)
    assert attn.shape == (5, 4)
    assert torch.allclose(attn.sum(1), torch.ones(5), atol=1e-6)
    assert (attn > 0).all()
    conv.temperature = 1e6
    assert torch.allclose(conv.kernel_attention(x), torch.full((5, 4), 0.25), atol=1e-5)


def test_dyconv_with_uniform_attention_is_the_mean_kernel_convolution():
    # hand-checked case: zero last FC -> logits 0 -> attention exactly 1/K
    torch.manual_seed(4)
    conv = DynamicConvBNReLU(6, 10, num_kernels=4).eval()
    with torch.no_grad():
        conv.attention.fc2.weight.zero_()
        conv.attention.fc2.bias.zero_()
    x = torch.randn(3, 6, 9, 9)
    expected = F.relu(conv.bn(F.conv2d(x, conv.weight.mean(0), padding=1)))
    with torch.no_grad():
        assert torch.allclose(conv(x), expected, atol=1e-5)


def test_dyconv_folded_equals_unfused():
    torch.manual_seed(5)
    conv = randomise_norms(DynamicConvBNReLU(8, 12, num_kernels=4)).eval()
    x = torch.randn(3, 8, 10, 10)
    with torch.no_grad():
        ref = conv(x)
        conv.fuse_for_inference_()
        assert isinstance(conv.bn, nn.Identity)
        assert conv.bias.shape == (4, 12)
        assert rel_err(conv(x), ref) < 1e-5


def test_dyconv_batch_samples_are_independent():
    torch.manual_seed(6)
    conv = randomise_norms(DynamicConvBNReLU(5, 7, num_kernels=4)).eval()
    x = torch.randn(4, 5, 11, 11)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 5, 11, 11) * 3  # change every sample but the first
    with torch.no_grad():
        y, y2 = conv(x), conv(x2)
        # per-sample kernels differ, so the samples really use different weights
        attn = conv.kernel_attention(x2)
        assert not torch.allclose(attn[0], attn[1])
        assert torch.allclose(y[0], y2[0], atol=1e-6)
        # and the folded batch equals running the samples one by one
        one_by_one = torch.cat([conv(x2[i:i + 1]) for i in range(4)])
        assert torch.allclose(y2, one_by_one, atol=1e-5)


# ------------------------------------------------------------------ MIE / MIDM
def test_mie_shape_gates_and_zero_filter_case():
    torch.manual_seed(7)
    mie = randomise_norms(MultiSemanticSpatialAttention(16))
    x = torch.randn(2, 16, 12, 20)
    gate_h, gate_w = mie.gates(x)
    assert gate_h.shape == (2, 16, 12, 1) and gate_w.shape == (2, 16, 1, 20)
    assert ((gate_h > 0) & (gate_h < 1)).all() and ((gate_w > 0) & (gate_w < 1)).all()
    assert mie(x).shape == x.shape
    # kernels 3, 5, 7, 9 on four groups of 4 channels, shared by both directions
    assert [c.kernel_size[0] for c in mie.group_convs] == [3, 5, 7, 9]
    assert all(c.groups == 4 and c.in_channels == 4 for c in mie.group_convs)
    # zero filters -> zero profiles -> GN gives its bias -> gates sigmoid(bias)
    with torch.no_grad():
        for c in mie.group_convs:
            c.weight.zero_()
            c.bias.zero_()
        expected = x * torch.sigmoid(mie.norm_h.bias).reshape(1, -1, 1, 1) \
            * torch.sigmoid(mie.norm_w.bias).reshape(1, -1, 1, 1)
        assert torch.allclose(mie(x), expected, atol=1e-6)


def test_mie_filters_are_shared_between_height_and_width():
    # with equal GN affines, transposing the image must transpose the result,
    # which holds only if the H and W profiles go through the same 1-D convs
    torch.manual_seed(8)
    mie = MultiSemanticSpatialAttention(8)
    x = torch.randn(2, 8, 10, 14)
    with torch.no_grad():
        assert torch.allclose(mie(x.transpose(2, 3)), mie(x).transpose(2, 3), atol=1e-6)


def test_mie_groups_use_their_own_kernel():
    # the H-gate of channel group 0 depends only on channels of group 0
    torch.manual_seed(9)
    mie = MultiSemanticSpatialAttention(16, norm_groups=4)
    x = torch.randn(1, 16, 8, 8)
    x2 = x.clone()
    x2[:, 4:] += torch.randn(1, 12, 8, 8)
    with torch.no_grad():
        assert torch.allclose(mie.gates(x)[0][:, :4], mie.gates(x2)[0][:, :4], atol=1e-6)
        assert not torch.allclose(mie.gates(x)[0][:, 4:], mie.gates(x2)[0][:, 4:])


def test_midm_shape_gate_range_and_zero_value_case():
    torch.manual_seed(10)
    midm = randomise_norms(ProgressiveChannelSelfAttention(16, heads=4, window=7))
    for size in (21, 6, 3):  # 21 -> 3x3 pooled; 6 and 3 clamp the window to the map
        x = torch.randn(2, 16, size, size)
        gate = midm.gate(x)
        assert gate.shape == (2, 16, 1, 1)
        assert ((gate > 0) & (gate < 1)).all()
        assert midm(x).shape == x.shape
    # hand-checked case: V = 0 -> attention output 0 -> gate sigmoid(0) = 1/2
    with torch.no_grad():
        midm.value.weight.zero_()
        x = torch.randn(2, 16, 14, 14)
        assert torch.allclose(midm(x), 0.5 * x, atol=1e-6)


def test_midm_matches_explicit_per_head_attention():
    torch.manual_seed(11)
    c, heads = 8, 2
    midm = randomise_norms(ProgressiveChannelSelfAttention(c, heads=heads, window=7))
    x = torch.randn(1, c, 14, 14)
    with torch.no_grad():
        y = F.group_norm(F.avg_pool2d(x, 7), 1, midm.norm.weight, midm.norm.bias, midm.norm.eps)[0]
        gates = []
        for h in range(heads):
            ch = slice(h * c // heads, (h + 1) * c // heads)
            q = (y[ch] * midm.query.weight[ch, 0]).reshape(c // heads, -1)
            k = (y[ch] * midm.key.weight[ch, 0]).reshape(c // heads, -1)
            v = (y[ch] * midm.value.weight[ch, 0]).reshape(c // heads, -1)
            a = torch.softmax(q @ k.T / math.sqrt(c // heads), dim=1)
            gates.append(torch.sigmoid((a @ v).mean(1)))
        expected = torch.cat(gates).reshape(1, c, 1, 1)
        assert torch.allclose(midm.gate(x), expected, atol=1e-6)


# ------------------------------------------------------------------ LD / Re-DWConv
def test_redwconv_reparameterised_equals_two_branches():
    torch.manual_seed(12)
    block = ReparamDepthwiseConv(6, 21, 3)
    with torch.no_grad():
        block.large_conv.weight.normal_(0, 0.05)
        block.small_conv.weight.normal_()
    randomise_norms(block).eval()
    x = torch.randn(2, 6, 30, 26)
    with torch.no_grad():
        ref = block(x)
        w, b = block.merged_kernel()
        # hand check: outside the central 3x3 only the (scaled) large kernel remains
        s_l = block.large_bn.weight / torch.sqrt(block.large_bn.running_var + block.large_bn.eps)
        assert torch.allclose(w[:, 0, 0, 0], block.large_conv.weight[:, 0, 0, 0] * s_l)
        block.reparameterize()
        assert block.merged.kernel_size == (21, 21) and block.merged.groups == 6
        assert not hasattr(block, "small_conv")
        assert rel_err(block(x), ref) <= 1e-5


def test_ld_block_fused_equals_unfused():
    torch.manual_seed(13)
    block = randomise_norms(LDBlock(8)).eval()
    x = torch.randn(2, 8, 24, 24)
    with torch.no_grad():
        ref = block(x)
        fused = fuse_for_inference(block)
        assert isinstance(fused.pre_norm, nn.Identity) and fused.proj_in.bias is not None
        assert fused.spatial.merged is not None
        assert count_batchnorms(fused) == 0
        assert rel_err(fused(x), ref) <= 1e-5
        # residual: zero output projection makes the block the identity
        block.proj_out.weight.zero_()
        block.proj_out.bias.zero_()
        assert torch.equal(block(x), x)
