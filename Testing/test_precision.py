"""Precision on the CPU: the choice (bf16 only where the CPU computes it natively, fp32
elsewhere, the same for training), int8 through onnxruntime with its cache and agreement
record, and the agreement of lower precisions with fp32 on a real case (the demo MSE-Net on
the shipped ISLES'22 DWI). No speed is asserted: docs/performance.md has the measurements."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from LesionSegLib.inference import agreement as ag
from LesionSegLib.inference import quantization as q
from LesionSegLib.inference import runtime

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo" / "model" / "msenet-demo-isles-dwi.pt"
DEMO_DWI = ROOT / "demo" / "data" / "isles22-sub-strokecase0009-dwi.nii.gz"
CPU = torch.device("cpu")

AMX = {"amx_bf16": True, "avx512_bf16": True, "vnni": True, "avx512": True, "avx2": True, "native_bf16": True}
AVX2 = {"amx_bf16": False, "avx512_bf16": False, "vnni": False, "avx512": False, "avx2": True, "native_bf16": False}
VNNI = dict(AVX2, vnni=True, avx512=True)


def test_auto_precision_on_the_cpu_is_bf16_only_with_native_bf16():
    assert runtime.select_precision("auto", CPU, features=AMX) == ("bf16", torch.bfloat16)
    assert runtime.select_precision("auto", CPU, features=AVX2) == ("fp32", None)
    assert runtime.select_precision("auto", CPU, features=VNNI) == ("fp32", None)
    # explicit choices are not second-guessed
    assert runtime.select_precision("bf16", CPU, features=AVX2) == ("bf16", torch.bfloat16)
    assert runtime.select_precision("fp32", CPU, features=AMX) == ("fp32", None)
    assert runtime.select_precision("int8", CPU) == ("int8", None)
    with pytest.raises(ValueError, match="CPU only"):
        runtime.select_precision("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="int8"):
        runtime.select_precision("int4", CPU)


def test_detection_is_this_cpu_and_training_follows_it():
    f = runtime.cpu_features()
    assert f["native_bf16"] == (f["amx_bf16"] or f["avx512_bf16"])
    flags = runtime._proc_cpu_flags()
    if flags:  # Linux: PyTorch's cpuinfo agrees with the kernel's flags
        assert f["avx2"] == ("avx2" in flags)
        assert f["avx512_bf16"] == ("avx512_bf16" in flags)
    want = "bf16" if f["native_bf16"] else "fp32"
    assert runtime.select_precision("auto", CPU)[0] == want
    from LesionSegLib.training.optim import autocast_choice
    assert autocast_choice("auto", CPU) == (torch.bfloat16 if f["native_bf16"] else None, False)
    assert autocast_choice("bf16", CPU) == (torch.bfloat16, False) and autocast_choice(False, CPU) == (None, False)


def _record(dice, mismatches=0):
    return {"precision_agreement": {"bf16": {"dice": dice, "min_dice": dice, "count_mismatches": mismatches,
                                             "images": 8}}}


def test_auto_keeps_fp32_for_weights_whose_bf16_masks_disagree():
    bf16 = ("bf16", torch.bfloat16)
    assert runtime.keep_masks(bf16, "auto", CPU, None) == ("bf16", torch.bfloat16, "")
    assert runtime.keep_masks(bf16, "auto", CPU, _record(0.995)) == ("bf16", torch.bfloat16, "")
    name, dtype, why = runtime.keep_masks(bf16, "auto", CPU, _record(0.97))
    assert (name, dtype) == ("fp32", None) and "0.970" in why and "precision='bf16'" in why
    assert runtime.keep_masks(bf16, "auto", CPU, _record(0.999, mismatches=1))[0] == "fp32"
    # a release file without a record has not shown that bf16 keeps its masks
    name, dtype, why = runtime.keep_masks(bf16, "auto", CPU, {"release": {"data": "x"}})
    assert (name, dtype) == ("fp32", None) and "not been compared" in why
    assert runtime.keep_masks(bf16, "auto", CPU, dict(_record(0.995), release={"data": "x"}))[0] == "bf16"
    # an explicit choice is the user's, and GPUs are not judged by a CPU record
    assert runtime.keep_masks(bf16, "bf16", CPU, _record(0.5))[0] == "bf16"
    assert runtime.keep_masks(bf16, "auto", torch.device("cuda"), _record(0.5))[0] == "bf16"


def test_predictor_auto_reads_the_agreement_record_of_its_weights(tmp_path, monkeypatch):
    """On a CPU with native bf16 (simulated), the Predictor's auto precision is bf16 for
    weights without a record or with a passing one, fp32 for weights whose record fails."""
    from LesionSegLib import checkpoint, models
    from LesionSegLib.inference import Predictor
    monkeypatch.setattr(runtime, "cpu_autocast_dtype", lambda features=None: torch.bfloat16)
    net = models.create("unet", base_width=4, depth=2)
    plain = checkpoint.save(tmp_path / "plain.pt", net, config={"base_width": 4, "depth": 2})
    good = checkpoint.save(tmp_path / "good.pt", net, config={"base_width": 4, "depth": 2}, provenance=_record(0.995))
    bad = checkpoint.save(tmp_path / "bad.pt", net, config={"base_width": 4, "depth": 2}, provenance=_record(0.9))
    assert Predictor(str(plain), device="cpu").precision == "bf16"
    assert Predictor(str(good), device="cpu").precision == "bf16"
    p = Predictor(str(bad), device="cpu")
    assert p.precision == "fp32" and "0.900" in p.precision_message
    assert Predictor(str(bad), device="cpu", precision="bf16").precision == "bf16"


def test_int8_format_keeps_7_bit_weights_without_vnni():
    assert q.int8_format(AVX2)["reduce_range"] is True
    assert q.int8_format(VNNI)["reduce_range"] is False and q.int8_format(AMX)["reduce_range"] is False
    assert q.int8_format(AVX2)["tag"] != q.int8_format(VNNI)["tag"]  # different cache entries


def test_compare_masks_dice_and_lesion_counts():
    a = np.zeros((1, 20, 20), bool)
    a[0, 2:6, 2:6] = True                                    # one lesion of 16
    same = ag.compare_masks([a], [a.copy()])
    assert same["dice"] == 1.0 and same["count_mismatches"] == 0 and same["lesions"] == 1
    b = a.copy()
    b[0, 4, 2:6] = False                                     # split in two, 12 pixels
    rep = ag.compare_masks([a, a], [a, b])
    assert rep["dice"] == pytest.approx(2 * (16 + 12) / (32 + 28))
    assert rep["min_dice"] == pytest.approx(24 / 28) and rep["count_mismatches"] == 1
    assert not ag.agrees(rep) and ag.agrees(same)
    empty = np.zeros((1, 5, 5), bool)
    assert ag.compare_masks([empty], [empty])["dice"] == 1.0
    logits = np.array([[[[-1.0, 0.5]]]], np.float32)        # sigmoid threshold 0.5 ⇔ logit 0
    card = {"outputs": {"activation": "sigmoid", "threshold": 0.5}}
    assert ag.masks_from_logits(logits, card).tolist() == [[[[False, True]]]]


@pytest.mark.skipif(not (DEMO_MODEL.is_file() and DEMO_DWI.is_file()), reason="demo weights or DWI absent")
def test_int8_and_bf16_agree_with_fp32_on_the_demo_stroke_case(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import SimpleITK as sitk
    from LesionSegLib.inference import Predictor
    dwi = sitk.ReadImage(str(DEMO_DWI))[:, :, 33:47]          # 14 slices through the infarct
    cache = tmp_path / "int8"
    with pytest.raises(q.QuantizationError, match="calibration"):
        Predictor(str(DEMO_MODEL), device="cpu", precision="int8", cache_dir=cache).predict_volume(dwi)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = ag.agreement(str(DEMO_MODEL), [dwi], ("int8", "bf16"), calibration=[dwi], cache=cache)
    assert rep["fp32"]["seconds"] > 0
    for p in ("int8", "bf16"):
        assert rep[p]["images"] == 1 and rep[p]["lesions"] > 0
        # measured on this case: int8 Dice ≈ 0.97, bf16 ≈ 0.99+; far from chance either way
        assert rep[p]["dice"] > 0.9, rep
    # the cache: one graph and its record, keyed by weights' SHA-256, shape and calibration
    (graph,) = cache.glob("msenet-*-1x112x112-*.onnx")
    import json
    record = json.loads(graph.with_suffix(".json").read_text())
    assert len(record["weights_sha256"]) == 64 and record["input"] == [1, 112, 112]
    assert record["format"]["reduce_range"] == q.int8_format()["reduce_range"]
    held = record["agreement"]
    assert held["images"] == record["calibration"]["held_out"] > 0
    assert rep["int8"]["held_out"]["1x112x112"] == held
    # a warning exactly where the held-out agreement is below the bar (agreement() itself
    # reports instead of warning; a Predictor loading the cached graph warns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p8 = Predictor(str(DEMO_MODEL), device="cpu", precision="int8", cache_dir=cache)  # from the cache
        assert p8.precision == "int8" and p8.backend == "onnxruntime"
        masks = ag.prediction_masks(p8, dwi)
    assert any(issubclass(w.category, ag.PrecisionWarning) for w in caught) == (not ag.agrees(held))
    assert p8.runner.session.records[(1, 112, 112)]["cache_file"] == str(graph)
    ref = ag.prediction_masks(Predictor(str(DEMO_MODEL), device="cpu", precision="fp32"), dwi)
    again = ag.compare_masks([ref], [masks])
    assert again["dice"] == pytest.approx(rep["int8"]["dice"])      # the cached graph is the same graph
