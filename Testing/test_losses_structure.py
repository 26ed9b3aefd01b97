"""Structure loss, M2SNet's LossNet (weights, freezing, warning) and BSNet's deep
supervision, against hand computation on tiny tensors."""
import logging
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, SHARED_DATA
from LesionSegLib.checkpoint import CheckpointError
from LesionSegLib.losses import (LossNet, UntrainedLossNetWarning, boundary_weight, build_loss,
                                 morphological_edge, structure_loss)
from LesionSegLib.losses.lossnet import random_vgg16_features
from LesionSegLib.models.vgg import torchvision_vgg16_keys


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def bce(x, t):
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


# 4×4 mask with five lesion pixels and fixed logits
MASK4 = [[0, 0, 0, 0],
         [0, 1, 1, 0],
         [0, 1, 1, 1],
         [0, 0, 0, 0]]
LOGITS4 = [[-2.0, -1.0, 0.5, -3.0],
           [0.0, 2.0, 1.0, -0.5],
           [-1.5, 3.0, -0.2, 0.7],
           [1.2, -2.5, -1.0, -4.0]]


def hand_structure(logits, mask, quirk=False):
    """Structure loss of one 4×4 image by hand. In a 4×4 image every 31×31 window (padding
    15, zeros counted: count_include_pad) holds all 16 pixels, so avgpool = Σm / 961."""
    flat = [(x, m) for rx, rm in zip(logits, mask) for x, m in zip(rx, rm)]
    avg = sum(m for _, m in flat) / 961.0
    w = [1 + 5 * abs(avg - m) for _, m in flat]
    if quirk:
        wbce = sum(bce(x, m) for x, m in flat) / len(flat)
    else:
        wbce = sum(wi * bce(x, m) for wi, (x, m) in zip(w, flat)) / sum(w)
    inter = sum(wi * sig(x) * m for wi, (x, m) in zip(w, flat))
    union = sum(wi * (sig(x) + m) for wi, (x, m) in zip(w, flat))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return wbce + wiou, wbce, wiou, w


def t4(rows):
    return torch.tensor(rows, dtype=torch.float64).view(1, 1, 4, 4)


def test_boundary_weight_4x4_by_hand():
    w = boundary_weight(t4(MASK4))
    _, _, _, hand_w = hand_structure(LOGITS4, MASK4)
    assert w.view(-1).tolist() == pytest.approx(hand_w, rel=1e-14)
    assert w[0, 0, 0, 0].item() == pytest.approx(1 + 5 * 5 / 961)
    assert w[0, 0, 1, 1].item() == pytest.approx(1 + 5 * (1 - 5 / 961))


def test_boundary_weight_matches_a_zero_padded_window_mean():
    """31×31 window, stride 1, zero padding counted in the divisor (961) — numpy reference
    on an image larger than the window, so that windows differ between pixels."""
    rng = np.random.default_rng(0)
    m = (rng.random((37, 45)) > 0.6).astype(np.float64)
    padded = np.pad(m, 15)
    avg = np.empty_like(m)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            avg[i, j] = padded[i:i + 31, j:j + 31].sum() / 961.0
    ref = 1 + 5 * np.abs(avg - m)
    got = boundary_weight(torch.from_numpy(m)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize("quirk", [False, True])
def test_structure_loss_4x4_by_hand(quirk):
    loss, wbce, wiou = structure_loss(t4(LOGITS4), t4(MASK4), bce_reduction_quirk=quirk, return_parts=True)
    h_loss, h_wbce, h_wiou, _ = hand_structure(LOGITS4, MASK4, quirk)
    assert loss.item() == pytest.approx(h_loss, rel=1e-12)
    assert wbce.item() == pytest.approx(h_wbce, rel=1e-12)
    assert wiou.item() == pytest.approx(h_wiou, rel=1e-12)


def test_structure_loss_is_a_batch_mean_of_per_image_terms():
    x2 = torch.cat([t4(LOGITS4), -t4(LOGITS4)])
    m2 = torch.cat([t4(MASK4), 1 - t4(MASK4)])
    per = [hand_structure(LOGITS4, MASK4)[0], hand_structure([[-v for v in r] for r in LOGITS4],
                                                             [[1 - v for v in r] for r in MASK4])[0]]
    assert structure_loss(x2, m2).item() == pytest.approx(sum(per) / 2, rel=1e-12)


def test_bce_reduction_quirk_gives_plain_mean_bce():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 24, 24, generator=g, dtype=torch.float64) * 2
    m = (torch.rand(3, 1, 24, 24, generator=g, dtype=torch.float64) > 0.7).double()
    _, wbce_q, _ = structure_loss(x, m, bce_reduction_quirk=True, return_parts=True)
    _, wbce_w, _ = structure_loss(x, m, bce_reduction_quirk=False, return_parts=True)
    plain = F.binary_cross_entropy_with_logits(x, m)  # one mean over the whole batch
    assert wbce_q.item() == pytest.approx(plain.item(), rel=1e-12)
    assert abs(wbce_w.item() - plain.item()) > 1e-3  # the corrected loss really weights
    # the quirk itself: the legacy reduce= argument given a string means "mean"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            legacy = F.binary_cross_entropy_with_logits(x, m, reduce="none")
    except TypeError:
        pytest.skip("this PyTorch no longer has the legacy reduce= argument")
    assert legacy.dim() == 0 and legacy.item() == pytest.approx(plain.item(), rel=1e-12)


