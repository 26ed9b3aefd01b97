"""Damaged and odd inputs, as a hostile but fair user gives them to ``lesionseg predict``.

Every case either gives the correct result on the input's exact grid, or fails with
one line that names the file and the problem, a non-zero exit status and nothing at
the destination. The network is a real registered U-Net with hand-set weights whose
output is a z-score threshold (Testing/helpers.py), so the correct result of
every input is known: the voxels brighter than 200.

The file cases run in ONE real ``lesionseg predict`` subprocess over a folder holding
all of them (each case is its own test of that run's output); option, path and
checkpoint cases run ``lesionseg`` in a subprocess where it is cheap (usage errors
never import torch) and ``cli.main`` in this process otherwise."""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib import checkpoint, cli, models
from helpers import threshold_unet

ROOT = Path(__file__).resolve().parents[1]
PRESET = "stroke-dwi"


def lesionseg(*args, cwd=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("LESIONSEG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "LesionSegLib", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


# --------------------------------------------------------------------------- inputs
def lesion_array(dtype=np.int16, shape=(5, 32, 40), bright=400, seed=0):
    """Background 100 ± 3, one block of ``bright`` (1.5 % of the voxels): the hand-set
    network marks exactly the voxels above 200."""
    rng = np.random.default_rng(seed)
    a = 100 + rng.integers(-3, 4, size=shape)
    a[1:3, 8:14, 20:28] = bright
    return a.astype(dtype)


def image_of(array, spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0), direction=None, vector=False):
    img = sitk.GetImageFromArray(array, isVector=vector)
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(direction)
    return img


def oblique():
    c, s = np.cos(0.3), np.sin(0.3)
    return tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]).ravel())


def write(img, path, compress=False):
    sitk.WriteImage(img, str(path), compress)
    return path


def cut(path, fraction):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * fraction)])


def nrrd_header(path, array, spacing="0.8 0.9 2.5", directions=None, encoding="raw", data=None, extra=""):
    z, y, x = array.shape
    sx, sy, sz = spacing.split()
    directions = directions or f"({sx},0,0) (0,{sy},0) (0,0,{sz})"
    head = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {x} {y} {z}\n"
            f"space directions: {directions}\nkinds: domain domain domain\nendian: little\n"
            f"encoding: {encoding}\nspace origin: (0,0,0)\n{extra}\n")
    body = array.astype("<i2").tobytes() if data is None else data
    Path(path).write_bytes(head.encode() + body)
    return path


# name → (builder(folder) -> expected labels or None, expected error text or None)
GOOD, BAD = {}, {}


def good(name):
    def deco(fn):
        GOOD[name] = fn
        return fn
    return deco


def bad(name, text):
    def deco(fn):
        BAD[name] = (fn, text)
        return fn
    return deco


def _good_volume(name, dtype, bright=400, **geometry):
    def build(folder):
        a = lesion_array(dtype, bright=bright)
        img = image_of(a, **geometry)
        write(img, folder / name, compress=name.endswith((".gz", ".nrrd", ".mha")))
        return img, a > 200
    GOOD[name] = build


_good_volume("int16.nii.gz", np.int16)
_good_volume("uint8.mha", np.uint8, bright=250)
_good_volume("uint16.nrrd", np.uint16)
_good_volume("int32.nii", np.int32)
_good_volume("float32.nrrd", np.float32)
_good_volume("float64.nii.gz", np.float64)
_good_volume("oblique.nii.gz", np.int16, direction=oblique())
_good_volume("tiny-spacing.mha", np.int16, spacing=(1e-3, 1e-3, 5e-3))
_good_volume("far-origin.nrrd", np.int16, origin=(1e6, -1e6, 5e5))


@good("negative-spacing-header.nrrd")
def _(folder):
    a = lesion_array()
    path = nrrd_header(folder / "negative-spacing-header.nrrd", a, directions="(0.8,0,0) (0,-0.9,0) (0,0,-2.5)")
    return sitk.ReadImage(str(path)), a > 200


@good("one-nan.nrrd")
def _(folder):
    a = lesion_array(np.float32)
    truth = a > 200
    a[0, 0, 0] = np.nan
    img = image_of(a)
    write(img, folder / "one-nan.nrrd")
    return img, truth


@good("one-inf.mha")
def _(folder):
    a = lesion_array(np.float32)
    truth = a > 200
    a[4, 31, 0] = np.inf           # +Inf is the brightest value: it is marked, nothing else changes
    truth[4, 31, 0] = True
    img = image_of(a)
    write(img, folder / "one-inf.mha")
    return img, truth


