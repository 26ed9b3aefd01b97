"""Orientation and geometry of volume inference, proven by content.

The network is a real registered U-Net whose weights are set by hand so that its output
is a known function of its input: ``logit(y, x) = g · (relu(v(y + dy, x + dx)) − t)`` with
``v`` the normalised intensity. With a shift (dy, dx) ≠ 0 the function is not symmetric
under flips or transposes of the slice, so a lesion found one voxel up-left of a bright
blob *in the canonical LPS view* proves that the predictor showed the network axial
slices the right way round, and finding it on the right voxels of the input grid proves
the way back — for every permutation and flip of the axes, with oblique directions,
anisotropic spacing and a non-zero origin.
"""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LesionSegLib import models
from LesionSegLib.inference import Predictor
from LesionSegLib.inference.geometry import Canonical, axis_mapping, obliquity_degrees, orientation_code
from LesionSegLib.preprocessing import InputError

from helpers import rotation, shifted_threshold_unet

SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-112.5, 37.25, 80.0)


def canonical_case():
    """CT-like canonical (LPS) volume with three bright blobs of different shapes, and
    the label the shifted network must produce: each blob moved by (−1, −1) in (y, x)."""
    vol = np.full((6, 40, 48), -1000, np.int16)
    vol[:, 5:35, 4:44] = -850                      # lung-like background
    blob = np.zeros(vol.shape, bool)
    blob[1:4, 8:14, 30:33] = True                  # tall, thin: flips of y/x give other voxels
    blob[2, 20:22, 6:16] = True                    # flat, wide
    blob[4, 28:31, 36:38] = True
    vol[blob] = 200
    expected = np.zeros(vol.shape, np.uint8)
    expected[:, :-1, :-1] = blob[:, 1:, 1:]        # out(y, x) = in(y + 1, x + 1)
    return vol, expected


def as_image(array, reference=None):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


def variant(img, perm, flips, tilt):
    """The same physical content stored with permuted / reversed axes (SimpleITK keeps
    the physical position of every voxel), then tilted by ``tilt`` (oblique)."""
    out = sitk.Flip(sitk.PermuteAxes(img, perm), flips)
    d = np.array(out.GetDirection()).reshape(3, 3)
    out.SetDirection(tuple((tilt @ d).ravel()))
    out.SetOrigin(tuple(np.array(out.GetOrigin()) + [3.5, -7.25, 11.0]))
    return out


ALL = list(itertools.product(itertools.permutations(range(3)), itertools.product([False, True], repeat=3)))


def test_canonical_view_matches_dicomorient_for_every_permutation_flip_and_obliquity():
    vol, _ = canonical_case()
    base = as_image(vol)
    rng = np.random.default_rng(3)
    for perm, flips in ALL:
        tilt = rotation(rng.normal(size=3), rng.uniform(5, 35))
        img = variant(base, perm, flips, tilt)
        c = Canonical.of(img.GetSize(), img.GetSpacing(), img.GetDirection())
        view = c.view(sitk.GetArrayViewFromImage(img))
        assert np.array_equal(view, vol), (perm, flips)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")), vol)
        assert np.allclose(c.canonical_spacing, SPACING)
        assert not np.shares_memory(view, vol) and view.base is not None  # a view of the input, not a copy


