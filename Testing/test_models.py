"""Every registered network: card consistency, documented outputs, gradients to every
trainable parameter, checkpoint round trip and fused-inference equivalence."""
import pytest
import torch

from LesionSegLib import checkpoint, models
from LesionSegLib.models.fusion import count_batchnorms, fuse_for_inference

from conftest import randomize_norm_stats, smoke_size

ALL = models.list_models()
REQUIRED_CARD_KEYS = {"name", "display_name", "title", "paper", "summary", "architecture", "modality", "input",
                      "outputs", "classes", "default_preset", "presets", "parameters", "reconstructed", "choices"}


def test_registry_holds_the_five_networks_and_baselines():
    assert {"msenet", "m2snet", "lseg", "bsnet", "mslkseg", "unet", "msnet"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_card_is_complete(name):
    c = models.card(name)
    assert REQUIRED_CARD_KEYS <= set(c), REQUIRED_CARD_KEYS - set(c)
    paper = c["paper"]
    # a DOI for every published network; MSE-Net has no paper, only a README, and says so
    assert paper.get("doi") or (paper.get("code") and "no paper" in paper.get("venue", "")), paper
    out = c["outputs"]
    assert out["inference"] in out["names"]
    assert out["activation"] in ("sigmoid", "softmax")
    assert c["default_preset"] in c["presets"]
    for p in c["presets"]:
        merged = models.preset(name, p)
        assert merged["classes"], f"preset {p} has no classes"
        for cls in merged["classes"]:
            assert cls["name"] and len(cls["color"]) == 3 and all(0 <= v <= 255 for v in cls["color"])
            term = cls["terminology"]
            for key in ("category", "type"):
                scheme, code, meaning = term[key]
                assert scheme == "SCT" and code.isdigit() and meaning
    for item in c["reconstructed"]:
        assert item["part"] and item["reason"], item
    for item in c["choices"]:
        assert item["part"] and item["reason"], item
    norm = c["input"]["normalization"]
    assert norm["kind"]


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_matches_card(name):
    net = models.create(name)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == models.card(name)["parameters"]["trainable"]


def test_m2snet_parameter_count_within_two_percent_of_paper():
    net = models.create("m2snet")
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert abs(trainable - 27.7e6) / 27.7e6 < 0.02


def _outputs(y):
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _input(name, batch=2, seed=0):
    c = models.card(name)
    s = smoke_size(c)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c["input"]["channels"], s, s, generator=g)


@pytest.mark.parametrize("name", ALL)
def test_forward_gives_documented_outputs_and_every_parameter_learns(name):
    c = models.card(name)
    net = models.create(name).train()
    x = _input(name)
    outs = _outputs(net(x))
    assert len(outs) == len(c["outputs"]["names"])
    for o in outs:
        assert o.shape == (2, c["outputs"]["channels"], *x.shape[-2:])
        assert torch.isfinite(o).all()
    sum(o.float().mean() for o in outs).backward()
    no_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    zero = [n for n, p in net.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert len(zero) == 0, f"parameters with an all-zero gradient: {zero[:10]}"
    chosen = models.inference_output(name, outs)
    assert chosen is outs[c["outputs"]["names"].index(c["outputs"]["inference"])]


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    net = models.create(name)
    randomize_norm_stats(net, seed=3)
    net.eval()
    x = _input(name, seed=1)
    with torch.no_grad():
        before = _outputs(net(x))
    path = checkpoint.save(tmp_path / f"{name}.pt", net,
                           provenance={"training_data": "synthetic", "metrics": {"dice": 0.5}})
    loaded = checkpoint.load(path)
    assert loaded.kind == "lesionseg" and loaded.name == name
    assert loaded.provenance["training_data"] == "synthetic"
    assert loaded.provenance["metrics"] == {"dice": 0.5}
    assert loaded.card["name"] == name
    with torch.no_grad():
        after = _outputs(loaded.model(x))
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_fused_inference_form_equals_unfused(name):
    net = models.create(name)
    randomize_norm_stats(net, seed=5)
    net.eval()
    x = _input(name, seed=2)
    fused = fuse_for_inference(net)
    assert fused is not net and not fused.training
    assert count_batchnorms(fused) == 0, "every BatchNorm is folded"
    with torch.no_grad():
        ref, got = _outputs(net(x)), _outputs(fused(x))
    for r, f in zip(ref, got):
        rel = (r - f).abs().max() / r.abs().max().clamp_min(1e-6)
        assert rel <= 1e-4, f"{name}: fused differs by {rel:.2e} (relative)"
    # the original network is untouched
    assert count_batchnorms(net) > 0 or count_batchnorms(models.create(name)) == 0


def test_preset_config_is_applied_before_overrides():
    rgb = models.create("unet", preset="polyp")
    grey = models.create("unet", preset="polyp", in_channels=1)
    first = lambda net: next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first(rgb).in_channels == 3 and first(grey).in_channels == 1
    with pytest.raises(models.UnknownPresetError, match="no preset 'fundus'"):
        models.create("unet", preset="fundus")
    with pytest.raises(TypeError, match="unknown option.*widths"):
        models.create("unet", widths=3)