def test_structure_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 1, 6, 6, generator=g, dtype=torch.float64)  # soft mask (bilinear resize)
    for quirk in (False, True):
        assert torch.autograd.gradcheck(lambda t, q=quirk: structure_loss(t, m, bce_reduction_quirk=q), (x,))


# --- LossNet ----------------------------------------------------------------------------------

@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONSEG_CACHE", str(tmp_path / "lesionseg-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)
POOL_IDX = (4, 9, 16)


def identity_channel0_features():
    """Every conv passes channel 0 straight through (centre tap 1), all else 0."""
    f = random_vgg16_features()
    with torch.no_grad():
        for i in CONV_IDX:
            f[i].weight.zero_()
            f[i].bias.zero_()
            f[i].weight[0, 0, 1, 1] = 1.0
    return f


def test_lossnet_hand_set_weights():
    """Constant maps a, b: after repeat, ImageNet normalisation (channel 0: mean .485,
    std .229) and resize they stay constant; channel 0 survives every block, pools keep
    constants. Block k's MSE is (relu(a') - relu(b'))² / channels_k."""
    a, b = 0.9, 0.3
    net = LossNet(features=identity_channel0_features())
    pred = torch.full((1, 1, 9, 13), a)
    mask = torch.full((1, 1, 9, 13), b)
    ra, rb = max((a - 0.485) / 0.229, 0.0), max((b - 0.485) / 0.229, 0.0)
    expected = (ra - rb) ** 2 * (1 / 64 + 1 / 128 + 1 / 256 + 1 / 512)
    assert net(pred, mask).item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        feats = net.block_features(net._prepare(pred))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 224, 224), (1, 128, 112, 112), (1, 256, 56, 56),
                                               (1, 512, 28, 28)]
    assert torch.allclose(feats[3][0, 0], torch.full((28, 28), ra))


