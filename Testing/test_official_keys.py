"""Our M2SNet, MSNet, BSNet and Res2Net state dicts equal the official ones, key by key,
shape by shape and in the same order. The reference is a committed JSON of facts
extracted from the official model code (the code itself is not part of LesionSeg)."""
import json
from pathlib import Path

import pytest

from LesionSegLib import models
from LesionSegLib.models.res2net import res2net50_v1b_26w_4s

FACTS = json.loads((Path(__file__).parent / "data" / "official_state_dict_keys.json").read_text())["models"]


def _layout(module):
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("official, ours", [("M2SNet", "m2snet"), ("MSNet", "msnet"), ("BSNet", "bsnet")])
def test_network_state_dict_equals_official(official, ours):
    expected = list(FACTS[official].items())
    got = _layout(models.create(ours))
    missing = sorted(set(dict(expected)) - set(dict(got)))
    extra = sorted(set(dict(got)) - set(dict(expected)))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    assert got == [(k, list(v)) for k, v in expected]


def test_res2net_backbone_equals_official_imagenet_layout():
    expected = [(k, list(v)) for k, v in FACTS["Res2Net50_v1b_26w_4s"].items()]
    assert _layout(res2net50_v1b_26w_4s()) == expected
    # the networks embed it unchanged under "resnet."
    m2s = dict(FACTS["M2SNet"])
    assert all(m2s[f"resnet.{k}"] == v for k, v in expected)


def test_m2snet_fixed_kernels_are_not_in_the_state_dict_but_their_bn_is():
    keys = set(FACTS["M2SNet"])
    assert "conv_3.norm.weight" in keys and "conv_5.norm.running_var" in keys
    assert "conv_3.weight" not in keys and "conv_5.weight" not in keys
    net = models.create("m2snet")
    assert net.conv_3.weight.shape == (64, 64, 3, 3) and bool((net.conv_5.weight == 1).all())