@good("nan-and-minus-inf.nrrd")
def _(folder):
    a = lesion_array(np.float32)
    truth = a > 200
    a[:, 0, :] = np.nan
    a[:, 1, :] = -np.inf
    img = image_of(a)
    write(img, folder / "nan-and-minus-inf.nrrd")
    return img, truth


@good("constant.nii.gz")
def _(folder):
    a = np.full((3, 16, 16), 7, np.int16)
    img = image_of(a)
    write(img, folder / "constant.nii.gz", True)
    return img, np.zeros(a.shape, bool)


@good("grey-png.png")
def _(folder):
    a = np.full((40, 48), 40, np.uint8)
    a[10:16, 20:28] = 250
    img = image_of(a)
    write(img, folder / "grey-png.png")
    return img, a > 128


@good("sixteen-bit.png")
def _(folder):
    a = np.full((40, 48), 4000, np.uint16)
    a[10:16, 20:28] = 60000
    img = image_of(a)
    write(img, folder / "sixteen-bit.png")
    return img, a > 30000


@good("grey-tif.tif")
def _(folder):
    a = np.full((30, 50), 40, np.uint8)
    a[20:26, 3:9] = 250
    img = image_of(a)
    write(img, folder / "grey-tif.tif")
    return img, a > 128


# ---- files that are damaged, cut short, or not images at all
def _cut_volume(name, fraction, compress):
    def build(folder):
        write(image_of(lesion_array(np.int16, shape=(6, 40, 48))), folder / name, compress)
        cut(folder / name, fraction)
    return build


BAD["cut-half.nii.gz"] = (_cut_volume("cut-half.nii.gz", 0.5, True), "cut short")
BAD["cut-end.nii.gz"] = (_cut_volume("cut-end.nii.gz", 0.97, True), "cut short")
BAD["cut-nii.nii"] = (_cut_volume("cut-nii.nii", 0.8, False), "cut short")
BAD["cut-raw.nrrd"] = (_cut_volume("cut-raw.nrrd", 0.8, False), "fread got only")
BAD["cut-gzip.nrrd"] = (_cut_volume("cut-gzip.nrrd", 0.6, True), "NRRD")
BAD["cut-mha.mha"] = (_cut_volume("cut-mha.mha", 0.7, False), "cut short")
BAD["cut-zlib.mha"] = (_cut_volume("cut-zlib.mha", 0.7, True), "cut short")


@bad("cut-png.png", "damaged or cut short")
def _(folder):
    write(image_of(np.arange(64 * 80, dtype=np.uint32).reshape(64, 80).astype(np.uint8)), folder / "cut-png.png")
    cut(folder / "cut-png.png", 0.6)


@bad("cut-jpg.jpg", "cut short")
def _(folder):
    rng = np.random.default_rng(1)
    write(image_of(rng.integers(0, 255, (64, 80), dtype=np.uint8)), folder / "cut-jpg.jpg")
    cut(folder / "cut-jpg.jpg", 0.7)


@bad("cut-bmp.bmp", "cut short|cannot read")
def _(folder):
    write(image_of(np.full((40, 48), 9, np.uint8)), folder / "cut-bmp.bmp")
    cut(folder / "cut-bmp.bmp", 0.5)


@bad("crc-damaged.nii.gz", "damaged|cannot read")
def _(folder):
    raw = bytearray(gzip.compress(sitk_bytes(image_of(lesion_array())), mtime=0))
    raw[-8] ^= 0xFF                  # the gzip trailer's CRC no longer matches
    (folder / "crc-damaged.nii.gz").write_bytes(bytes(raw))


def sitk_bytes(img):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.nii"
        sitk.WriteImage(img, str(p))
        return p.read_bytes()


@bad("empty-nii.nii.gz", "cannot read")
def _(folder):
    (folder / "empty-nii.nii.gz").write_bytes(b"")


@bad("empty-png.png", "cannot read")
def _(folder):
    (folder / "empty-png.png").write_bytes(b"")


@bad("text.nii.gz", "cannot read")
def _(folder):
    (folder / "text.nii.gz").write_text("this is not a NIfTI file")


@bad("html.png", "cannot read")
def _(folder):
    (folder / "html.png").write_text("<html><body>404 Not Found</body></html>")


@bad("garbage.nrrd", "cannot read")
def _(folder):
    (folder / "garbage.nrrd").write_bytes(bytes(range(256)) * 4)


