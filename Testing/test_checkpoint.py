"""Checkpoint files: LesionSeg format, official files, backbones, refusal of code, atomic writes."""
import os

import pytest
import torch

from LesionSegLib import checkpoint, models
from LesionSegLib.checkpoint import CheckpointError
from LesionSegLib.models.res2net import res2net50_v1b_26w_4s
from LesionSegLib.models.vgg import VGG16Features, torchvision_vgg16_keys

from conftest import randomize_norm_stats


def _randomized(name, seed=0):
    net = models.create(name)
    randomize_norm_stats(net, seed)
    return net.eval()


def test_official_m2snet_file_from_dataparallel_loads_strictly_and_computes_the_same(tmp_path):
    src = _randomized("m2snet")
    path = tmp_path / "M2SNet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    ck = checkpoint.load(path)
    assert (ck.kind, ck.name) == ("official", "m2snet")
    assert not ck.model.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), ck.model(x))


@pytest.mark.parametrize("name", ["msnet", "bsnet"])
def test_official_files_are_recognised_by_their_keys(tmp_path, name):
    path = tmp_path / "weights.pth"
    torch.save(models.create(name).state_dict(), path)
    assert checkpoint.load(path).name == name


def test_file_that_does_not_fit_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = models.create("m2snet").state_dict()
    del sd["level1.0.weight"]
    sd["decoder.extra"] = torch.zeros(3)
    sd["output1.0.bias"] = torch.zeros(2)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path, model="m2snet")
    msg = str(e.value)
    assert "1 missing key: level1.0.weight" in msg
    assert "1 unexpected key: decoder.extra" in msg
    assert "output1.0.bias (file (2,), model (1,))" in msg


def test_unknown_state_dict_asks_for_the_model_name(tmp_path):
    path = tmp_path / "mystery.pth"
    torch.save({"encoder.w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="pass the model name.*encoder.w"):
        checkpoint.load(path)


class _CodeInPickle:
    marker = None

    def __reduce__(self):  # loading this would create the marker file
        return (open, (str(self.marker), "w"))


def test_loading_never_executes_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    _CodeInPickle.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _CodeInPickle()}, path)
    with pytest.raises(CheckpointError, match="never executes code"):
        checkpoint.load(path)
    assert not marker.exists()


def test_not_a_weight_file_and_missing_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weight file"):
        checkpoint.load(junk)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.load(tmp_path / "absent.pt")


def test_res2net_imagenet_file_loads_as_backbone_and_into_networks(tmp_path):
    src = res2net50_v1b_26w_4s()
    randomize_norm_stats(src, 1)
    path = tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth"
    torch.save(src.state_dict(), path)
    ck = checkpoint.load(path)
    assert (ck.kind, ck.name) == ("backbone", "res2net50_v1b_26w_4s")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ck.model(x), src.eval()(x))
    for name in ("m2snet", "bsnet"):
        net = models.create(name)
        assert not torch.equal(net.resnet.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
        assert checkpoint.load_pretrained_backbone(net, path) == "res2net50_v1b_26w_4s"
        assert torch.equal(net.resnet.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
        assert torch.equal(net.resnet.bn1.running_var, src.bn1.running_var)


def test_torchvision_vgg16_file_loads_into_the_vgg_backbone(tmp_path):
    shapes = torchvision_vgg16_keys()
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    ck = checkpoint.load(path)
    assert (ck.kind, ck.name) == ("backbone", "vgg16")
    assert isinstance(ck.model, VGG16Features)
    assert torch.equal(ck.model.features[28].weight, sd["features.28.weight"])
    assert torch.equal(ck.model.features[0].bias, sd["features.0.bias"])


def test_wrong_backbone_is_refused_with_both_names(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({k: torch.zeros(s) for k, s in torchvision_vgg16_keys().items()}, path)
    with pytest.raises(CheckpointError, match="needs a res2net50_v1b_26w_4s backbone.*vgg16"):
        checkpoint.load_pretrained_backbone(models.create("m2snet"), path)


def test_lesionseg_checkpoint_keeps_overrides_card_preset_and_provenance(tmp_path):
    net = models.create("m2snet", multi_scale=False)
    path = checkpoint.save(tmp_path / "ck.pt", net, config=models.config("m2snet", multi_scale=False),
                           preset="covid-ct", provenance={"recipe": {"lr": 0.05}, "data": tmp_path})
    ck = checkpoint.load(path)
    assert ck.config["multi_scale"] is False and not hasattr(ck.model, "conv_3")
    assert ck.card["preset"]["name"] == "covid-ct"
    assert ck.card["preset"]["classes"][0]["name"] == "Lung infection"
    assert ck.provenance["recipe"] == {"lr": 0.05} and ck.provenance["data"] == str(tmp_path)
    assert ck.provenance["torch_version"] == str(torch.__version__)
    name, card, prov = checkpoint.read_metadata(path)
    assert name == "m2snet" and prov["recipe"]["lr"] == 0.05
    with pytest.raises(CheckpointError, match="holds a 'm2snet' network, not 'bsnet'"):
        checkpoint.load(path, model="bsnet")


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION + 1,
                "model": "unet", "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="newer than this LesionSeg supports"):
        checkpoint.load(path)


def test_failed_save_leaves_the_previous_file_intact_and_no_temporary_files(tmp_path):
    net = models.create("msnet")
    path = checkpoint.save(tmp_path / "ck.pt", net, provenance={"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):
        checkpoint.save(path, net, extra={"unpicklable": lambda: None})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    assert checkpoint.read_metadata(path)[2]["epoch"] == 1


def test_saved_files_get_ordinary_permissions_not_the_temporary_files_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path / "ck.pt", models.create("unet", base_width=4, depth=2))
    finally:
        os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o644
