"""LesionSegLib.metrics against hand-computed values and an independent brute-force
surface-distance computation."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LesionSegLib import metrics as M


def _img(arr, spacing, origin=None):
    img = sitk.GetImageFromArray(np.asarray(arr, np.uint8))
    img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    return img


# ------------------------------------------------------------------------ dice_iou
def test_dice_iou_numpy_and_torch_per_sample_and_channel():
    pred = np.zeros((2, 2, 4, 4), bool)
    gt = np.zeros((2, 2, 4, 4), bool)
    pred[0, 0, :2, :2] = True          # 4 voxels
    gt[0, 0, :2, :3] = True            # 6 voxels, 4 shared → dice 8/10, iou 4/6
    pred[0, 1, 0, 0] = True            # disjoint → 0, 0
    gt[0, 1, 3, 3] = True
    # sample 1, channel 0: both empty → 1, 1 ; channel 1: identical → 1, 1
    pred[1, 1, 1:3, 1:3] = gt[1, 1, 1:3, 1:3] = True
    expected_dice = np.array([[0.8, 0.0], [1.0, 1.0]])
    expected_iou = np.array([[4 / 6, 0.0], [1.0, 1.0]])
    d, i = M.dice_iou(pred, gt)
    assert d.shape == (2, 2)
    np.testing.assert_allclose(d, expected_dice)
    np.testing.assert_allclose(i, expected_iou)
    td, ti = M.dice_iou(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8))
    assert isinstance(td, torch.Tensor)
    np.testing.assert_allclose(td.numpy(), expected_dice)
    np.testing.assert_allclose(ti.numpy(), expected_iou)
    # a 3-D reduction over (D, H, W) of (B, D, H, W): sample 0 has 5 + 7 voxels, 4 shared
    d3, _ = M.dice_iou(pred, gt, spatial_dims=3)
    np.testing.assert_allclose(d3, [8 / 12, 1.0])
    # the value for two empty masks is configurable
    d0, i0 = M.dice_iou(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 3), bool), empty=float("nan"))
    assert np.isnan(d0).all() and np.isnan(i0).all()


def test_dice_iou_refuses_probabilities_and_shape_mismatch():
    with pytest.raises(M.MetricsError, match="threshold first"):
        M.dice_iou(torch.rand(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(M.MetricsError, match="shape"):
        M.dice_iou(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))


# ------------------------------------------------------------------ overlap counts
def test_overlap_metrics_hand_computed():
    gt = np.zeros((8, 10), np.uint8)
    pred = np.zeros((8, 10), np.uint8)
    gt[2:5, 2:5] = 1        # 9 voxels
    pred[2:5, 3:7] = 1      # 12 voxels, 6 shared
    r = M.evaluate_case(pred, gt, spacing=(0.5, 2.0))["classes"][1]
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (6, 6, 3, 65)
    assert r["dice"] == pytest.approx(12 / 21)
    assert r["iou"] == pytest.approx(6 / 15)
    assert r["sensitivity"] == pytest.approx(6 / 9)
    assert r["specificity"] == pytest.approx(65 / 71)
    assert r["precision"] == pytest.approx(6 / 12)
    assert r["reference_volume_mm3"] == pytest.approx(9 * 1.0)
    assert r["predicted_volume_mm3"] == pytest.approx(12 * 1.0)
    # surface distances by hand, spacing x 0.5 mm, y 2 mm: the prediction's right column
    # lies 2 columns (1 mm) beyond the reference's, its second-last 0.5 mm; top/bottom rows
    # coincide where they overlap. P→G: 0,0,.5,1 | .5,1 | 0,0,.5,1 ; G→P: .5,0,0 | .5,.5 | .5,0,0
    assert r["hd95"] == pytest.approx(1.0)
    assert r["assd"] == pytest.approx((4.5 + 2.0) / 18, rel=1e-6)
    assert r["hausdorff"] == pytest.approx(1.0)


def test_multiclass_label_map_and_multilabel_dict():
    gt = np.zeros((6, 6), np.uint8)
    gt[:3, :3] = 1
    gt[3:, 3:] = 2
    pred = gt.copy()
    pred[3:, 3:] = 0                    # class 2 missed entirely
    r = M.evaluate_case(pred, gt)["classes"]
    assert sorted(r) == [1, 2]
    assert r[1]["dice"] == 1.0 and r[1]["hd95"] == 0.0
    assert r[2]["dice"] == 0.0 and r[2]["sensitivity"] == 0.0 and math.isnan(r[2]["precision"])
    assert math.isnan(r[2]["hd95"]) and r[2]["lesion_f1"] == 0.0
    # overlapping classes (L-Seg style): a dict of masks, one voxel in both classes
    pm = {1: np.zeros((4, 4), bool), 2: np.zeros((4, 4), bool)}
    gm = {1: np.zeros((4, 4), bool), 2: np.zeros((4, 4), bool)}
    pm[1][0, :2] = gm[1][0, :2] = True
    pm[2][0, 1:3] = True
    gm[2][0, 1:4] = True
    r = M.evaluate_case(pm, gm)["classes"]
    assert r[1]["dice"] == 1.0
    assert r[2]["dice"] == pytest.approx(4 / 5)


def test_empty_cases_follow_the_documented_rules():
    z = np.zeros((5, 5), np.uint8)
    r = M.evaluate_case(z, z, classes=[1])["classes"][1]
    assert r["dice"] == 1.0 and r["iou"] == 1.0
    assert r["hd95"] == 0.0 and r["assd"] == 0.0 and r["hausdorff"] == 0.0
    assert r["lesion_f1"] == 1.0 and r["specificity"] == 1.0
    for k in ("sensitivity", "precision", "lesion_recall", "lesion_precision", "aupr"):
        assert math.isnan(r[k]), k
    assert M.absent_class_metrics(25) == pytest.approx(r, nan_ok=True)
    one = z.copy()
    one[2, 2] = 1
    fp = M.evaluate_case(one, z, classes=[1])["classes"][1]     # false alarm on an empty case
    assert fp["dice"] == 0.0 and fp["iou"] == 0.0 and fp["lesion_f1"] == 0.0 and fp["lesion_fp"] == 1
    assert math.isnan(fp["hd95"]) and math.isnan(fp["assd"]) and math.isnan(fp["sensitivity"])
    assert fp["precision"] == 0.0
    fn = M.evaluate_case(z, one, classes=[1])["classes"][1]     # missed lesion
    assert fn["dice"] == 0.0 and fn["sensitivity"] == 0.0 and math.isnan(fn["precision"])
    assert fn["lesion_fn"] == 1 and fn["lesion_recall"] == 0.0


# -------------------------------------------------------------- surface distances
def test_single_voxels_anisotropic_3d_distance():
    gt = np.zeros((5, 5, 5), np.uint8)
    pred = np.zeros((5, 5, 5), np.uint8)
    gt[1, 2, 2] = 1
    pred[3, 3, 2] = 1      # dz = 2 (3 mm each), dy = 1 (1.5 mm), dx = 0
    spacing = (0.5, 1.5, 3.0)
    r = M.evaluate_case(_img(pred, spacing), _img(gt, spacing))["classes"][1]
    d = math.hypot(6.0, 1.5)
    assert r["hd95"] == pytest.approx(d, rel=1e-6)
    assert r["assd"] == pytest.approx(d, rel=1e-6)
    assert r["hausdorff"] == pytest.approx(d, rel=1e-6)


def test_hd95_ignores_a_single_outlier_voxel_that_hausdorff_sees():
    gt = np.zeros((3, 60), np.uint8)
    gt[1, 5:45] = 1                    # a 1-voxel-thick line: 40 surface voxels
    pred = gt.copy()
    pred[1, 55] = 1                    # one outlier 11 voxels (× 0.7 mm = 7.7 mm) from the line's end
    r = M.evaluate_case(pred, gt, spacing=(0.7, 1.0))["classes"][1]
    # P→G: 40 zeros and 7.7 mm → 95th percentile at rank 0.95·40 = 38 → 0; G→P: all 0
    assert r["hd95"] == pytest.approx(0.0, abs=1e-5)
    assert r["hausdorff"] == pytest.approx(7.7, rel=1e-6)
    assert r["assd"] == pytest.approx(7.7 / 81, rel=1e-5)
    assert r["lesion_fp"] == 1 and r["lesion_tp"] == 1


def _brute_force_hausdorff(a, b, spacing_zyx):
    """ITK's definition: over all voxels of each mask, the distance to the nearest voxel
    of the other."""
    pa, pb = np.argwhere(a) * np.asarray(spacing_zyx), np.argwhere(b) * np.asarray(spacing_zyx)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(d.min(1).max(), d.min(0).max())


def _brute_force_surface_distances(a, b, spacing_zyx):
    """Independent implementation: face-connected surfaces (with a background border) and
    all pairwise distances."""
    def surface(m):
        p = np.pad(m, 1)
        inner = p.copy()
        for axis in range(m.ndim):
            for shift in (1, -1):
                inner &= np.roll(p, shift, axis=axis)
        s = p & ~inner
        return np.argwhere(s[tuple(slice(1, -1) for _ in range(m.ndim))]) * np.asarray(spacing_zyx)
    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_assd_match_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 14, 12)
    spacing_xyz = (0.7, 1.1, 2.5)
    gt = rng.random(shape) > 0.8
    gt[2:5, 3:9, 2:8] = True           # a solid blob touching nothing, plus specks
    pred = np.roll(gt, 1, axis=2) & (rng.random(shape) > 0.1)
    pred[0, :, 0] = True               # touches the image border: needs the padding
    d_pg, d_gp = _brute_force_surface_distances(pred, gt, spacing_xyz[::-1])
    r = M.evaluate_case(pred.astype(np.uint8), gt.astype(np.uint8), spacing=spacing_xyz)["classes"][1]
    assert r["hd95"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), rel=1e-5)
    assert r["assd"] == pytest.approx((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size), rel=1e-5)
    assert r["hausdorff"] == pytest.approx(_brute_force_hausdorff(pred, gt, spacing_xyz[::-1]), rel=1e-5)


def test_geometry_mismatch_names_both_geometries():
    a = _img(np.ones((4, 4)), (1.0, 1.0))
    b = _img(np.ones((4, 4)), (1.0, 2.0))
    with pytest.raises(M.GeometryError) as e:
        M.evaluate_case(a, b, pred_name="PRED a.nii", gt_name="GT b.nii")
    msg = str(e.value)
    assert "spacing" in msg and "PRED a.nii" in msg and "GT b.nii" in msg
    assert "spacing (1, 1)" in msg and "spacing (1, 2)" in msg
    c = _img(np.ones((4, 4)), (1.0, 1.0), origin=(0.0, 5.0))
    with pytest.raises(M.GeometryError, match="origin"):
        M.evaluate_case(a, c)


def test_non_label_values_are_refused():
    with pytest.raises(M.MetricsError, match="label map"):
        M.evaluate_case(np.array([[0.0, 0.4]]), np.array([[0, 1]]))


# --------------------------------------------------------------------------- AUPR
def test_aupr_hand_computed_curve():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    y = np.array([1, 0, 1, 0, 0, 1])
    # thresholds in order: (R, P) = (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2), (2/3, 2/5), (1, 1/2)
    # AP = 1/3·1 + 1/3·2/3 + 1/3·1/2 = 13/18
    assert M.aupr(scores, y) == pytest.approx(13 / 18)
    # tied scores form one threshold: (R, P) = (1/2, 1/2), (1, 1/2) → 1/2
    assert M.aupr([0.8, 0.8, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(0.5)
    # perfect ranking, any image shape
    assert M.aupr(np.array([[0.1, 0.9], [0.2, 0.8]]), np.array([[0, 1], [0, 1]])) == pytest.approx(1.0)
    assert math.isnan(M.aupr([0.2, 0.3], [0, 0]))
    with pytest.raises(M.MetricsError, match="NaN"):
        M.aupr([0.2, float("nan")], [0, 1])


def test_pooled_aupr_from_counts_equals_aupr_of_concatenation():
    rng = np.random.default_rng(3)
    a_s, b_s = rng.random(50).round(2), rng.random(70).round(2)     # rounding makes ties across cases
    a_y, b_y = rng.random(50) > 0.6, rng.random(70) > 0.7
    pooled = M.aupr_from_counts(*(np.concatenate(x) for x in zip(M.score_counts(a_s, a_y),
                                                                  M.score_counts(b_s, b_y))))
    assert pooled == pytest.approx(M.aupr(np.concatenate([a_s, b_s]), np.concatenate([a_y, b_y])))


def test_probability_channels_map_to_classes_and_summary_gives_mauc():
    gt = np.zeros((2, 4), np.uint8)
    gt[0, :2] = 1
    gt[1, 2:] = 2
    prob = np.zeros((2, 2, 4), np.float32)
    prob[0] = [[0.9, 0.8, 0.1, 0.2], [0.3, 0.4, 0.2, 0.1]]       # class 1: perfect ranking → 1
    prob[1] = [[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.8, 0.7]]       # class 2: one negative first
    case = M.evaluate_case(gt, gt, prob_image=prob)
    assert case["classes"][1]["aupr"] == pytest.approx(1.0)
    # class 2: thresholds 0.9 (R 0, P 0), 0.8 (1/2, 1/2), 0.7 (1, 2/3), 0.1 (1, 2/8) → 1/2·1/2 + 1/2·2/3
    assert case["classes"][2]["aupr"] == pytest.approx(0.25 + 1 / 3)
    s = M.summarize([case, case])
    assert s[2]["pooled_aupr"] == pytest.approx(0.25 + 1 / 3)
    assert s["mAUC"]["value"] == pytest.approx((1.0 + 0.25 + 1 / 3) / 2)
    # a dict names the class of each map explicitly
    only2 = M.evaluate_case(gt, gt, prob_image={2: prob[1]})
    assert math.isnan(only2["classes"][1]["aupr"]) and only2["classes"][2]["aupr"] == pytest.approx(0.25 + 1 / 3)


def test_summary_pools_counts_and_ignores_nan():
    z = np.zeros((4, 4), np.uint8)
    a = z.copy()
    a[0, :2] = 1                                   # 2 voxels
    b = z.copy()
    b[0, :1] = 1                                   # 1 voxel
    c1 = M.evaluate_case(a, b, classes=[1])        # tp 1, fp 1, fn 0 → dice 2/3
    c2 = M.evaluate_case(z, z, classes=[1])        # both empty → dice 1, sensitivity NaN
    s = M.summarize([c1, c2])[1]
    assert s["dice"]["mean"] == pytest.approx((2 / 3 + 1) / 2) and s["dice"]["n"] == 2
    assert s["sensitivity"]["n"] == 1 and s["sensitivity"]["mean"] == 1.0
    assert s["pooled_dice"] == pytest.approx(2 / 3)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)


# ---------------------------------------------------------------------- detection
def test_lesion_detection_constructed_case():
    gt = np.zeros((12, 12), bool)
    pred = np.zeros((12, 12), bool)
    gt[1:3, 1:3] = True        # lesion A
    gt[1:3, 8:10] = True       # lesion B (missed)
    gt[8:11, 1:4] = True       # lesion C
    gt[6, 6] = gt[7, 7] = True  # D: two diagonal voxels, one lesion with full connectivity
    pred[2:4, 2:4] = True      # X overlaps A by 1 voxel
    pred[10, 3] = True         # Z overlaps C by 1 voxel
    pred[9, 9:11] = True       # Y: false positive
    r = M.lesion_detection(pred, gt)
    assert (r["reference"], r["predicted"]) == (4, 3)
    assert (r["tp"], r["fn"], r["fp"]) == (2, 2, 1)
    assert r["f1"] == pytest.approx(4 / 7)
    assert r["recall"] == pytest.approx(2 / 4) and r["precision"] == pytest.approx(2 / 3)
    # face connectivity splits D into two lesions
    assert M.lesion_detection(pred, gt, fully_connected=False)["reference"] == 5
    # requiring 2 overlapping voxels: X (1 voxel in A) and Z no longer detect anything
    r2 = M.lesion_detection(pred, gt, min_overlap=2)
    assert (r2["tp"], r2["fp"], r2["fn"]) == (0, 3, 4)
    pred[7, 7] = True          # now D is detected as well
    r3 = M.lesion_detection(pred, gt)
    assert (r3["tp"], r3["fp"], r3["fn"]) == (3, 1, 1)
    # the case-level fields carry the same numbers
    row = M.evaluate_case(pred.astype(np.uint8), gt.astype(np.uint8))["classes"][1]
    assert (row["lesion_tp"], row["lesion_fp"], row["lesion_fn"]) == (3, 1, 1)
    assert row["lesion_f1"] == pytest.approx(6 / 8)