@bad("zero-spacing.nrrd", "spacing")
def _(folder):
    nrrd_header(folder / "zero-spacing.nrrd", lesion_array(), spacing="0.8 0 2.5",
                directions="(0.8,0,0) (0,0,0) (0,0,2.5)")


@bad("no-data-mhd.mhd", "cannot read")
def _(folder):
    (folder / "no-data-mhd.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_SHORT\n"
                                        "ElementDataFile = missing.raw\n")


@bad("no-data-nhdr.nhdr", "cannot read")
def _(folder):
    (folder / "no-data-nhdr.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 4\nencoding: raw\n"
                                         "endian: little\ndata file: missing.raw\n")


@bad("all-nan.nrrd", "no finite values")
def _(folder):
    write(image_of(np.full((3, 16, 16), np.nan, np.float32)), folder / "all-nan.nrrd")


@bad("four-d.nii.gz", "4-D")
def _(folder):
    img = sitk.JoinSeries([image_of(lesion_array()) for _ in range(2)])
    write(img, folder / "four-d.nii.gz", True)


@bad("complex.nii", "complex")
def _(folder):
    a = lesion_array(np.float32).astype(np.complex64)
    write(image_of(a), folder / "complex.nii")


@bad("single-coronal-slice.nrrd", "single coronal or sagittal slice")
def _(folder):
    write(image_of(lesion_array(shape=(6, 1, 40))), folder / "single-coronal-slice.nrrd")


@bad("colour.jpg", "convert it to grey")
def _(folder):
    write(image_of(np.zeros((32, 32, 3), np.uint8), vector=True), folder / "colour.jpg")


@bad("five-channels.mha", "channel")
def _(folder):
    write(image_of(np.zeros((5, 16, 16, 5), np.float32), vector=True), folder / "five-channels.mha")


@bad("nan-direction.nii", "cannot read|orientation|spacing")
def _(folder):
    raw = bytearray(sitk_bytes(image_of(lesion_array())))
    # NIfTI-1 srow_x (sform) at byte 280: a NaN there makes the orientation meaningless
    raw[280:284] = struct.pack("<f", float("nan"))
    raw[76 + 4:76 + 8] = struct.pack("<f", float("nan"))       # pixdim[1] as well
    raw[252:254] = struct.pack("<h", 0)                         # no qform: the sform is used
    (folder / "nan-direction.nii").write_bytes(bytes(raw))


ALL = sorted(GOOD) + sorted(BAD)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "unet-threshold.pt"
    checkpoint.save(path, threshold_unet(), config=models.config("unet", base_width=4, depth=2), preset=PRESET)
    return path


@pytest.fixture(scope="module")
def folder_run(network, tmp_path_factory):
    """Every file case in one folder, segmented by one ``lesionseg predict`` run."""
    root = tmp_path_factory.mktemp("bad-input")
    inputs = root / "in"
    inputs.mkdir()
    expected = {}
    for name, build in GOOD.items():
        expected[name] = build(inputs)
    for name, (build, _) in BAD.items():
        build(inputs)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs.iterdir()}
    out = root / "out"
    r = lesionseg("predict", "--checkpoint", network, "--mode", "native", "--quiet", "--batch-size", "4",
                  inputs, "-o", out)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs.iterdir()}
    lines = r.stderr.splitlines()
    return {"r": r, "out": out, "expected": expected, "lines": lines, "inputs_unchanged": before == after}


def test_the_folder_run_fails_as_a_whole_and_never_touches_its_inputs(folder_run):
    r = folder_run["r"]
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"{len(BAD)} of {len(ALL)} input(s) failed" in r.stderr
    assert folder_run["inputs_unchanged"]
    assert not [p.name for p in folder_run["out"].iterdir() if p.name.startswith(".")]   # no temporary files


def _outputs(out: Path, name: str):
    from LesionSegLib.inference.io import split_ext
    stem = split_ext(name)[0]
    return sorted(p.name for p in out.iterdir() if p.name.startswith(stem + "_"))


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_or_odd_input_gives_the_correct_result_on_its_exact_grid(folder_run, name):
    from LesionSegLib.inference.io import output_ext, split_ext
    img, truth = folder_run["expected"][name]
    stem, ext = split_ext(name)
    label_path = folder_run["out"] / f"{stem}_label{output_ext(ext)}"
    errors = [ln for ln in folder_run["lines"] if f"/{name}:" in ln and "warning" not in ln]
    assert not errors and label_path.is_file(), errors
    lab = sitk.ReadImage(str(label_path))
    assert lab.GetSize() == img.GetSize()
    assert np.allclose(lab.GetSpacing(), img.GetSpacing()) and np.allclose(lab.GetOrigin(), img.GetOrigin())
    assert np.allclose(lab.GetDirection(), img.GetDirection())
    got = sitk.GetArrayFromImage(lab)
    assert got.shape == truth.shape and np.array_equal(got > 0, truth), (int((got > 0).sum()), int(truth.sum()))


