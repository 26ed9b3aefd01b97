"""Intensity and channel preparation from model cards, against hand-computed values."""
import numpy as np
import pytest
import torch

from LesionSegLib import models
from LesionSegLib.preprocessing import InputError, arrange_channels, plan_intensity, prepare, size_for


def test_imagenet_mean_std_on_an_8bit_rgb_image_matches_torchvision_style_formula():
    spec = models.preset("m2snet", "polyp")["input"]
    img = np.array([[[0, 128, 255], [10, 20, 30]]], dtype=np.uint8)  # 1×2 RGB
    got = prepare(img, spec)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = ((img.astype(np.float64) / 255 - mean) / std).transpose(2, 0, 1)
    assert got.shape == (3, 1, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ct_window_maps_hounsfield_units_like_an_8bit_lung_window_rendering():
    spec = models.preset("bsnet", "covid-ct")["input"]           # window C -600 / W 1500
    hu = np.array([[-1350.0, -600.0, 150.0, 3000.0]], dtype=np.float32)
    got = prepare(hu, spec)                                      # grey → replicated RGB
    assert got.shape == (3, 1, 4)
    as8bit = np.array([[0.0, 127.5, 255.0, 255.0]])              # window then clip
    np.testing.assert_allclose(got[0], (as8bit / 255 - 0.485) / 0.229, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], (as8bit / 255 - 0.406) / 0.225, rtol=1e-5, atol=1e-5)


def test_caffe_bgr_mean_reverses_channels_and_subtracts_the_mean():
    spec = models.preset("lseg")["input"]
    img = np.zeros((1, 1, 3), np.uint8)
    img[0, 0] = (200, 100, 50)                                  # R, G, B
    got = prepare(img, spec)[:, 0, 0]
    np.testing.assert_allclose(got, [50 - 16.3090, 100 - 56.4373, 200 - 116.5132], rtol=1e-5)


def test_percentile_minmax_and_zscore():
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    t = plan_intensity(vol, {"normalization": {"kind": "minmax", "percentiles": [0, 100]}})
    out = t.apply(vol[None], channel_axis=0)
    assert out.min() == pytest.approx(0) and out.max() == pytest.approx(1)
    assert out[0, 5, 0, 0] == pytest.approx(500 / 999, rel=1e-5)
    vol[:2] = 0                                                  # background is ignored by zscore
    t = plan_intensity(vol, {"normalization": {"kind": "zscore"}})
    brain = vol[vol != 0]
    out = t.apply(vol[None], channel_axis=0)[0]
    assert out[vol != 0].mean() == pytest.approx(0, abs=1e-4) and out[vol != 0].std() == pytest.approx(1, rel=1e-4)
    assert out[5, 5, 5] == pytest.approx((vol[5, 5, 5] - brain.mean()) / brain.std(), rel=1e-4)


def test_numpy_and_torch_paths_agree():
    spec = models.preset("m2snet", "covid-ct")["input"]
    hu = np.random.default_rng(0).normal(-500, 400, (2, 1, 16, 16)).astype(np.float32)
    t = plan_intensity(hu, spec)
    a = t.apply(np.repeat(hu, 3, axis=1))
    b = t.apply(torch.from_numpy(np.repeat(hu, 3, axis=1))).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_channel_errors_name_the_problem():
    with pytest.raises(InputError, match="takes grey images, this image is RGB"):
        arrange_channels(np.zeros((8, 8, 3)), models.preset("unet", "covid-ct")["input"])
    with pytest.raises(InputError, match="takes 3 channels and cannot use a grey image"):
        arrange_channels(np.zeros((8, 8)), {"channels": 3})
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert arrange_channels(rgba, models.preset("m2snet")["input"]).shape == (3, 8, 8)


def test_size_for_card_and_native():
    spec = models.preset("bsnet")["input"]
    assert size_for((512, 400), spec) == (352, 352)
    assert size_for((100, 330), spec, native=True) == (160, 352)
