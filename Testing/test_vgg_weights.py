"""VGG-16 weight files in torchvision, conv-only Caffe and HED layouts, and the conversion
between the torchvision (RGB, 0-1, mean/std) and Caffe (BGR, 0-255, mean) input conventions."""
from pathlib import Path

import pytest
import torch

from LesionSegLib import checkpoint, models
from LesionSegLib.losses.lossnet import LossNet
from LesionSegLib.models import vgg_weights
from LesionSegLib.models.vgg import VGG16Features, torchvision_vgg16_keys

SHARED_VGG = Path(__file__).resolve().parents[2] / "shared" / "weights" / "vgg16-imagenet-caffe.pth"


def random_torchvision_file(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in torchvision_vgg16_keys().items()}


def caffe_input(rgb255, mean_rgb255):
    return (rgb255 - mean_rgb255.view(1, 3, 1, 1)).flip(1)


def test_torchvision_weights_in_caffe_convention_give_the_same_features():
    sd = random_torchvision_file()
    features, convention = vgg_weights.features_state(sd)
    assert convention == "torchvision" and not any(k.startswith("classifier") for k in features)
    tv, caffe = VGG16Features(), VGG16Features()
    tv.load_state_dict(features)
    caffe.load_state_dict(vgg_weights.convert(features, "torchvision", "caffe"))
    rgb = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 255
    mean, std = torch.tensor(vgg_weights.IMAGENET_MEAN), torch.tensor(vgg_weights.IMAGENET_STD)
    x_tv = (rgb / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = tv(x_tv), caffe(caffe_input(rgb, mean * 255))
    for fa, fb in zip(a, b):  # every stage, borders included
        assert torch.allclose(fa, fb, rtol=1e-4, atol=1e-4 * fa.abs().max().item())
    # and the other way round restores the file
    back = vgg_weights.convert(vgg_weights.convert(features, "torchvision", "caffe"), "caffe", "torchvision")
    assert torch.allclose(back["features.0.weight"], features["features.0.weight"], atol=1e-7)
    assert torch.equal(back["features.28.weight"], features["features.28.weight"])


def hed_files(features):
    """The same convolutions under a Caffe-converter's and sniklaus/pytorch-hed's names,
    each with HED's side-output and fusion layers that are not part of the backbone."""
    caffe_names = {v: k for k, v in vgg_weights.CAFFE_LAYER_INDEX.items()}
    caffe = {f"{caffe_names[int(k.split('.')[1])]}.{k.split('.')[2]}": v for k, v in features.items()}
    caffe.update({"score_dsn1.weight": torch.zeros(1, 64, 1, 1), "upscore_fuse.weight": torch.zeros(1, 5, 1, 1)})
    blocks = {1: "One", 2: "Two", 3: "Thr", 4: "Fou", 5: "Fiv"}
    hed = {}
    for name, index in vgg_weights.CAFFE_LAYER_INDEX.items():
        b, i = int(name[4]), int(name[6])
        pos = 2 * (i - 1) + (0 if b == 1 else 1)
        for part in ("weight", "bias"):
            hed[f"netVgg{blocks[b]}.{pos}.{part}"] = features[f"features.{index}.{part}"]
    hed.update({"netScoreOne.weight": torch.zeros(1, 64, 1, 1), "netCombine.0.weight": torch.zeros(1, 5, 1, 1)})
    return {"hed-caffe": caffe, "hed-pytorch": hed}


@pytest.mark.parametrize("kind", ["hed-caffe", "hed-pytorch"])
def test_hed_conversions_load_into_lseg_unchanged(tmp_path, kind):
    features, _ = vgg_weights.features_state(random_torchvision_file(seed=2))
    sd = hed_files(features)[kind]
    assert vgg_weights.layout(sd) == kind and checkpoint.identify(sd) == "vgg16"
    path = tmp_path / "hed.pth"
    torch.save(sd, path)
    net = models.create("lseg")
    assert checkpoint.load_pretrained_backbone(net, path) == "vgg16 (caffe input convention)"
    for k, v in features.items():  # L-Seg's input is Caffe BGR already: no conversion
        assert torch.equal(net.vgg.state_dict()[k], v), k


def test_torchvision_file_is_converted_for_lseg_and_kept_for_the_lossnet(tmp_path):
    sd = random_torchvision_file(seed=3)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    net = models.create("lseg")
    assert checkpoint.load_pretrained_backbone(net, path) == "vgg16 (torchvision -> caffe input convention)"
    expected = vgg_weights.convert(vgg_weights.features_state(sd)[0], "torchvision", "caffe")
    assert torch.equal(net.vgg.state_dict()["features.0.weight"], expected["features.0.weight"])
    assert not torch.equal(expected["features.0.weight"], sd["features.0.weight"])
    lossnet = LossNet(path)
    assert torch.equal(lossnet.features[0].weight, sd["features.0.weight"])


def test_unknown_file_is_refused_with_its_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a VGG-16 weight file"):
        checkpoint.vgg16_features(path, "caffe")
    with pytest.raises(ValueError, match="unknown VGG input convention"):
        vgg_weights.convert({}, "caffe", "bgr")


@pytest.mark.skipif(not SHARED_VGG.is_file(), reason="../shared/weights absent")
def test_shared_caffe_file_is_read_as_caffe_and_converted_for_the_lossnet():
    state, source = checkpoint.vgg16_features(SHARED_VGG, "caffe")
    assert source == "caffe" and len(state) == 26
    net = models.create("lseg")
    assert checkpoint.load_pretrained_backbone(net, SHARED_VGG) == "vgg16 (caffe input convention)"
    lossnet = LossNet(SHARED_VGG)
    assert lossnet.pretrained
    converted = vgg_weights.convert(state, "caffe", "torchvision")["features.0.weight"]
    assert torch.equal(lossnet.features[0].weight, converted)
    # torchvision's input channel 0 (R) is the Caffe file's channel 2, per 255*std grey levels
    assert torch.allclose(converted[:, 0], state["features.0.weight"][:, 2] * 255 * 0.229, rtol=1e-6)