def test_non_finite_voxels_are_counted_in_a_warning(folder_run):
    warnings = {ln.split(": ")[2].rsplit("/", 1)[-1]: ln for ln in folder_run["lines"] if ": warning: " in ln}
    assert "1 voxel(s) are NaN or infinite" in warnings["one-nan.nrrd"]
    assert "1 voxel(s) are NaN or infinite" in warnings["one-inf.mha"]
    assert f"{2 * 5 * 40} voxel(s) are NaN or infinite" in warnings["nan-and-minus-inf.nrrd"]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_one_line_naming_file_and_problem_with_nothing_written(folder_run, name):
    import re
    text = BAD[name][1]
    lines = [ln for ln in folder_run["lines"] if ln.startswith("lesionseg predict: ") and f"/{name}: " in ln]
    assert len(lines) == 1, folder_run["lines"]
    assert re.search(text, lines[0]), lines[0]
    assert _outputs(folder_run["out"], name) == []


# --------------------------------------------------------------------------- options
OPTION_CASES = [
    (["--threshold", "nan"], "--threshold", "finite"),
    (["--threshold", "inf"], "--threshold", "finite"),
    (["--threshold", "0"], "--threshold", "(0, 1)"),
    (["--threshold", "1"], "--threshold", "(0, 1)"),
    (["--threshold", "-0.2"], "--threshold", "(0, 1)"),
    (["--threshold", "1.5"], "--threshold", "(0, 1)"),
    (["--threshold", "half"], "--threshold", "must be a number"),
    (["--tile-overlap", "1"], "--tile-overlap", "[0, 1)"),
    (["--tile-overlap", "nan"], "--tile-overlap", "finite"),
    (["--tile-overlap", "-0.5"], "--tile-overlap", "[0, 1)"),
    (["--min-lesion-size", "-1"], "--min-lesion-size", "at least 0"),
    (["--min-lesion-size", "nan"], "--min-lesion-size", "finite"),
    (["--device", "tpu"], "--device", "unknown device"),
    (["--device", "cuda:x"], "--device", "unknown device"),
    (["--precision", "fp8"], "--precision", "invalid choice"),
    (["--mode", "fast"], "--mode", "invalid choice"),
]
OPTION_RUN_CASES = [   # checked after parsing, still before anything is loaded or written
    (["--window", "nan,400"], "--window", "finite"),
    (["--window", "40,0"], "--window", "width"),
    (["--window", "40,-400"], "--window", "width"),
    (["--window", "40,inf"], "--window", "finite"),
    (["--window", "40"], "--window", "CENTER,WIDTH"),
    (["--batch-size", "0"], "--batch-size", "positive integer"),
    (["--batch-size", "two"], "--batch-size", "positive integer"),
]


@pytest.mark.parametrize("extra,option,text", OPTION_CASES[:3], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_nonsense_option_in_a_real_subprocess(tmp_path, extra, option, text):
    r = lesionseg("predict", "--model", "unet", *extra, tmp_path, "-o", tmp_path / "out", timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and text in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,option,text", OPTION_CASES[3:] + OPTION_RUN_CASES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_nonsense_option_is_refused_before_anything_is_done(tmp_path, capsys, extra, option, text):
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", "--model", "unet", *extra, str(tmp_path), "-o", str(tmp_path / "out")])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err if e.value.code == 2 else str(e.value.code)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and text in lines[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,text", [
    (["evaluate", "a", "b", "--min-overlap", "0"], "--min-overlap"),
    (["evaluate", "a", "b", "--classes", "1.5"], "--classes"),
    (["train", "--model", "unet", "--epochs", "0"], "--epochs"),
    (["train", "--model", "unet", "--lr", "nan"], "--lr"),
    (["train", "--model", "unet", "--batch-size", "-2"], "--batch-size"),
    (["export-onnx", "--model", "unet", "-o", "x.onnx", "--size", "0", "64"], "--size"),
    (["export-onnx", "--model", "unet", "-o", "x.onnx", "--batch", "0"], "--batch"),
], ids=lambda v: " ".join(v[:1] + v[-2:]) if isinstance(v, list) else None)
def test_other_verbs_validate_their_numbers(tmp_path, capsys, argv, text):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0]


