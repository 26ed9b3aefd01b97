"""2-D images: tiling and blending, resize/native modes, channels (grey, RGB→BGR,
multi-label L-Seg), and clear errors for images a network cannot take."""
import numpy as np
import pytest
import torch

from conftest import randomize_norm_stats
from LesionSegLib import models
from LesionSegLib.inference import Predictor
from LesionSegLib.inference.tiling import MIN_WEIGHT, TileBlender, blend_window, tile_grid, tile_starts
from LesionSegLib.preprocessing import InputError
from helpers import shifted_threshold_unet


def test_tile_starts_cover_the_image_with_the_requested_overlap():
    for length, tile, overlap in [(4288, 1440, 0.25), (2848, 960, 0.25), (100, 64, 0.5), (64, 64, 0.25),
                                  (65, 64, 0.0), (1000, 96, 0.9)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
        covered = np.zeros(max(length, tile), int)
        for s in starts:
            covered[s:s + tile] += 1
        assert covered.min() >= 1
        gaps = np.diff(starts)
        assert np.all(gaps <= tile * (1 - overlap) + 1e-9) and np.all(gaps > 0)
    assert tile_starts(50, 64, 0.25) == [0]
    aligned = tile_starts(4288 + 16 - 4288 % 16, 1440, 0.25, align=16)
    assert all(s % 16 == 0 for s in aligned) and aligned[-1] + 1440 == 4304
    assert max(np.diff(aligned)) <= 1440 * 0.75
    with pytest.raises(ValueError, match="multiple of align"):
        tile_starts(100, 64, 0.25, align=16)
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 1.0)
    assert len(tile_grid((2848, 4288), (960, 1440), 0.25)) == 4 * 4


def test_blend_window_is_centred_smooth_and_positive():
    w = blend_window((64, 96))
    assert w.shape == (64, 96) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0) and w.min() >= MIN_WEIGHT ** 2 * 0.999
    assert np.allclose(w, w[::-1, ::-1])             # symmetric
    assert w[32, 48] > w[32, 70] > w[32, 90]          # falls towards the edges


def test_blending_leaves_no_seams():
    """Tiles whose predictions disagree completely (0 in one tile, 1 in the next, as at
    a tile border where context is missing): hard stitching jumps by 1 at the border,
    the blend changes by at most a fifth of that from one pixel to the next and stays a
    weighted mean (within [0, 1])."""
    shape, tile = (100, 180), (64, 64)
    positions = tile_grid(shape, tile, 0.25)
    ys, xs = tile_starts(shape[0], tile[0], 0.25), tile_starts(shape[1], tile[1], 0.25)
    assert len(ys) == 2 and len(xs) == 4
    blender = TileBlender(1, shape, tile)
    values = torch.stack([torch.full((1, *tile), float((ys.index(y) + xs.index(x)) % 2)) for y, x in positions])
    blender.add(positions, values)
    out = blender.result()[0].numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0
    steps = max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())
    assert steps < 0.2, steps
    # both extremes are still reached in the tile centres: the blend does not wash out
    assert out.min() < 0.02 and out.max() > 0.98


@pytest.fixture(scope="module")
def random_unet():
    torch.manual_seed(0)
    net = models.create("unet", preset="breast-us")
    randomize_norm_stats(net, seed=1)
    # fp32: tiles and whole images are compared to 1 % of the logit spread, finer than bf16
    return Predictor(net, preset="breast-us", device="cpu", batch_size=4, precision="fp32")


def test_tiled_and_whole_image_predictions_agree_in_the_interior(random_unet):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:200]
    image = (100 + 60 * np.sin(yy / 9.0) * np.cos(xx / 13.0) + rng.normal(0, 10, yy.shape)).clip(0, 255)
    image = image.astype(np.uint8)
    whole = random_unet.predict_image(image, mode="native", return_probabilities=True).probabilities[0]
    tiled = random_unet.predict_image(image, mode="tile", tile_size=(64, 64), tile_overlap=0.5,
                                      return_probabilities=True)
    assert tiled.labels.shape == image.shape and tiled.probabilities.shape == (1, *image.shape)
    # a random network's probabilities stay close to 0.5: compare its logits, relative to their spread
    def logit(p):
        return np.log(p.astype(np.float64) / (1 - p))
    inner = (slice(16, -16), slice(16, -16))
    a, b = logit(tiled.probabilities[0][inner]), logit(whole[inner])
    diff, spread = np.abs(a - b), b.std()
    assert spread > 1e-3, "the test network's output must vary, or agreement proves nothing"
    # tiles start on the network's pooling grid (multiples of 16), so away from the tile
    # borders a tile computes what the whole image computes
    assert diff.mean() < 0.01 * spread and np.percentile(diff, 99) < 0.05 * spread, (diff.mean(), spread)
    # tiles really were used: near tile borders the tiled result is not the whole-image one
    assert diff.max() > 1e-3 * spread


