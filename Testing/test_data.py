"""Training data on real files: folder layouts, pairing, mask encodings (JPEG, palette,
integer, colour), clear errors naming the file, case-level splits, and the shared real
data sets (skipped when ../shared/data is absent)."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.data import (DataError, case_ids, case_split, detect_layout, folder_pairs, kfold_splits)
from LesionSegLib.data.images import derive_edge, read_image, read_mask

from conftest import SHARED_DATA

COVID = SHARED_DATA / "covid-semiseg" / "train"
COVID_MC = SHARED_DATA / "covid-semiseg" / "multiclass-train"
CVC = SHARED_DATA / "cvc-clinicdb-20"


# ------------------------------------------------------------------ helpers writing real files
def disc(size=48, r=10, c=None):
    yy, xx = np.mgrid[:size, :size]
    cy, cx = c or (size // 2, size // 2)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write(path: Path, arr: np.ndarray, rgb=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr, isVector=rgb)
    sitk.WriteImage(img, str(path))
    return path


def write_palette_png(path: Path, indices: np.ndarray, palette):
    """An indexed-colour PNG (colour type 3), which SimpleITK cannot write."""
    h, w = indices.shape
    raw = b"".join(b"\x00" + indices[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    plte = b"".join(bytes(c) for c in palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
                     + chunk(b"PLTE", plte) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def make_pair(root, img_dir, mask_dir, stem_img, stem_mask=None, ext=".png", size=48, lesion=True):
    m = disc(size) if lesion else np.zeros((size, size), bool)
    img = (50 + 150 * m).astype(np.uint8)
    write(root / img_dir / f"{stem_img}{ext}", img)
    write(root / mask_dir / f"{stem_mask or stem_img}.png", (m * 255).astype(np.uint8))


# ------------------------------------------------------------------ layouts and pairing
@pytest.mark.parametrize("dirs", [("images", "masks"), ("Imgs", "GT"), ("image", "mask")])
def test_each_folder_layout_is_detected_and_paired_by_stem(tmp_path, dirs):
    for i in (2, 10, 1):
        make_pair(tmp_path, *dirs, f"pat{i}_{i}")
    pairs = folder_pairs(tmp_path)
    assert [p.key for p in pairs] == ["pat1_1", "pat2_2", "pat10_10"]  # natural order
    assert all(p.image.parent.name == dirs[0] and p.mask.parent.name == dirs[1] for p in pairs)
    assert all(p.image.stem == p.mask.stem for p in pairs)
    assert pairs[0].edge is None


def test_edge_folder_is_used_when_present(tmp_path):
    make_pair(tmp_path, "Imgs", "GT", "3")
    write(tmp_path / "Edge" / "3.png", (derive_edge(disc()) * 255).astype(np.uint8))
    (p,) = folder_pairs(tmp_path)
    assert p.edge == tmp_path / "Edge" / "3.png"
    assert detect_layout(tmp_path).name == "Imgs/GT/Edge"


def test_unknown_layout_names_what_was_expected_and_found(tmp_path):
    (tmp_path / "pictures").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError) as e:
        folder_pairs(tmp_path)
    msg = str(e.value)
    assert "pictures" in msg and "labels" in msg and "{images,masks}" in msg and "Imgs" in msg


def test_role_words_are_dropped_when_stems_differ(tmp_path):
    make_pair(tmp_path, "images", "masks", "fine_3_10_fram", "fine_3_10_mask", ext=".jpg")
    make_pair(tmp_path, "images", "masks", "fine_3_11_fram", "fine_3_11_mask", ext=".jpg")
    pairs = folder_pairs(tmp_path)
    assert [(p.image.name, p.mask.name) for p in pairs] == [("fine_3_10_fram.jpg", "fine_3_10_mask.png"),
                                                            ("fine_3_11_fram.jpg", "fine_3_11_mask.png")]


def test_no_masks_found_is_a_clear_error(tmp_path):
    write(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no masks found"):
        folder_pairs(tmp_path)


def test_images_without_a_mask_are_named(tmp_path):
    make_pair(tmp_path, "images", "masks", "a")
    write(tmp_path / "images" / "lonely.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="lonely.png"):
        folder_pairs(tmp_path)
    assert [p.key for p in folder_pairs(tmp_path, allow_unmatched=True)] == ["a"]


# ------------------------------------------------------------------ mask encodings
def test_lossy_jpeg_mask_is_thresholded_at_128(tmp_path):
    m = disc(64, 20)
    path = write(tmp_path / "m.jpg", (m * 255).astype(np.uint8))
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert len(np.unique(raw)) > 2, "the JPEG must really be lossy for this test to mean something"
    lab = read_mask(path)
    assert set(np.unique(lab).tolist()) == {0, 1}
    np.testing.assert_array_equal(lab, (raw >= 128).astype(np.int64))
    assert abs(int(lab.sum()) - int(m.sum())) < 0.05 * m.sum()


def test_palette_png_mask_gives_palette_indices(tmp_path):
    idx = np.zeros((20, 30), np.uint8)
    idx[2:8, 3:9] = 1
    idx[10:15, 12:25] = 2
    pal = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    path = write_palette_png(tmp_path / "pal.png", idx, pal)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).ndim == 3  # SimpleITK expands it to RGB
    np.testing.assert_array_equal(read_mask(path, n_classes=2), idx)
    np.testing.assert_array_equal(read_mask(path, n_classes=1), (idx > 0).astype(np.int64))  # merged
    with pytest.raises(DataError, match="pal.png"):
        write_palette_png(tmp_path / "pal.png", idx * 3 % 4, pal)
        read_mask(path, n_classes=2)  # value 3 > 2 classes


def test_integer_and_binary_grey_masks(tmp_path):
    lab = np.zeros((10, 10), np.uint8)
    lab[1:4, 1:4], lab[5:9, 5:9] = 1, 2
    p = write(tmp_path / "int.png", lab)
    np.testing.assert_array_equal(read_mask(p, n_classes=2), lab)
    np.testing.assert_array_equal(read_mask(p, n_classes=1), (lab > 0).astype(np.int64))
    p2 = write(tmp_path / "bin.png", (lab > 0).astype(np.uint8) * 255)
    np.testing.assert_array_equal(read_mask(p2, n_classes=1), (lab > 0).astype(np.int64))
    np.testing.assert_array_equal(read_mask(p2, n_classes=4), (lab > 0).astype(np.int64))


def test_colour_mask_maps_class_colours_and_names_unknown_colours(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1:3, 1:3] = (255, 0, 0)
    rgb[4:6, 4:6] = (0, 255, 0)
    classes = [{"value": 1, "color": [255, 0, 0]}, {"value": 2, "color": [0, 255, 0]}]
    p = write(tmp_path / "col.png", rgb, rgb=True)
    lab = read_mask(p, classes, n_classes=2)
    assert lab[1, 1] == 1 and lab[5, 5] == 2 and lab[0, 0] == 0
    rgb[0, 0] = (7, 7, 200)
    p = write(tmp_path / "col.png", rgb, rgb=True)
    with pytest.raises(DataError, match=r"col\.png.*\(7, 7, 200\)"):
        read_mask(p, classes, n_classes=2)


# ------------------------------------------------------------------ errors before training
def _source(pairs, model="unet", preset=None, **cfg):
    from LesionSegLib import models
    from LesionSegLib.data.sources import FolderSource, target_spec
    pre = models.preset(model, preset)
    return FolderSource(pairs, pre["input"], target_spec(model, pre, cfg))


def test_size_mismatch_error_names_the_mask_file(tmp_path):
    make_pair(tmp_path, "images", "masks", "ok")
    write(tmp_path / "images" / "bad.png", np.zeros((40, 48), np.uint8))
    write(tmp_path / "masks" / "bad.png", (disc(48) * 255).astype(np.uint8))
    with pytest.raises(DataError) as e:
        _source(folder_pairs(tmp_path)).check()
    assert "bad.png" in str(e.value) and "48x48" in str(e.value) and "48x40" in str(e.value)


def test_unreadable_file_is_named(tmp_path):
    make_pair(tmp_path, "images", "masks", "ok")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    write(tmp_path / "masks" / "broken.png", np.zeros((48, 48), np.uint8))
    with pytest.raises(DataError, match="broken.png"):
        _source(folder_pairs(tmp_path)).check()


def test_empty_masks_everywhere_is_an_error(tmp_path):
    for s in ("a", "b"):
        make_pair(tmp_path, "images", "masks", s, lesion=False)
    with pytest.raises(DataError, match="all 2 masks are empty"):
        _source(folder_pairs(tmp_path)).check()


def test_rgb_image_for_a_grey_network_is_named(tmp_path):
    write(tmp_path / "images" / "col.png", np.random.default_rng(0).integers(0, 255, (48, 48, 3), np.uint8), rgb=True)
    write(tmp_path / "masks" / "col.png", (disc(48) * 255).astype(np.uint8))
    with pytest.raises(DataError, match="col.png.*grey"):
        _source(folder_pairs(tmp_path), "unet", "covid-ct").check()


# ------------------------------------------------------------------ cases and splits
def test_case_ids_default_rule_regex_and_table(tmp_path):
    ids, rule = case_ids(["pat07_slice012", "pat07_slice013", "pat12_slice001"])
    assert ids == {"pat07_slice012": "pat07_slice", "pat07_slice013": "pat07_slice", "pat12_slice001": "pat12_slice"}
    assert "trailing number" in rule
    ids, _ = case_ids(["pat07_slice012", "pat12_slice001"], case_regex=r"^(?P<case>pat\d+)")
    assert ids == {"pat07_slice012": "pat07", "pat12_slice001": "pat12"}
    ids, rule = case_ids(["0", "9", "10", "67"])  # COVID-SemiSeg: running numbers only
    assert ids == {"0": "0-9", "9": "0-9", "10": "10-19", "67": "60-69"} and "blocks of 10" in rule
    (tmp_path / "cases.csv").write_text("file,case\n0.jpg,A\n9.jpg,B\n10.jpg,A\n67.jpg,B\n")
    ids, _ = case_ids(["0", "9", "10", "67"], cases=tmp_path / "cases.csv")
    assert ids == {"0": "A", "9": "B", "10": "A", "67": "B"}
    with pytest.raises(DataError, match="does not match"):
        case_ids(["x1"], case_regex=r"^pat")


class Item:
    def __init__(self, case, i):
        self.case, self.i = case, i


def _items(seed, n_cases=12):
    rng = np.random.default_rng(seed)
    return [Item(f"c{c}", k) for c in range(n_cases) for k in range(int(rng.integers(1, 9)))]


@pytest.mark.parametrize("seed", range(6))
def test_case_split_never_splits_a_case(seed):
    items = _items(seed)
    for frac in (0.1, 0.2, 0.5):
        train, val = case_split(items, frac, seed)
        assert len(train) + len(val) == len(items) and val and train
        assert not {i.case for i in train} & {i.case for i in val}
        assert set(map(id, train)) | set(map(id, val)) == set(map(id, items))
    assert case_split(items, 0.2, seed) == case_split(items, 0.2, seed)  # seeded


def test_case_split_reaches_about_the_requested_fraction():
    items = [Item(f"c{c}", 0) for c in range(100)]
    train, val = case_split(items, 0.2, 0)
    assert len(val) == 20


def test_case_split_needs_two_cases():
    with pytest.raises(DataError, match="at least 2 cases"):
        case_split([Item("only", 0), Item("only", 1)], 0.2)


def test_kfold_every_case_in_exactly_one_validation_fold():
    items = _items(3, n_cases=11)
    folds = kfold_splits(items, 5, seed=1)
    seen = []
    for train, val in folds:
        assert not {i.case for i in train} & {i.case for i in val}
        assert len(train) + len(val) == len(items)
        seen += [i.case for i in val]
    counts = {c: seen.count(c) for c in {i.case for i in items}}
    per_case = {c: sum(1 for i in items if i.case == c) for c in counts}
    assert counts == per_case  # each case's items appear in exactly one validation fold
    with pytest.raises(DataError, match="at least 12 cases"):
        kfold_splits(items, 12)


# ------------------------------------------------------------------ the shared real data
@pytest.mark.skipif(not COVID.is_dir(), reason="shared COVID-SemiSeg data not present")
def test_real_covid_semiseg_layout_cases_and_split():
    pairs = folder_pairs(COVID)
    assert len(pairs) == 50 and all(p.edge is not None for p in pairs)
    assert {p.case for p in pairs} == {"0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69"}
    train, val = case_split(pairs, 0.2, 0)
    assert 5 <= len(val) <= 15 and not {p.case for p in train} & {p.case for p in val}


@pytest.mark.skipif(not COVID.is_dir(), reason="shared COVID-SemiSeg data not present")
def test_derived_edges_contain_the_released_inf_net_edge_maps():
    # the released Edge/ maps lie inside the band derive_edge draws, so a BSNet trained on
    # folders without Edge/ sees the same kind of target
    for stem in ("2", "10", "29"):
        lab = read_mask(COVID / "GT" / f"{stem}.png")
        released = read_image(COVID / "Edge" / f"{stem}.png") >= 128
        derived = derive_edge(lab).astype(bool)
        assert released.sum() > 100
        assert (released & ~derived).sum() == 0
        assert derived.sum() <= 1.02 * released.sum()


@pytest.mark.skipif(not CVC.is_dir(), reason="shared CVC-ClinicDB data not present")
def test_real_cvc_clinicdb_jpeg_masks_become_binary():
    pairs = folder_pairs(CVC)
    assert len(pairs) == 20 and pairs[0].mask.suffix == ".jpg"
    raw = read_image(pairs[0].mask)
    lab = read_mask(pairs[0].mask)
    assert len(np.unique(raw)) > 2 and set(np.unique(lab).tolist()) == {0, 1}
    assert read_image(pairs[0].image).shape == raw.shape + (3,)


@pytest.mark.skipif(not COVID_MC.is_dir(), reason="shared multi-class COVID data not present")
def test_real_multiclass_palette_masks():
    pairs = folder_pairs(COVID_MC)
    values = set()
    for p in pairs[:10]:
        values |= set(np.unique(read_mask(p.mask, n_classes=2)).tolist())
    assert values == {0, 1, 2}
