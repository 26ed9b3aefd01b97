"""3D training data on real NIfTI/NRRD/MHA files: pairing layouts, canonical (LPS)
orientation, label grids, 2.5D slice stacks, lesion-slice oversampling, the batch dict of
the losses contract, and the epoch sampler (sharding, resuming)."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LesionSegLib import models
from LesionSegLib.data import DataError, load_case, volume_pairs
from LesionSegLib.data.dataset import EpochBatchSampler, SegmentationDataset, collate
from LesionSegLib.data.sources import FolderSource, VolumeSource, target_spec
from LesionSegLib.data.folders import ImagePair

from conftest import SHARED_DATA

ISLES = SHARED_DATA / "isles22-strokecase0009"


def volume(shape_zyx=(6, 20, 24), spacing=(1.0, 1.0, 2.0), direction=None, seed=0, lesion_slices=(2, 3)):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, shape_zyx).astype(np.float32)
    lab = np.zeros(shape_zyx, np.uint8)
    for z in lesion_slices:
        lab[z, 5:10, 6:12] = 1
        img[z, 5:10, 6:12] += 80
    im, lb = sitk.GetImageFromArray(img), sitk.GetImageFromArray(lab)
    for x in (im, lb):
        x.SetSpacing(spacing)
        if direction is not None:
            x.SetDirection(direction)
    return im, lb


def test_volume_pair_layouts(tmp_path):
    im, lb = volume()
    # nnU-Net / MSD
    (tmp_path / "nn" / "imagesTr").mkdir(parents=True)
    (tmp_path / "nn" / "labelsTr").mkdir()
    for c in ("a", "b"):
        sitk.WriteImage(im, str(tmp_path / "nn" / "imagesTr" / f"{c}_0000.nii.gz"))
        sitk.WriteImage(im, str(tmp_path / "nn" / "imagesTr" / f"{c}_0001.nii.gz"))  # 2nd modality: ignored
        sitk.WriteImage(lb, str(tmp_path / "nn" / "labelsTr" / f"{c}.nii.gz"))
    pairs = volume_pairs(tmp_path / "nn")
    assert [(p.image.name, p.label.name) for p in pairs] == [("a_0000.nii.gz", "a.nii.gz"), ("b_0000.nii.gz", "b.nii.gz")]
    # BIDS-like flat folder with several modalities: modality chooses
    flat = tmp_path / "flat" / "sub-1"
    flat.mkdir(parents=True)
    for mod, ext in (("dwi", ".nii.gz"), ("adc", ".mha")):
        sitk.WriteImage(im, str(flat / f"sub-1_ses-1_{mod}{ext}"))
    sitk.WriteImage(lb, str(flat / "sub-1_ses-1_msk.nrrd"))
    with pytest.raises(DataError, match="modality"):
        volume_pairs(tmp_path / "flat")
    (p,) = volume_pairs(tmp_path / "flat", modality="adc")
    assert p.image.name == "sub-1_ses-1_adc.mha" and p.label.name == "sub-1_ses-1_msk.nrrd"
    assert p.case == "sub-1_ses-1"
    with pytest.raises(DataError, match="no label volumes"):
        volume_pairs(tmp_path / "nn" / "imagesTr")


def test_orientation_is_canonicalised_to_lps(tmp_path):
    # the same anatomy stored RAS-flipped (x and y reversed): after loading, the lesion is
    # where it is in the LPS-stored copy
    im, lb = volume()
    sitk.WriteImage(im, str(tmp_path / "lps_img.nii.gz"))
    sitk.WriteImage(lb, str(tmp_path / "lps_msk.nii.gz"))
    flip = sitk.Flip(im, [True, True, False])
    flip_l = sitk.Flip(lb, [True, True, False])
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(flip.GetDirection()) == "RAS"
    sitk.WriteImage(flip, str(tmp_path / "ras_img.nii.gz"))
    sitk.WriteImage(flip_l, str(tmp_path / "ras_msk.nii.gz"))
    a = load_case(tmp_path / "lps_img.nii.gz", tmp_path / "lps_msk.nii.gz")
    b = load_case(tmp_path / "ras_img.nii.gz", tmp_path / "ras_msk.nii.gz")
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ras_msk.nii.gz")))
    assert not np.array_equal(raw, sitk.GetArrayFromImage(lb))  # stored differently …
    np.testing.assert_array_equal(a.label, b.label)              # … the same once canonical
    np.testing.assert_allclose(a.image, b.image)
    assert list(b.lesion_slices) == [2, 3]


def test_label_on_another_grid_is_resampled_and_size_mismatch_recorded(tmp_path):
    im, lb = volume(shape_zyx=(6, 20, 24))
    coarse = sitk.Resample(lb, [12, 10, 6], sitk.Transform(), sitk.sitkNearestNeighbor, lb.GetOrigin(),
                           (2.0, 2.0, 2.0), lb.GetDirection(), 0, lb.GetPixelID())
    sitk.WriteImage(im, str(tmp_path / "c_img.nii.gz"))
    sitk.WriteImage(coarse, str(tmp_path / "c_msk.nii.gz"))
    case = load_case(tmp_path / "c_img.nii.gz", tmp_path / "c_msk.nii.gz")
    assert case.label.shape == case.image.shape and case.label.sum() > 0
    assert any("resampled" in n for n in case.notes)


def test_unreadable_volume_is_named(tmp_path):
    (tmp_path / "junk_img.nii.gz").write_bytes(b"not a nifti")
    im, lb = volume()
    sitk.WriteImage(lb, str(tmp_path / "junk_msk.nii.gz"))
    with pytest.raises(DataError, match="junk_img.nii.gz"):
        load_case(tmp_path / "junk_img.nii.gz", tmp_path / "junk_msk.nii.gz")


def _volume_source(context=0, lesion_fraction=0.5, model="msenet", preset=None):
    im, lb = volume(shape_zyx=(10, 20, 24), lesion_slices=(4,))
    case = load_case(im, lb, "c0")
    pre = models.preset(model, preset)
    spec_in = dict(pre["input"])
    if context:
        spec_in["channels"] = 2 * context + 1
    return VolumeSource([case], spec_in, target_spec(model, pre), context, lesion_fraction), case


def test_25d_stacks_neighbouring_slices_centred_on_the_target():
    src, case = _volume_source(context=1)
    x, lab, _, _ = src.load(4)
    assert x.shape == (3, 20, 24)
    t = src.transforms[0]
    for k, z in enumerate((3, 4, 5)):
        np.testing.assert_allclose(x[k], t.apply(case.image[z][None].astype(np.float32), 0)[0], rtol=1e-6)
    np.testing.assert_array_equal(lab, case.label[4])
    x0, _, _, _ = src.load(0)  # first slice: the edge slice is repeated
    np.testing.assert_allclose(x0[0], x0[1])


def test_lesion_slices_are_oversampled_to_the_requested_fraction():
    src, _ = _volume_source(lesion_fraction=0.5)
    assert src.lesion.sum() == 1 and len(src) == 10
    s = EpochBatchSampler(len(src), 10, 0, sizes=[(32, 32)], weights=src.weights, epoch_length=2000)
    s.set_epoch(0)
    drawn = [k[0] for b in s for k in b]
    assert 0.45 < np.mean(src.lesion[drawn]) < 0.55
    plain = EpochBatchSampler(len(src), 10, 0, sizes=[(32, 32)])
    plain.set_epoch(0)
    assert sorted(k[0] for b in plain for k in b) == list(range(10))  # a permutation without weights


def test_batch_dict_follows_the_losses_contract(tmp_path):
    m = np.zeros((40, 40), np.uint8)
    m[5:15, 5:15], m[20:35, 20:35] = 1, 2
    img = (60 + 50 * m).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([img] * 3, -1), isVector=True), str(tmp_path / "i.png"))
    sitk.WriteImage(sitk.GetImageFromArray(m), str(tmp_path / "m.png"))
    pair = ImagePair(tmp_path / "i.png", tmp_path / "m.png", None, "c", "i")
    cases = {"binary (M2SNet)": ("m2snet", {}, 1, False), "softmax (U-Net, 3 classes)": ("unet", {"num_classes": 3}, 3, False),
             "multi-label (L-Seg)": ("lseg", {}, 4, False), "edge (BSNet)": ("bsnet", {}, 1, True)}
    for what, (model, cfg, k, edge) in cases.items():
        pre = models.preset(model)
        spec_in = dict(pre["input"], channels=3, grey_to_rgb="replicate") if model == "unet" else pre["input"]
        spec = target_spec(model, pre, cfg)
        src = FolderSource([pair], spec_in, spec)
        src.check()
        ds = SegmentationDataset(src, spec, (32, 32), {"hflip": 0.5, "rotate": 10})
        b = collate([ds[(0, 1, (32, 32))], ds[(0, 2, (32, 32))]])
        assert b["image"].shape == (2, 3, 32, 32) and b["image"].dtype == torch.float32, what
        assert b["mask"].shape == (2, k, 32, 32) and 0 <= b["mask"].min() and b["mask"].max() <= 1, what
        assert b["label"].shape == (2, 32, 32) and b["label"].dtype == torch.int64, what
        assert ("edge" in b) == edge, what
        if edge:
            assert b["edge"].shape == (2, 1, 32, 32) and b["edge"].max() > 0.3
        if model == "unet":  # one-hot with background: channels sum to 1
            torch.testing.assert_close(b["mask"].sum(1), torch.ones(2, 32, 32))
            assert set(b["label"].unique().tolist()) == {0, 1, 2}
        if model == "m2snet":  # a binary net: both lesion classes are "lesion"
            assert torch.equal(b["label"], (b["mask"][:, 0] >= 0.5).long())


def test_augmentation_is_a_pure_function_of_its_seed(tmp_path):
    src, _ = _volume_source()
    ds = SegmentationDataset(src, src.spec, (16, 16), {"hflip": 0.5, "vflip": 0.5, "rotate": 30})
    a, b = ds[(4, 11, (16, 16))], ds[(4, 11, (16, 16))]
    assert all(torch.equal(a[k], b[k]) for k in a)
    others = [ds[(4, s, (16, 16))]["image"] for s in range(12, 20)]
    assert any(not torch.equal(a["image"], o) for o in others)
    plain = ds[4]
    assert plain["image"].shape == (1, 16, 16)


def test_rotation_keeps_image_and_mask_aligned():
    im, lb = volume(shape_zyx=(1, 64, 64), lesion_slices=(0,))
    src = VolumeSource([load_case(im, lb)], models.preset("msenet")["input"], target_spec("msenet", models.preset("msenet")), 0, None)
    ds = SegmentationDataset(src, src.spec, (64, 64), {"rotate": 40})
    for seed in range(5):
        s = ds[(0, seed, (64, 64))]
        inside = s["image"][0][s["label"] == 1].mean()
        outside = s["image"][0][(s["label"] == 0) & (s["image"][0] > 0.05)].mean()
        assert inside > outside + 0.2  # the bright lesion moved with its mask


def test_sampler_shards_are_disjoint_equal_and_resumable():
    keys = {}
    for r in range(2):
        s = EpochBatchSampler(11, 2, 5, sizes=[(32, 32), (64, 64)], rank=r, world_size=2)
        s.set_epoch(3)
        keys[r] = list(s)
        assert len(keys[r]) == len(s) == 3
    idx = [[k[0] for b in keys[r] for k in b] for r in range(2)]
    assert len(idx[0]) == len(idx[1]) == 6
    assert set(idx[0]) | set(idx[1]) == set(range(11))
    for r in range(2):  # one size per batch, the same on both ranks (DDP steps stay in lockstep)
        assert all(len({k[2] for k in b}) == 1 for b in keys[r])
    assert [b[0][2] for b in keys[0]] == [b[0][2] for b in keys[1]]
    s = EpochBatchSampler(11, 2, 5, sizes=[(32, 32)])
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start=2)
    assert list(s) == full[2:] and len(s) == len(full) - 2
    s.set_epoch(2)
    assert list(s) != full  # a new order every epoch
    cyc = EpochBatchSampler(4, 2, 0, sizes=[(32, 32), (64, 64)], size_mode="cycle")
    cyc.set_epoch(0)
    batches = list(cyc)
    assert len(batches) == 4 and [b[0][2] for b in batches] == [(32, 32), (64, 64)] * 2
    assert [k[0] for k in batches[0]] == [k[0] for k in batches[1]]  # the same batch at each size


@pytest.mark.skipif(not ISLES.is_dir(), reason="shared ISLES'22 case not present")
def test_real_isles_dwi_case():
    (pair,) = volume_pairs(ISLES, modality="dwi")
    case = load_case(pair.image, pair.label)
    assert case.image.shape == (73, 112, 112) and case.spacing == (2.0, 2.0, 2.0)
    assert int(case.label.sum()) == 523 and len(case.lesion_slices) > 5
    # msenet's card resamples in-plane to its pixel spacing before cropping to 192
    spacing = models.preset("msenet", "isles-dwi")["input"]["pixel_spacing_mm"]
    fine = load_case(pair.image, pair.label, pixel_spacing=spacing)
    assert fine.image.shape[0] == 73 and abs(fine.image.shape[1] - 112 * 2 / spacing[1]) <= 1
    assert any("resampled in-plane" in n for n in fine.notes)