def test_resize_mode_returns_the_input_size_and_finds_the_blob():
    net = shifted_threshold_unet(preset="stroke-dwi", dy=0, dx=0, t=2.0)
    p = Predictor(net, preset="stroke-dwi", device="cpu")
    rng = np.random.default_rng(1)
    img = rng.normal(50, 5, (150, 210)).astype(np.float32)
    img[40:90, 100:170] = 300
    pred = p.predict_image(img, spacing=(0.5, 0.5))
    assert pred.labels.shape == img.shape and pred.labels.dtype == np.uint8
    want = np.zeros(img.shape, bool)
    want[40:90, 100:170] = True
    got = pred.labels == 1
    assert 2 * (got & want).sum() / (got.sum() + want.sum()) > 0.95
    (lesion,) = pred.lesions
    assert lesion["volume_mm3"] == pytest.approx(got.sum() * 0.25)   # mm² for an image with spacing
    # 50 × 70 px of 0.25 mm² ≈ 875 mm²: between the 20 mm and 40 mm circles of MSE-Net's levels
    assert 314.16 <= lesion["max_section_mm2"] < 1256.64 and lesion["size_level"] == "medium"
    assert p.predict_image(img).lesions[0]["size_level"] is None      # no spacing, no physical size


def test_lseg_multilabel_bgr_channels_and_overlaps():
    torch.manual_seed(0)
    p = Predictor(models.create("lseg"), device="cpu")
    seen = []
    p.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    img = np.zeros((48, 64, 3), np.uint8)
    img[..., 0] = 255      # pure red RGB image
    pred = p.predict_image(img, mode="native", return_probabilities=True, threshold=0.3)
    x = seen[0][0]
    # BGR order, Caffe mean subtracted: blue channel 0 − 16.309, red channel 255 − 116.5132
    assert torch.allclose(x[:, 10, 10], torch.tensor([0 - 16.309, 0 - 56.4373, 255 - 116.5132]), atol=1e-3)
    probs = pred.probabilities
    assert probs.shape == (4, 48, 64)
    above = probs > 0.3
    for v in range(1, 5):
        assert np.array_equal(pred.masks[v], above[v - 1])
    best = np.where(above, probs, -1).argmax(0) + 1
    assert np.array_equal(pred.labels, np.where(above.any(0), best, 0))
    # RGBA is accepted (alpha dropped), grey and two-channel images are refused clearly
    rgba = np.concatenate([img, np.full((48, 64, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(p.predict_image(rgba, mode="native", threshold=0.3).labels, pred.labels)
    with pytest.raises(InputError, match="cannot use a grey image"):
        p.predict_image(img[..., 0], mode="native")
    with pytest.raises(InputError, match="takes 3 channel"):
        p.predict_image(img[..., :2], mode="native")
    with pytest.raises(InputError, match="not shape"):
        p.predict_image(np.zeros((2, 8, 8, 3), np.uint8))


def test_lseg_tiles_agree_with_the_whole_image_on_all_four_classes():
    """Multi-channel tiling: an RGB fundus-like image through L-Seg's four sigmoid maps."""
    torch.manual_seed(0)
    p = Predictor(models.create("lseg"), device="cpu")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:150, 0:230]
    img = np.stack([100 + 60 * np.sin(yy / 9.0) * np.cos(xx / 13.0), 80 + 40 * np.cos(yy / 7.0),
                    50 + rng.normal(0, 20, yy.shape)], -1).clip(0, 255).astype(np.uint8)
    whole = p.predict_image(img, mode="native", return_probabilities=True).probabilities
    tiled = p.predict_image(img, mode="tile", tile_size=(64, 96), tile_overlap=0.5, return_probabilities=True)
    assert tiled.probabilities.shape == (4, 150, 230) and tiled.labels.shape == (150, 230)
    inner = (slice(None), slice(24, -24), slice(24, -24))
    a = np.log(tiled.probabilities[inner] / (1 - tiled.probabilities[inner]))
    b = np.log(whole[inner] / (1 - whole[inner]))
    spread = b.std(axis=(1, 2)).min()
    assert spread > 1e-2
    assert np.abs(a - b).mean() < 0.01 * spread and np.abs(a - b).max() < 0.05 * spread


def test_grey_network_refuses_rgb_and_unknown_modes():
    grey = Predictor(shifted_threshold_unet(dy=0, dx=0), device="cpu")
    with pytest.raises(InputError, match="convert it to grey"):
        grey.predict_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown mode"):
        grey.predict_image(np.zeros((32, 32), np.uint8), mode="crop")
