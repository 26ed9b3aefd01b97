"""What the Slicer module and effects rely on that can be checked without the Slicer
application: effect parameters Slicer sees as defined, the torch requirement and its
install guard, the self-tests' torch guards (ctest calls test_* methods directly), the
input selector, the source-checkout path set-up, the weights file filter, one logic
and one job path."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from LesionSegLib.slicer import EFFECTS, torchsupport
from LesionSegLib.slicer.logic import LesionSegLogic

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LesionSeg"
EFFECT_BASE = MODULE / "LesionSegEffects" / "AbstractLesionSegEffect.py"


# ----------------------------------------------------------------------------- parameters (finding 7)


def _strings_passed_to(path: Path, method: str):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == method and n.args \
                and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str):
            out.add(n.args[0].value)
    return out


@pytest.mark.parametrize("model", [e[0] for e in EFFECTS])
def test_every_effect_parameter_has_a_default_that_slicer_counts_as_defined(model):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    defaults = LesionSegLogic.effectParameterDefaults(model)
    # every parameter the effect reads or writes has a default
    used = (_strings_passed_to(EFFECT_BASE, "setParameter") | _strings_passed_to(EFFECT_BASE, "_param")
            | {k for k in ("Checkpoint", "Segments", "Preset", "Threshold")})
    assert used <= set(defaults), used - set(defaults)
    # stored as the effect stores them (attributes "<effect name>.<parameter>" of the editor
    # node), each is defined the way Slicer's commonParameterDefined decides: a non-empty value
    node = slicer.vtkMRMLSegmentEditorNode()
    name = next(e[2] for e in EFFECTS if e[0] == model)
    for key, value in defaults.items():
        node.SetAttribute(f"{name}.{key}", value)
    for key in defaults:
        value = node.GetAttribute(f"{name}.{key}")
        assert value is not None and len(value) > 0, key
    # the defaults mean "newest weights, card threshold, all classes"
    options = LesionSegLogic.effectOptions(model, lambda k: node.GetAttribute(f"{name}.{k}"))
    assert options["checkpoint"] is None and options["threshold"] is None and options["classes"] is None
    assert options["seedThreshold"] is None          # the card's threshold comes with the weights' rules
    node.SetAttribute(f"{name}.UseCardThreshold", "0")
    node.SetAttribute(f"{name}.Threshold", "0.3")
    own = LesionSegLogic.effectOptions(model, lambda k: node.GetAttribute(f"{name}.{k}"))
    assert own["threshold"] == 0.3 and own["seedThreshold"] == 0.0   # the user's threshold alone decides
    assert options["preset"] in LesionSegLogic.presets(model)
    # the effect never reads a parameter without checking that it is defined
    text = EFFECT_BASE.read_text(encoding="utf-8")
    assert text.count(".parameter(") == 1 and "parameterDefined(name)" in text


# ----------------------------------------------------------------------------- torch (finding 6)


def test_torch_requirement_is_one_minimum_checked_by_version():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"torch{torchsupport.TORCH_REQUIREMENT}"' in pyproject
    assert torchsupport.TORCH_REQUIREMENT == ">=" + ".".join(map(str, torchsupport.TORCH_MINIMUM))
    assert torchsupport.TORCH_MINIMUM >= (2, 4)
    assert torchsupport.torch_problem(None) == torchsupport.NOT_INSTALLED
    old = torchsupport.torch_problem("2.1.2+cu118")
    assert "2.1.2+cu118" in old and "2.4 or newer" in old and "PyTorch extension" in old and "\n" not in old
    for ok in ("2.4.0", "2.4.1+cpu", "2.13.0", "3.0.0a0"):
        assert torchsupport.torch_problem(ok) is None, ok
    assert "unreadable" in torchsupport.torch_problem("garbage")
    # the installed one (read from its metadata, torch not imported) is usable
    assert torchsupport.installed_torch_problem() is None
    module = (MODULE / "LesionSeg.py").read_text(encoding="utf-8")
    assert "torchVersionRequirement=torchsupport.TORCH_REQUIREMENT" in module


def test_only_one_torch_installation_runs_at_a_time():
    guard = torchsupport.OneAtATime("installing PyTorch")
    entered, release, seen = threading.Event(), threading.Event(), []

    def first():
        with guard.attempt() as allowed:
            seen.append(("first", allowed))
            entered.set()
            release.wait(10)
    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(10)
    with guard.attempt() as allowed:   # a second click while the first install runs
        seen.append(("second", allowed))
    release.set()
    t.join()
    with guard.attempt() as allowed:   # afterwards, installing is possible again
        seen.append(("third", allowed))
    assert seen == [("first", True), ("second", False), ("third", True)]
    assert "_torchInstall.attempt()" in (MODULE / "LesionSeg.py").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- self-tests (finding 3)


def _test_methods(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Test")):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
            yield cls.name, fn


def _guarded(fn) -> bool:
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            and not isinstance(s, (ast.Import, ast.ImportFrom))]
    first = ast.unparse(body[0]) if body else ""
    return first == "self.requireTorch()" or ("torchAvailable()" in first and "skipTest" in first)


@pytest.mark.parametrize("path", [MODULE / "LesionSegUI" / "selftest.py",
                                  MODULE / "Testing" / "Python" / "LesionSegWidgetTest.py"],
                         ids=lambda p: p.name)
def test_every_self_test_that_needs_torch_guards_itself(path):
    """ctest runs each test_* method on its own, never runTest: a torch guard in runTest
    is skipped there. Tests that run networks must check for torch first; the others
    must not touch weights or networks."""
    methods = list(_test_methods(path))
    assert methods
    for cls, fn in methods:
        source = ast.unparse(fn)
        runs_network = any(w in source for w in ("checkpoint", "onApply", "onSegment", ".segment(", "predict("))
        if runs_network:
            assert _guarded(fn), f"{cls}.{fn.name} runs a network without checking for torch first"


# ----------------------------------------------------------------------------- input selector (finding 5)


def test_module_input_selector_offers_colour_photographs():
    tree = ET.parse(MODULE / "Resources" / "UI" / "LesionSeg.ui")
    widget = next(w for w in tree.iter("widget") if w.get("name") == "inputVolumeSelector")
    types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
    children = [p.find("bool").text for p in widget.findall("property") if p.get("name") == "showChildNodeTypes"]
    assert "vtkMRMLVectorVolumeNode" in types and "vtkMRMLScalarVolumeNode" in types
    assert children == ["false"]   # label maps stay out; vector volumes are listed explicitly


# ----------------------------------------------------------------------------- no-build set-up (finding 12)


def test_source_checkout_module_path_puts_lesionseglib_on_sys_path(tmp_path):
    """Only SlicerLesionSeg/LesionSeg added as a module path: the module's own start-up
    code makes LesionSegLib (in the folder above) importable."""
    tree = ast.parse((MODULE / "LesionSeg.py").read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_addLibraryToPath")
    assert any(isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "")
               == "_addLibraryToPath" for n in tree.body[:tree.body.index(fn) + 3])
    code = "\n".join([
        "import os, sys",
        f"sys.path = [p for p in sys.path if os.path.abspath(p or '.') != {str(ROOT)!r}]",
        f"__file__ = {str(MODULE / 'LesionSeg.py')!r}",
        "import importlib.util",
        "assert importlib.util.find_spec('LesionSegLib') is None, 'LesionSegLib importable before'",
        ast.unparse(fn),
        "_addLibraryToPath()",
        "import LesionSegLib",
        "print(LesionSegLib.__file__)"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # a Python without the editable install: the interpreter's base, no site-packages
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                         env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "LesionSegLib" / "__init__.py")


def test_weights_dialog_offers_safetensors_only_when_it_can_be_read(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "safetensors" else real(name, *a))
    assert "*.safetensors" not in LesionSegLogic.weightsFileFilter()
    assert "*.pt" in LesionSegLogic.weightsFileFilter() and "*.pth" in LesionSegLogic.weightsFileFilter()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert ("*.safetensors" in LesionSegLogic.weightsFileFilter()) == (real("safetensors") is not None)
    for path in (MODULE / "LesionSeg.py", EFFECT_BASE):
        assert "*.safetensors" not in path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- one logic, one job path (13)


def test_one_logic_and_one_job_path_in_the_module_and_effects():
    # the module file and its parts (LesionSegUI/: panel sections, job polling, self-test)
    module = "\n".join(p.read_text(encoding="utf-8") for p in [MODULE / "LesionSeg.py",
                                                               *sorted((MODULE / "LesionSegUI").glob("*.py"))])
    effect = EFFECT_BASE.read_text(encoding="utf-8")
    for text in (module, effect):
        assert "BackgroundJob" not in text and "threading" not in text and "QTimer()" not in text.replace(
            "self.timer = qt.QTimer()", "")
        assert "weightsFileFilter()" not in text or text is module
        assert "no weights" not in text.lower()   # the logic says it (requireWeights)
    # the logic is made once (sharedLogic) and the effects use it
    assert "_sharedLogic = LesionSegLogic()" in module and "self.logic = LesionSegLogic()" not in module
    assert "LesionSegLogic(" not in effect.replace("LesionSegLogic.", "")
    assert "self.logic = sharedLogic()" in module and "LesionSeg.sharedLogic()" in effect
    # jobs are polled in one place
    jobs = (MODULE / "LesionSegUI" / "jobs.py").read_text(encoding="utf-8")
    assert jobs.count("class JobPoller") == 1 and "JobPoller = _jobs.JobPoller" in module and "LesionSeg.JobPoller(" in effect
    for starter in ("startSegmentJob", "startBatchJob", "startTrainJob", "startDownloadJob"):
        assert f"self.logic.{starter}" in module
    # the logic holds no HTML
    logic_source = (ROOT / "LesionSegLib" / "slicer" / "logic.py").read_text(encoding="utf-8")
    assert "<p>" not in logic_source and "html" not in logic_source.lower()
    # workers stop when Slicer quits
    assert 'slicer.app.connect("aboutToQuit()", stopWorkers)' in module
