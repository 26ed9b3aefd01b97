"""build_loss for every registered network: dispatch from the card, one real backward
pass through the real network, option checking, and the BCE/CE + Dice losses by hand."""
import math
import warnings

import pytest
import torch

from conftest import smoke_size
from LesionSegLib import models
from LesionSegLib.losses import (BSNetLoss, DiceCELoss, LSegLoss, M2SNetLoss, UntrainedLossNetWarning,
                                 bce_dice_loss, build_loss, ce_dice_loss)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONSEG_CACHE", str(tmp_path / "lesionseg-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


EXPECTED = {"m2snet": M2SNetLoss, "msnet": M2SNetLoss, "bsnet": BSNetLoss, "lseg": LSegLoss,
            "msenet": DiceCELoss, "mslkseg": DiceCELoss, "unet": DiceCELoss}


def test_every_registered_network_has_a_loss():
    assert sorted(EXPECTED) == models.list_models()


def tiny_batch(card, size, batch=2):
    """Image, per-channel mask and label map with a lesion square per image (and, for
    multi-class cards, other classes in corners)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, card["input"]["channels"], size, size, generator=g)
    label = torch.zeros(batch, size, size, dtype=torch.long)
    label[:, size // 4:size // 2, size // 3:size // 2 + 4] = 1
    k = card["outputs"]["channels"]
    if k > 1:
        label[0, :6, :6] = 2
        label[-1, -5:, -7:] = k
        mask = torch.stack([(label == c + 1) for c in range(k)], 1).float()
    else:
        mask = (label > 0).float()[:, None]
    return {"image": image, "mask": mask, "label": label}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_loss_and_one_backward_through_the_real_network(name, empty_caches):
    card = models.card(name)
    net = models.create(name).train()
    size = smoke_size(card)
    batch = tiny_batch(card, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedLossNetWarning)  # no ImageNet VGG here: expected
        loss_fn = build_loss(name).train()
    assert type(loss_fn) is EXPECTED[name]
    loss = loss_fn(net(batch["image"]), batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(1 for g in grads if g is not None and g.abs().sum() > 0) > len(grads) // 2
    assert all(p.grad is None for p in loss_fn.parameters())  # the loss itself learns nothing
    comps = loss_fn.last_components
    assert comps["total"] == pytest.approx(loss.item(), rel=1e-6)
    assert all(isinstance(v, float) and math.isfinite(v) for v in comps.values())
    assert loss_fn.config["model"] == name and loss_fn.config["recipe"]


def test_unet_multiclass_uses_softmax_ce_dice():
    net = models.create("unet", num_classes=3, depth=3, base_width=8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, generator=g)
    label = torch.randint(0, 3, (2, 32, 32), generator=g)
    out = net(x)
    loss_fn = build_loss("unet", "covid-ct")
    loss = loss_fn(out, {"label": label})
    assert set(loss_fn.last_components) == {"ce", "dice", "total"}
    assert loss.item() == pytest.approx(ce_dice_loss(out, label).item(), rel=1e-6)
    # a one-hot mask alone gives the same loss
    onehot = torch.nn.functional.one_hot(label, 3).permute(0, 3, 1, 2).float()
    assert loss_fn(out, {"mask": onehot}).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="num_classes=4"):
        build_loss("unet", num_classes=4)(out, {"label": label})
    with pytest.raises(ValueError, match=r"0\.\.2"):
        loss_fn(out, {"label": label + 1})


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_bce_dice_by_hand():
    x = [[0.5, -1.0], [2.0, -0.3]]
    m = [[1.0, 0.0], [1.0, 1.0]]
    xt = torch.tensor(x, dtype=torch.float64).view(1, 1, 2, 2)
    mt = torch.tensor(m, dtype=torch.float64).view(1, 1, 2, 2)
    flat = [(a, b) for ra, rb in zip(x, m) for a, b in zip(ra, rb)]
    bce = sum(-(t * math.log(sig(v)) + (1 - t) * math.log(1 - sig(v))) for v, t in flat) / 4
    inter = sum(sig(v) * t for v, t in flat)
    dice = (2 * inter + 1) / (sum(sig(v) for v, _ in flat) + sum(t for _, t in flat) + 1)
    loss, b, d = bce_dice_loss(xt, mt, return_parts=True)
    assert b.item() == pytest.approx(bce, rel=1e-12)
    assert d.item() == pytest.approx(1 - dice, rel=1e-12)
    assert loss.item() == pytest.approx(bce + 1 - dice, rel=1e-12)


def test_ce_dice_by_hand_excludes_background_from_dice():
    # one image, 3 classes, 2 pixels
    logits = [[1.0, 0.0], [0.5, 2.0], [-1.0, 0.3]]  # [class][pixel]
    label = [0, 1]
    xt = torch.tensor(logits, dtype=torch.float64).view(1, 3, 1, 2)
    lt = torch.tensor(label).view(1, 1, 2)
    probs = []
    for j in range(2):
        z = sum(math.exp(logits[c][j]) for c in range(3))
        probs.append([math.exp(logits[c][j]) / z for c in range(3)])
    ce = -sum(math.log(probs[j][label[j]]) for j in range(2)) / 2
    dices = []
    for c in (1, 2):
        inter = sum(probs[j][c] * (label[j] == c) for j in range(2))
        dices.append((2 * inter + 1) / (sum(probs[j][c] for j in range(2)) + sum(label[j] == c for j in range(2)) + 1))
    loss, c_, d_ = ce_dice_loss(xt, lt, return_parts=True)
    assert c_.item() == pytest.approx(ce, rel=1e-12)
    assert d_.item() == pytest.approx(1 - sum(dices) / 2, rel=1e-12)
    assert loss.item() == pytest.approx(ce + 1 - sum(dices) / 2, rel=1e-12)


def test_binary_net_trained_from_a_label_map():
    loss_fn = build_loss("msenet")
    g = torch.Generator().manual_seed(2)
    out = torch.randn(2, 1, 16, 16, generator=g)
    label = torch.randint(0, 3, (2, 16, 16), generator=g)
    a = loss_fn(out, {"label": label}).item()
    b = loss_fn(out, {"mask": (label > 0).float()[:, None]}).item()
    assert a == pytest.approx(b, rel=1e-6)


def test_options_are_checked(empty_caches):
    with pytest.raises(TypeError, match=r"unknown option.*bogus.*accepted: bce_reduction_quirk, lossnet_weight, "
                                        r"lossnet_weights"):
        build_loss("m2snet", bogus=1)
    with pytest.raises(TypeError, match="bce_reduction_quirk"):
        build_loss("bsnet", bce_reduction_quirk="yes")
    with pytest.raises(TypeError, match="key"):
        build_loss("lseg", key=-1)
    with pytest.raises(TypeError, match="num_label"):
        build_loss("lseg", num_label=0)
    with pytest.raises(TypeError, match=r"unknown option.*key"):
        build_loss("unet", key=10)
    with pytest.raises(KeyError, match="unknown model"):
        build_loss("nosuchnet")
    with pytest.raises(KeyError, match="no preset"):
        build_loss("unet", "nosuchpreset")
    # None means the default
    assert build_loss("lseg", key=None, num_label=None).options == {"key": 10.0, "num_label": None}
    assert build_loss("M2SNet", lossnet_weight=0).model_name == "m2snet"  # aliases resolve


def test_shape_errors_name_the_batch_key():
    loss_fn = build_loss("mslkseg")
    with pytest.raises(ValueError, match=r"batch\['mask'\] has shape \(2, 1, 8, 8\)"
                                         r".*'logits' has shape \(2, 1, 16, 16\)"):
        loss_fn(torch.zeros(2, 1, 16, 16), {"mask": torch.zeros(2, 1, 8, 8)})
    with pytest.raises(ValueError, match="expected 1 output"):
        loss_fn((torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)), {"mask": torch.zeros(2, 1, 8, 8)})


def test_half_precision_outputs_are_lifted_to_float32():
    loss_fn = build_loss("unet")
    out = torch.randn(1, 1, 8, 8).half()
    batch = {"mask": (torch.rand(1, 1, 8, 8) > 0.5).float()}
    loss = loss_fn(out, batch)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(out.float(), batch).item(), rel=1e-7)