def test_lossnet_equals_an_explicit_per_block_computation():
    features = random_vgg16_features(seed=5)
    net = LossNet(features=features)
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 1, 20, 28, generator=g)
    mask = (torch.rand(1, 1, 20, 28, generator=g) > 0.5).float()

    def prep(t):
        t = t.repeat(1, 3, 1, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        t = (t - mean) / std
        return F.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False)

    def blocks(t):
        outs = []
        for i in range(23):  # torchvision vgg16.features[0:23]
            if i in CONV_IDX:
                t = F.relu(F.conv2d(t, features[i].weight, features[i].bias, padding=1))
            elif i in POOL_IDX:
                t = F.max_pool2d(t, 2, 2)
            if i in (3, 8, 15, 22):  # relu1_2, relu2_2, relu3_3, relu4_3
                outs.append(t)
        return outs

    with torch.no_grad():
        expected = sum(F.mse_loss(p, m) for p, m in zip(blocks(prep(pred)), blocks(prep(mask))))
        got = net(pred, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert net(mask, mask).item() == 0.0


def test_lossnet_is_frozen_and_stays_in_eval_mode(empty_caches):
    with pytest.warns(UntrainedLossNetWarning):
        loss_fn = build_loss("m2snet", lossnet_weights=None)
    loss_fn.train()
    vgg = loss_fn.lossnet.features
    assert not vgg.training and loss_fn.training
    assert all(not p.requires_grad for p in vgg.parameters())
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    m = (torch.rand(1, 1, 32, 32) > 0.5).float()
    loss = loss_fn(x, {"mask": m})
    loss.backward()
    assert all(p.grad is None for p in vgg.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    comps = loss_fn.last_components
    assert set(comps) == {"structure", "wbce", "wiou", "lossnet", "total"}
    assert comps["total"] == pytest.approx(comps["structure"] + 0.1 * comps["lossnet"], rel=1e-6)
    assert comps["structure"] == pytest.approx(structure_loss(x.detach(), m).item(), rel=1e-6)
    assert comps["lossnet"] == pytest.approx(loss_fn.lossnet(torch.sigmoid(x.detach()), m).item(), rel=1e-6)


# --- LossNet weights: search, loading, the loud warning -------------------------------------------

def write_torchvision_vgg16(path):
    """A file in torchvision's vgg16 layout (every key, classifier included) whose tensors
    hold one distinct value each. Stride-0 views keep the file tiny (the classifier alone
    would be 0.5 GB)."""
    values = {}
    sd = {}
    for i, (k, shape) in enumerate(torchvision_vgg16_keys().items()):
        values[k] = 0.001 * (i + 1)
        sd[k] = torch.full((1,), values[k]).expand(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    return values


def test_missing_lossnet_weights_warn_loudly(empty_caches, caplog):
    with caplog.at_level(logging.WARNING, logger="LesionSegLib.losses.lossnet"), \
            pytest.warns(UntrainedLossNetWarning, match="UNTRAINED"):
        loss_fn = build_loss("m2snet")
    assert any("UNTRAINED" in r.getMessage() for r in caplog.records)
    assert loss_fn.lossnet_pretrained is False
    assert loss_fn.config["lossnet"] == {"used": True, "pretrained": False, "weights": None}
    assert any("UNTRAINED" in n for n in loss_fn.config["notes"])
    # untrained but seeded: two builds measure the same
    with pytest.warns(UntrainedLossNetWarning):
        other = build_loss("msnet")
    assert torch.equal(loss_fn.lossnet.features[21].weight, other.lossnet.features[21].weight)
    # the loss still trains
    x = torch.randn(1, 1, 16, 16, requires_grad=True)
    loss_fn(x, {"mask": (torch.rand(1, 1, 16, 16) > 0.5).float()}).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("where", ["option", "lesionseg-cache", "torch-hub"])
def test_supplied_vgg16_file_is_loaded_and_silences_the_warning(empty_caches, caplog, where):
    tmp = empty_caches
    path = {"option": tmp / "mine" / "vgg.pth",
            "lesionseg-cache": tmp / "lesionseg-cache" / "weights" / "vgg16-397923af.pth",
            "torch-hub": tmp / "torch-home" / "hub" / "checkpoints" / "vgg16-397923af.pth"}[where]
    values = write_torchvision_vgg16(path)
    options = {"lossnet_weights": str(path)} if where == "option" else {}
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loss_fn = build_loss("m2snet", **options)
    assert not [w for w in caught if issubclass(w.category, UntrainedLossNetWarning)]
    assert not [r for r in caplog.records if "UNTRAINED" in r.getMessage()]
    assert loss_fn.lossnet_pretrained is True
    assert loss_fn.config["lossnet"]["weights"] == str(path)
    vgg = loss_fn.lossnet.features
    assert len(vgg) == 23  # relu4_3 is the last layer used
    for i in CONV_IDX:
        assert torch.all(vgg[i].weight == values[f"features.{i}.weight"])
        assert torch.all(vgg[i].bias == values[f"features.{i}.bias"])
        assert not vgg[i].weight.requires_grad


def test_bad_lossnet_weights_are_clear_errors(empty_caches):
    tmp = empty_caches
    with pytest.raises(CheckpointError, match="no such file"):
        build_loss("m2snet", lossnet_weights=str(tmp / "nope.pth"))
    wrong = tmp / "res.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, str(wrong))
    with pytest.raises(CheckpointError, match=r"res\.pth"):
        build_loss("m2snet", lossnet_weights=str(wrong))
    # a bad file in the cache is not silently replaced by random features either
    bad = tmp / "lesionseg-cache" / "weights" / "vgg16-397923af.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"vgg16-397923af\.pth"):
        build_loss("m2snet")


def test_lossnet_weight_zero_builds_no_vgg(empty_caches):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedLossNetWarning)
        loss_fn = build_loss("m2snet", lossnet_weight=0)
    assert loss_fn.lossnet is None
    x, m = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert loss_fn(x, {"mask": m}).item() == pytest.approx(structure_loss(x, m).item(), rel=1e-6)
    assert "lossnet" not in loss_fn.last_components


def test_m2snet_quirk_option_reaches_the_structure_loss(empty_caches):
    x, m = torch.randn(2, 1, 40, 40), (torch.rand(2, 1, 40, 40) > 0.7).float()
    q = build_loss("m2snet", bce_reduction_quirk=True, lossnet_weight=0)
    c = build_loss("m2snet", bce_reduction_quirk=False, lossnet_weight=0)
    q(x, {"mask": m})
    c(x, {"mask": m})
    assert q.last_components["wbce"] == pytest.approx(F.binary_cross_entropy_with_logits(x, m).item(), rel=1e-6)
    assert c.last_components["wbce"] != pytest.approx(q.last_components["wbce"], rel=1e-3)
    assert "plain mean BCE" in q.config["notes"][0]


# --- BSNet --------------------------------------------------------------------------------------

def test_morphological_edge_by_hand():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 2:6, 2:6] = 1  # 4×4 square
    e = morphological_edge(m)[0, 0]
    expected = torch.zeros(8, 8)
    expected[1:7, 1:7] = 1   # dilation: 6×6
    expected[3:5, 3:5] = 0   # minus erosion: 2×2
    assert torch.equal(e, expected)
    assert morphological_edge(torch.ones(1, 1, 5, 5)).abs().sum() == 0  # image border is no edge


def bsnet_batch(b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = tuple(torch.randn(b, 1, s, s, generator=g) for _ in range(5))
    mask = torch.zeros(b, 1, s, s)
    mask[:, :, 8:20, 10:24] = 1
    return outs, mask


def test_bsnet_loss_five_outputs_and_derived_edge():
    outs, mask = bsnet_batch()
    loss_fn = build_loss("bsnet")
    derived = loss_fn(outs, {"mask": mask})
    comps = loss_fn.last_components
    assert list(comps) == ["lateral_map_5", "lateral_map_4", "lateral_map_3", "lateral_map_2",
                           "structure", "edge", "total"]
    for i, name in enumerate(["lateral_map_5", "lateral_map_4", "lateral_map_3", "lateral_map_2"]):
        assert comps[name] == pytest.approx(structure_loss(outs[i], mask).item(), rel=1e-6)
    edge = morphological_edge(mask)
    expected_edge = F.binary_cross_entropy_with_logits(outs[4], edge).item()
    assert comps["edge"] == pytest.approx(expected_edge, rel=1e-6)
    assert derived.item() == pytest.approx(sum(comps[n] for n in list(comps)[:4]) + expected_edge, rel=1e-6)
    # given edge GT is used as is
    given = loss_fn(outs, {"mask": mask, "edge": edge})
    assert given.item() == pytest.approx(derived.item(), rel=1e-6)
    other = torch.zeros_like(edge)
    loss_fn(outs, {"mask": mask, "edge": other})
    assert loss_fn.last_components["edge"] == pytest.approx(
        F.binary_cross_entropy_with_logits(outs[4], other).item(), rel=1e-6)
    assert any("inferred" in n for n in loss_fn.config["notes"])


def test_bsnet_loss_gradients_reach_all_five_outputs():
    outs, mask = bsnet_batch(b=1, s=16)
    outs = tuple(o.clone().requires_grad_(True) for o in outs)
    build_loss("bsnet", edge_weight=2.0)(outs, {"mask": mask}).backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outs)


def test_bsnet_loss_errors_name_the_problem():
    outs, mask = bsnet_batch(b=1, s=16)
    loss_fn = build_loss("bsnet")
    with pytest.raises(ValueError, match="expected 5 output"):
        loss_fn(outs[:4], {"mask": mask})
    with pytest.raises(ValueError, match=r"batch\['edge'\]"):
        loss_fn(outs, {"mask": mask, "edge": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(ValueError, match="no 'mask'"):
        loss_fn(outs, {"image": torch.zeros(1, 3, 16, 16)})


@pytest.mark.skipif(not (SHARED_DATA / "covid-semiseg" / "train" / "Edge").is_dir(),
                    reason="shared COVID-SemiSeg data absent")
def test_derived_edges_contain_infnet_edge_maps():
    """On real masks, the 3×3 morphological gradient contains every pixel of the edge
    maps Inf-Net released with COVID-SemiSeg (which BSNet's loader reads)."""
    import SimpleITK as sitk
    root = SHARED_DATA / "covid-semiseg" / "train"
    for gt in sorted((root / "GT").glob("*.png"))[:4]:
        m = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(gt))) > 127).float()[None, None]
        e = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(root / "Edge" / gt.name))) > 127)
        d = morphological_edge(m)[0, 0] > 0
        assert e.sum() > 0
        assert (d & e).sum() == e.sum(), gt.name
        assert 2 * (d & e).sum() / (d.sum() + e.sum()) > 0.75, gt.name


def test_importing_losses_does_not_import_torch():
    code = ("import sys; import LesionSegLib.losses as L; assert 'torch' not in sys.modules; "
            "assert 'build_loss' in dir(L)")
    subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), check=True)