def test_orientation_codes_and_obliquity():
    assert orientation_code((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == "RAS"
    assert orientation_code((1, 0, 0, 0, 1, 0, 0, 0, 1)) == "LPS"
    # a coronal acquisition: x → L, y → I (head to feet), z → A
    assert orientation_code((1, 0, 0, 0, 0, -1, 0, -1, 0)) == "LIA"
    assert axis_mapping((1, 0, 0, 0, 0, -1, 0, -1, 0)) == ((0, 2, 1), (False, True, True))
    tilt = rotation((1, 0, 0), 20)
    assert obliquity_degrees(tuple(tilt.ravel())) == pytest.approx(20, abs=1e-6)
    with pytest.raises(ValueError, match="singular"):
        axis_mapping((1, 0, 0, 1, 0, 0, 0, 0, 1))


@pytest.fixture(scope="module")
def shifted_predictor():
    return Predictor(shifted_threshold_unet(), device="cpu", batch_size=4)


def test_lesion_lands_on_the_blob_shifted_in_lps_for_any_orientation(shifted_predictor):
    vol, expected = canonical_case()
    base, expected_img = as_image(vol), as_image(expected)
    rng = np.random.default_rng(7)
    cases = ALL[::3] + [ALL[-1]]  # 17 of the 48 axis arrangements, each tilted
    for perm, flips in cases:
        tilt = rotation(rng.normal(size=3), rng.uniform(3, 30))
        img = variant(base, perm, flips, tilt)
        want = sitk.GetArrayFromImage(variant(expected_img, perm, flips, tilt))
        pred = shifted_predictor.predict_volume(img, mode="native")
        lab = pred.labels
        assert lab.GetSize() == img.GetSize() and lab.GetSpacing() == img.GetSpacing()
        assert lab.GetOrigin() == img.GetOrigin() and lab.GetDirection() == img.GetDirection()
        assert lab.GetPixelID() == sitk.sitkUInt8
        got = sitk.GetArrayFromImage(lab)
        assert np.array_equal(got, want), (perm, flips, int((got != want).sum()))
        assert np.array_equal(pred.masks[1], want.astype(bool))


def test_shift_would_be_caught(shifted_predictor):
    """The check above can fail: the same content with a flip the predictor is not told
    about (direction left unchanged) gives the lesion on other voxels."""
    vol, expected = canonical_case()
    lying = as_image(np.ascontiguousarray(vol[:, :, ::-1]))       # x reversed, direction still identity
    got = sitk.GetArrayFromImage(shifted_predictor.predict_volume(lying, mode="native").labels)
    assert not np.array_equal(got, np.ascontiguousarray(expected[:, :, ::-1]))


def test_resize_mode_on_oblique_anisotropic_volume_finds_the_blob():
    """The default path (slices resized to the card's 112² and back, on the device)
    with a pointwise network: the predicted lesion covers the blob (Dice > 0.9)."""
    net = shifted_threshold_unet(preset="stroke-dwi", dy=0, dx=0, t=2.0)
    p = Predictor(net, preset="stroke-dwi", device="cpu")
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 10, (5, 60, 76)).astype(np.float32)
    blob = np.zeros(vol.shape, bool)
    blob[1:4, 20:34, 40:58] = True
    vol[blob] = 400
    img = variant(as_image(vol), (2, 0, 1), (True, False, True), rotation((1, 2, 0.5), 25))
    want = sitk.GetArrayFromImage(variant(as_image(blob.astype(np.uint8)), (2, 0, 1), (True, False, True),
                                          rotation((1, 2, 0.5), 25))).astype(bool)
    pred = p.predict_volume(img, return_probabilities=True)
    got = sitk.GetArrayFromImage(pred.labels).astype(bool)
    dice = 2 * (got & want).sum() / (got.sum() + want.sum())
    assert dice > 0.9, dice
    assert pred.probabilities.shape == (1,) + got.shape and pred.probabilities.dtype == np.float32
    assert pred.info["network_input"] == [112, 112] and pred.info["slice_axis"] != 0
    assert len(pred.lesions) == 1 and pred.lesions[0]["voxels"] == got.sum()


def test_array_input_with_geometry_and_errors(shifted_predictor):
    vol, expected = canonical_case()
    d = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # RAS: x and y reversed relative to LPS
    ras = np.ascontiguousarray(vol[:, ::-1, ::-1])
    pred = shifted_predictor.predict_volume(ras, spacing=SPACING, origin=ORIGIN, direction=d, mode="native")
    assert pred.labels.GetDirection() == d and pred.labels.GetOrigin() == ORIGIN
    assert np.array_equal(sitk.GetArrayFromImage(pred.labels), expected[:, ::-1, ::-1])
    with pytest.raises(InputError, match="2-D image"):
        shifted_predictor.predict_volume(sitk.Image(8, 8, sitk.sitkUInt8))
    with pytest.raises(InputError, match="single coronal or sagittal"):
        shifted_predictor.predict_volume(np.zeros((5, 1, 30), np.int16))


def test_two_and_a_half_d_stacks_neighbours_with_edges_repeated():
    """MSE-Net with in_channels = 3 (k = 1): the network sees slices z−1, z, z+1 as
    channels, the first and last slice repeated at the ends (card slice_context)."""
    net = models.create("msenet", in_channels=3)
    p = Predictor(net, device="cpu", batch_size=2)
    assert p.slice_context == 1
    seen = []
    p.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    vol = np.stack([np.full((16, 24), 10.0 * z, np.float32) for z in range(5)])
    vol[:, 0, 0] = 1000  # make the percentile range independent of z
    p.predict_volume(vol, mode="native")
    x = torch.cat(seen)  # (5, 3, 16, 24) in slice order
    centre = x[:, :, 8, 12]
    order = torch.argsort(centre[:, 1])
    centre = centre[order]
    # channel 0 is the slice before, channel 2 the slice after; edges repeat
    assert torch.equal(centre[:, 0], centre[[0, 0, 1, 2, 3], 1])
    assert torch.equal(centre[:, 2], centre[[1, 2, 3, 4, 4], 1])
    with pytest.raises(InputError, match="2.5D"):
        p.predict_image(np.zeros((16, 16), np.float32))
