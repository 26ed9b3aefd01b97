"""Lesion table, small-lesion removal and hysteresis (seeded lesions), with hand-computed values."""
import numpy as np
import pytest

from LesionSegLib import models
from LesionSegLib.inference import lesion_table, remove_small_lesions
from LesionSegLib.inference.postprocess import remove_unseeded_lesions, size_level

LEVELS = models.card("msenet")["lesion_size_levels"]


def two_lesions():
    mask = np.zeros((4, 10, 12), bool)       # (z, y, x)
    mask[1:3, 2:5, 3:7] = True               # 2 × 3 × 4 = 24 voxels
    mask[0, 8, 10] = True                    # two voxels touching only at a corner:
    mask[1, 9, 11] = True                    # one lesion with full (26-) connectivity
    return mask


def test_table_counts_volumes_centroids_and_physical_positions():
    spacing = (0.5, 1.0, 2.0)                # x, y, z: 1 mm³ per voxel
    origin = (10.0, -20.0, 5.0)
    direction = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # RAS storage
    rows = lesion_table(two_lesions(), spacing, 3, origin=origin, direction=direction)
    assert [r["lesion"] for r in rows] == [1, 2] and all(r["class"] == 3 for r in rows)
    big, pair = rows
    assert big["voxels"] == 24 and big["volume_mm3"] == pytest.approx(24.0)
    assert big["centroid_ijk"] == [4.5, 3.0, 1.5]          # x 3..6, y 2..4, z 1..2
    assert big["centroid_lps_mm"] == [10 - 4.5 * 0.5, -20 - 3.0, 5 + 1.5 * 2]
    assert pair["voxels"] == 2 and pair["centroid_ijk"] == [10.5, 8.5, 0.5]
    assert big["max_section_mm2"] == pytest.approx(12 * 0.5)  # one axial slice: 3 × 4 voxels of 0.5 mm²
    assert big["size_level"] is None                           # no levels given


def test_size_levels_use_the_largest_cross_section_in_the_slicing_plane():
    mask = np.zeros((3, 60, 60), bool)
    mask[0, 0:10, 0:10] = True        # 100 mm² → small
    mask[0:3, 20:40, 0:20] = True     # 400 mm² per slice (1200 mm³) → medium
    mask[1, 0:40, 25:60] = False
    mask[1, 22:60, 25:60] = True      # 38 × 35 = 1330 mm² → large
    rows = lesion_table(mask, (1.0, 1.0, 3.0), 1, LEVELS)
    by_voxels = {r["voxels"]: r for r in rows}
    assert by_voxels[100]["size_level"] == "small"
    assert by_voxels[1200]["size_level"] == "medium" and by_voxels[1200]["max_section_mm2"] == 400
    assert by_voxels[1330]["size_level"] == "large"
    # the same masks sliced along x (a sagittal slicing axis): other sections, other levels
    sagittal = lesion_table(mask, (1.0, 1.0, 3.0), 1, LEVELS, slice_axis=2)
    assert {r["voxels"]: r["max_section_mm2"] for r in sagittal}[1200] == 20 * 3 * 3
    assert size_level(314.15, LEVELS) == "small" and size_level(314.16, LEVELS) == "medium"
    assert size_level(1256.64, LEVELS) == "large"


def test_two_d_masks_and_empty_masks():
    mask = np.zeros((20, 30), bool)
    mask[2:6, 3:8] = True
    mask[10, 10] = mask[11, 11] = True       # diagonal neighbours: one lesion (8-connectivity)
    rows = lesion_table(mask, (0.2, 0.2), 2, LEVELS)
    assert [r["voxels"] for r in rows] == [20, 2]
    assert rows[0]["volume_mm3"] == pytest.approx(20 * 0.04) and rows[0]["centroid_ijk"] == [5.0, 3.5]
    assert rows[0]["size_level"] == "small"
    assert lesion_table(np.zeros((5, 5, 5), bool), (1, 1, 1), 1) == []
    with pytest.raises(ValueError, match="spacing"):
        lesion_table(mask, (1, 1, 1), 1)


def test_remove_small_lesions_in_place():
    mask = two_lesions()
    assert remove_small_lesions(mask, (0.5, 1.0, 2.0), 3.0) == 1    # the 2 mm³ pair goes
    assert mask.sum() == 24 and not mask[0, 8, 10]
    assert remove_small_lesions(mask, (0.5, 1.0, 2.0), 24.0) == 0   # 24 mm³ is not below 24
    assert remove_small_lesions(mask, (0.5, 1.0, 2.0), 0.0) == 0
    assert remove_small_lesions(mask, (1, 1, 1), 25.0) == 1 and not mask.any()


def test_remove_unseeded_lesions_keeps_lesions_holding_a_seed():
    mask = two_lesions()
    seeds = np.zeros_like(mask)
    seeds[1, 9, 11] = True                   # a seed in the corner-connected pair only
    assert remove_unseeded_lesions(mask, seeds) == 1                 # the 24-voxel block goes
    assert mask.sum() == 2 and mask[0, 8, 10] and mask[1, 9, 11]     # the pair stays whole
    seeds[:] = False
    seeds[2, 3, 4] = True                    # a seed outside every lesion keeps nothing
    assert remove_unseeded_lesions(mask, seeds) == 1 and not mask.any()
    assert remove_unseeded_lesions(mask, seeds) == 0                 # an empty mask