# --------------------------------------------------------------------------- checkpoints, devices
def _ck_cases(tmp_path, network):
    import torch
    cases = {}
    cases["missing"] = (tmp_path / "missing.pt", "no such checkpoint file")
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    cases["empty"] = (p, "not a readable PyTorch weight file")
    p = tmp_path / "cut.pt"
    data = Path(network).read_bytes()
    p.write_bytes(data[: len(data) // 2])
    cases["cut short"] = (p, "not a readable PyTorch weight file")
    p = tmp_path / "text.pt"
    p.write_text("hello")
    cases["text"] = (p, "not a readable PyTorch weight file")
    p = tmp_path / "unknown.pt"
    torch.save({"some.weight": torch.zeros(2)}, p)
    cases["unknown keys"] = (p, "not a LesionSeg checkpoint and not a known official file")
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"not an onnx graph")
    cases["broken onnx"] = (p, "broken.onnx")
    return cases


CK_NAMES = ["missing", "empty", "cut short", "text", "unknown keys", "broken onnx"]


@pytest.mark.parametrize("case", CK_NAMES)
def test_unusable_checkpoint_is_one_line_and_nothing_is_written(network, tmp_path, capsys, case):
    path, text = _ck_cases(tmp_path, network)[case]
    img = tmp_path / "in.nii.gz"
    write(image_of(lesion_array()), img, True)
    if case == "broken onnx":
        pytest.importorskip("onnxruntime")
    code = cli.main(["predict", "--checkpoint", str(path), "--quiet", str(img), "-o", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and text in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_pickle_with_code_is_refused_never_run_and_never_advised_to_load_unsafely(tmp_path):
    import torch
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    img = write(image_of(lesion_array()), tmp_path / "in.nii.gz", True)
    r = lesionseg("predict", "--checkpoint", tmp_path / "evil.pt", img, "-o", tmp_path / "out")
    assert r.returncode == 1 and not marker.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "never executes code" in lines[0] and "system" in lines[0]
    assert "weights_only=False" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,text", [
    (["--preset", "polyp"], "input channel"),                     # 1-channel net, 3-channel preset
    (["--device", "cuda"], "cuda"),
    (["--device", "mps"], "mps"),
])
def test_network_that_cannot_be_built_is_one_line(network, tmp_path, capsys, argv, text):
    import torch
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    if "mps" in argv and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("mps is available here")
    img = write(image_of(lesion_array()), tmp_path / "in.nii.gz", True)
    code = cli.main(["predict", "--checkpoint", str(network), *argv, "--quiet", str(img),
                     "-o", str(tmp_path / "out")])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if "trained with preset" not in ln]
    assert code == 1 and len(lines) == 1 and text in lines[0], lines
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- paths and outputs
def test_outputs_with_the_same_name_are_refused_not_overwritten(network, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = lesion_array()
    write(image_of(a), tmp_path / "a" / "case.nii.gz", True)
    write(image_of(a[:, ::-1].copy()), tmp_path / "b" / "case.nii.gz", True)
    write(image_of(np.full((20, 20), 40, np.uint8)), tmp_path / "a" / "shot.png")
    write(image_of(np.full((20, 20), 250, np.uint8)), tmp_path / "b" / "shot.jpg")
    out = tmp_path / "out"
    code = cli.main(["predict", "--checkpoint", str(network), "--mode", "native", "--quiet",
                     str(tmp_path / "a" / "case.nii.gz"), str(tmp_path / "b" / "case.nii.gz"),
                     str(tmp_path / "a" / "shot.png"), str(tmp_path / "b" / "shot.jpg"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{tmp_path / 'b' / 'case.nii.gz'}: its results would have the same name (case_label.nii.gz)" in err
    assert f"{tmp_path / 'b' / 'shot.jpg'}: its results would have the same name (shot_label.png)" in err
    # the first of each pair is there, and it is the first one's result
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_label.nii.gz")))
    assert np.array_equal(got > 0, a > 200)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "shot_label.png"))).max() == 0


def test_an_output_folder_that_cannot_be_made_is_named(network, tmp_path, capsys):
    img = write(image_of(lesion_array()), tmp_path / "in.nii.gz", True)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = cli.main(["predict", "--checkpoint", str(network), "--quiet", str(img), "-o", str(blocker / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1
    assert f"cannot write into the output folder {blocker / 'out'}" in lines[0] and ".tmp" not in lines[0]
    assert blocker.read_text() == "x"


def test_an_output_that_would_overwrite_its_input_is_refused(network, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write(image_of(lesion_array()), folder / "x.nii.gz", True)
    write(image_of(lesion_array()), folder / "x_label.nii.gz", True)
    before = (folder / "x_label.nii.gz").read_bytes()
    code = cli.main(["predict", "--checkpoint", str(network), "--quiet", str(folder / "x.nii.gz"),
                     str(folder / "x_label.nii.gz"), "-o", str(folder)])
    assert code == 1 and "would overwrite an input file" in capsys.readouterr().err
    assert (folder / "x_label.nii.gz").read_bytes() == before


@pytest.mark.parametrize("what", ["missing file", "empty folder", "unsupported type"])
def test_unusable_input_arguments(network, tmp_path, capsys, what):
    arg = {"missing file": tmp_path / "nothing.nii.gz", "empty folder": tmp_path / "empty",
           "unsupported type": tmp_path / "notes.txt"}[what]
    if what == "empty folder":
        arg.mkdir()
    if what == "unsupported type":
        arg.write_text("hello")
    code = cli.main(["predict", "--checkpoint", str(network), "--quiet", str(arg), "-o", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines[0].startswith(f"lesionseg predict: {arg}: ")
    assert not (tmp_path / "out").exists()


def test_evaluate_into_a_path_that_cannot_be_a_folder_is_one_line(tmp_path):
    mask = write(image_of(np.eye(8, dtype=np.uint8)), tmp_path / "m.png")
    r = lesionseg("evaluate", mask, mask, "--csv", tmp_path / "m.png" / "x.csv", timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "m.png" in lines[0] and "Traceback" not in r.stderr
    # a folder that does not exist yet is made
    r = lesionseg("evaluate", mask, mask, "--csv", tmp_path / "new" / "sub" / "x.csv", timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new" / "sub" / "x.csv").read_text().startswith("case,class")


def test_resume_from_a_damaged_training_state_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_state.pt").write_bytes(b"PK\x03\x04 not really a zip")
    data = tmp_path / "data"
    code = cli.main(["train", "--model", "unet", "--data", str(data), "--out", str(run), "--resume", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "training_state.pt" in lines[0] and "not a readable" in lines[0]


@pytest.mark.parametrize("damage", ["cut short", "not an image"])
def test_evaluate_refuses_a_damaged_reference_instead_of_scoring_zeros(tmp_path, capsys, damage):
    a = (lesion_array() > 200).astype(np.uint8)
    pred = write(image_of(a), tmp_path / "pred.nii.gz", True)
    gt = write(image_of(a), tmp_path / "gt.nii.gz", True)
    if damage == "cut short":
        cut(gt, 0.9)
    else:
        gt.write_text("no image here")
    code = cli.main(["evaluate", str(pred), str(gt), "--csv", str(tmp_path / "m.csv")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "gt.nii.gz" in lines[0]
    assert ("cut short" if damage == "cut short" else "cannot read") in lines[0]
    assert not (tmp_path / "m.csv").exists()


def test_a_read_only_output_folder_is_named_not_the_input_or_a_temporary_file(network, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        img = write(image_of(lesion_array()), tmp_path / "in.nii.gz", True)
        code = cli.main(["predict", "--checkpoint", str(network), "--quiet", str(img), "-o", str(ro)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(lines) == 1
        assert lines[0] == f"lesionseg predict: error: cannot write into the output folder {ro}: Read-only file system"
        assert os.listdir(ro) == []
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_one_extension_table_and_stem_for_every_reader_and_writer():
    from LesionSegLib.data.volumes import volume_stem
    from LesionSegLib.fileio import split_extension, stem
    from LesionSegLib.inference.io import split_ext
    assert split_extension("Case7.Seg.NRRD") == ("Case7", ".seg.nrrd")
    assert split_extension("ct.NII.GZ") == ("ct", ".nii.gz") and split_extension("x.bmp") == ("x", ".bmp")
    assert split_extension("notes.v2.txt") == ("notes.v2", ".txt")
    assert split_ext("ct.nii.gz") == ("ct", ".nii.gz") and split_ext("a.seg.nrrd") == ("a.seg", ".nrrd")
    assert volume_stem(Path("p01_flair.nii.gz")) == "p01_flair" and stem(Path("p01.seg.nrrd")) == "p01"
