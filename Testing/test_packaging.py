"""Packaging of the Slicer extension: CMake lists against the files, ExtensionsIndex
metadata, icons, effect classes, no torch at startup, .ui files loaded by real Qt
(PySide6, offscreen) with every widget the Python code uses."""
from __future__ import annotations

import ast
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LesionSeg"
LIB = ROOT / "LesionSegLib"
EFFECTS_DIR = MODULE / "LesionSegEffects"

#: slicer-extension-catalog-entry-schema v1.0.2 (Slicer/Slicer:Schemas), additionalProperties false
CATALOG_FIELDS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                  "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
RESOURCE_SUFFIXES = (".png", ".svg", ".ui", ".json", ".txt", ".csv", ".qss")


# ----------------------------------------------------------------------------- CMake parsing


def _cmake_calls(path: Path):
    """(command, [arguments]) of a CMakeLists.txt (comments stripped, quotes removed;
    parentheses inside quoted arguments do not end a call)."""
    text = _strip_comments(path.read_text(encoding="utf-8"))
    for m in re.finditer(r"\b(\w+)\s*\(", text):
        if m.start() and text[m.start() - 1] in "${":
            continue
        depth, quoted, i = 1, False, m.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == '"':
                quoted = not quoted
            elif not quoted and ch == "(":
                depth += 1
            elif not quoted and ch == ")":
                depth -= 1
            i += 1
        body = text[m.end():i - 1]
        args = re.findall(r'"[^"]*"|[^\s"]+', body)
        yield m.group(1), [a.strip('"') for a in args]


def _strip_comments(text: str) -> str:
    """Remove CMake ``#`` comments, but not a ``#`` inside a quoted argument (URLs)."""
    out, quoted, comment = [], False, False
    for ch in text:
        if comment:
            if ch == "\n":
                comment = False
                out.append(ch)
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            comment = True
            continue
        out.append(ch)
    return "".join(out)


def _cmake_sets(path: Path, variables=None):
    variables = dict(variables or {})
    for cmd, args in _cmake_calls(path):
        if cmd.lower() == "set" and args:
            variables[args[0]] = [_expand(a, variables) for a in args[1:]]
    return variables


def _expand(value: str, variables) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), value)


def _listed_module_files():
    """Files of LesionSeg/ named in its CMakeLists (scripts, resources, unit-test scripts)."""
    listed = set()
    for cm in MODULE.rglob("CMakeLists.txt"):
        base = cm.parent
        variables = _cmake_sets(cm)
        for name in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
            listed |= {(base / v).resolve() for v in variables.get(name, [])}
        for cmd, args in _cmake_calls(cm):
            if cmd == "slicer_add_python_unittest" and "SCRIPT" in args:
                listed.add((base / _expand(args[args.index("SCRIPT") + 1], variables)).resolve())
    return listed


def _shipped(folder: Path):
    return {p.resolve() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".pyo"))
            and not p.name.startswith(".") and p.name != "CMakeLists.txt"}


def test_every_module_file_is_listed_in_cmake_and_every_listed_file_exists():
    listed, present = _listed_module_files(), _shipped(MODULE)
    missing = sorted(str(p.relative_to(ROOT)) for p in present - listed)
    absent = sorted(str(p.relative_to(ROOT)) for p in listed - present)
    assert not missing, f"files under LesionSeg/ not listed in its CMakeLists.txt: {missing}"
    assert not absent, f"CMakeLists.txt lists files that do not exist: {absent}"


def test_every_library_file_is_listed_in_cmake_and_every_listed_file_exists():
    variables = _cmake_sets(ROOT / "CMakeLists.txt")
    scripts = variables.get("LesionSegLib_PYTHON_SCRIPTS", [])
    resources = variables.get("LesionSegLib_PYTHON_RESOURCES", [])
    listed = {(LIB / f).resolve() for f in scripts + resources}
    present = _shipped(LIB)
    missing = sorted(str(p.relative_to(LIB)) for p in present - listed)
    absent = sorted(str(p.relative_to(LIB)) for p in listed - present)
    hint = " (run: python Utilities/update_cmake_lists.py)"
    assert not missing, f"LesionSegLib files not in CMakeLists.txt{hint}: {missing}"
    assert not absent, f"CMakeLists.txt lists LesionSegLib files that do not exist{hint}: {absent}"
    assert all(f.endswith(".py") for f in scripts)
    assert not [f for f in resources if f.endswith(".py")]
    # installed where Slicer's Python finds it, as a package beside the modules
    calls = dict(_cmake_calls(ROOT / "CMakeLists.txt"))
    args = calls["ctkMacroCompilePythonScript"]
    assert args[args.index("DESTINATION_DIR") + 1].endswith("${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/LesionSegLib")
    assert args[args.index("INSTALL_DIR") + 1] == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/LesionSegLib"
    assert args[args.index("SOURCE_DIR") + 1] == "${CMAKE_CURRENT_SOURCE_DIR}/LesionSegLib"


def test_extension_metadata_in_cmake():
    calls = list(_cmake_calls(ROOT / "CMakeLists.txt"))
    project = [a for c, a in calls if c == "project"]
    assert project == [["LesionSeg"]]
    meta = _cmake_sets(ROOT / "CMakeLists.txt")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key) and all(meta[key]), key
    assert meta["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert meta["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert meta["EXTENSION_ICONURL"][0].startswith("https://") and meta["EXTENSION_ICONURL"][0].endswith(".png")
    assert meta["EXTENSION_ICONURL"][0].endswith("/LesionSeg.png")
    assert all(u.startswith("https://") for u in meta["EXTENSION_SCREENSHOTURLS"][0].split())
    commands = [c for c, _ in calls]
    assert commands.index("find_package") < commands.index("add_subdirectory")
    assert ["LesionSeg"] in [a for c, a in calls if c == "add_subdirectory"]
    assert commands[-2:] == ["include", "include"]
    module_calls = list(_cmake_calls(MODULE / "CMakeLists.txt"))
    build = [a for c, a in module_calls if c == "slicerMacroBuildScriptedModule"][0]
    assert "WITH_GENERIC_TESTS" in build
    assert ["SCRIPT", "${MODULE_NAME}.py"] in [a for c, a in module_calls if c == "slicer_add_python_unittest"]


def test_catalog_entry_matches_schema_and_cmake():
    path = ROOT / "LesionSeg.json"
    raw = path.read_bytes()
    assert b"\r\n" not in raw, "the ExtensionsIndex CI requires LF line endings"
    entry = json.loads(raw)
    assert set(entry) <= CATALOG_FIELDS, f"fields not in the schema: {set(entry) - CATALOG_FIELDS}"
    assert CATALOG_REQUIRED <= set(entry)
    assert re.match(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                    r"slicer-extension-catalog-entry-schema-v1\.0\.[0-2]\.json#?$", entry["$schema"])
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"].startswith("https://") and entry["scm_url"].rstrip("/").split("/")[-1].startswith("Slicer")
    assert not path.stem.startswith("Slicer")   # the index forbids extension names starting with Slicer
    meta = _cmake_sets(ROOT / "CMakeLists.txt")
    assert entry.get("build_dependencies", []) == [d for d in meta["EXTENSION_DEPENDS"] if d != "NA"]
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5
    assert entry.get("scm_type", "git") in ("git", "local")
    assert (ROOT / "LICENSE").is_file() and "Apache License" in (ROOT / "LICENSE").read_text()


# ----------------------------------------------------------------------------- icons


def _png(path: Path):
    """(width, height, RGBA rows as bytes) of an 8-bit RGBA PNG, decoded by hand so the
    check needs no imaging library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        length, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if tag == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    return width, height, depth, ctype, raw


def _distinct_colours(path: Path) -> int:
    w, h, depth, ctype, raw = _png(path)
    assert depth == 8 and ctype == 6
    stride = 1 + 4 * w
    # filter type 0 rows only (our writer); count distinct opaque pixels
    rows = [raw[r * stride + 1:(r + 1) * stride] for r in range(h) if raw[r * stride] == 0]
    return len({row[i:i + 4] for row in rows for i in range(0, len(row), 4)})


def test_icons_are_real_images():
    w, h, *_ = _png(ROOT / "LesionSeg.png")
    assert (w, h) == (128, 128)
    assert _distinct_colours(ROOT / "LesionSeg.png") > 50
    assert (MODULE / "Resources" / "Icons" / "LesionSeg.png").read_bytes() == (ROOT / "LesionSeg.png").read_bytes()
    effect_icons = {p.stem: p for p in (MODULE / "Resources" / "Icons").glob("SegmentEditor*Effect.png")}
    assert sorted(effect_icons) == sorted(_effect_classes()[1])
    sizes = set()
    for p in effect_icons.values():
        w, h, *_ = _png(p)
        sizes.add((w, h))
        assert _distinct_colours(p) > 20, p
    assert len(sizes) == 1 and w == h >= 32
    assert len({p.read_bytes() for p in effect_icons.values()}) == len(effect_icons)   # one design each


# ----------------------------------------------------------------------------- effects


def _effect_classes():
    """({file: [class names]}, [registered effect class names]): classes read from the
    sources, the registered ones from the one list of the five effects."""
    from LesionSegLib.slicer import EFFECTS
    defined = {}
    for p in sorted(EFFECTS_DIR.glob("*.py")):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        defined[p.stem] = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    return defined, [cls for _model, cls, _name, _title in EFFECTS]


def test_effect_classes_end_in_effect_are_unique_and_match_their_files():
    from LesionSegLib import models
    from LesionSegLib.slicer import EFFECTS
    defined, registered = _effect_classes()
    classes = [c for names in defined.values() for c in names]
    assert all(c.endswith("Effect") for c in classes), classes
    assert len(classes) == len(set(classes))
    assert len(registered) == 5 and len(set(registered)) == 5
    for name in registered:
        # Slicer's setPythonSource derives the class name from the file name
        assert defined.get(name) == [name], f"{name}.py must define exactly class {name}"
    init = (EFFECTS_DIR / "__init__.py").read_text(encoding="utf-8")
    for name in registered:
        assert f"from .{name} import {name}" in init, f"{name} must be re-exported by LesionSegEffects"
    # the five effects are listed once: the effect files hold no network, name or title of their own
    for name in registered:
        tree = ast.parse((EFFECTS_DIR / f"{name}.py").read_text(encoding="utf-8"))
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
        attrs = {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert not attrs & {"MODEL", "EFFECT_NAME", "TITLE"}, f"{name} repeats what LesionSegLib.slicer.EFFECTS says"
        assert any(isinstance(n, ast.FunctionDef) and n.name == "clone" for n in cls.body), f"{name} needs clone()"
    names = [e[2] for e in EFFECTS]
    assert len(set(names)) == 5 and all(n.startswith("LesionSeg ") for n in names)
    assert sorted(models.registry_name(e[0]) for e in EFFECTS) == sorted(["msenet", "m2snet", "lseg", "bsnet", "mslkseg"])


def test_module_file_follows_scripted_module_conventions():
    tree = ast.parse((MODULE / "LesionSeg.py").read_text(encoding="utf-8"))
    classes = {n.name: [getattr(b, "id", getattr(b, "attr", None)) for b in n.bases]
               for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["LesionSeg"]
    assert "ScriptedLoadableModuleWidget" in classes["LesionSegWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["LesionSegLogic"]
    assert "ScriptedLoadableModuleTest" in classes["LesionSegTest"]
    text = (MODULE / "LesionSeg.py").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", registerEffects)' in text
    assert "pip_install" not in text   # torch comes from the PyTorch extension, with consent


# ----------------------------------------------------------------------------- no torch at startup


def _module_path(name: str):
    parts = name.split(".")
    if parts[0] == "LesionSegLib":
        base = ROOT.joinpath(*parts)
    elif parts[0] == "LesionSegEffects":
        base = EFFECTS_DIR.joinpath(*parts[1:])
    else:
        return None
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _file_scope_imports(path: Path, package: str):
    """Modules imported when ``path`` is imported: statements outside function bodies
    (class bodies and module-level if/try blocks run at import time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(nodes):
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(n, ast.Import):
                found.extend(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = package.split(".")
                    base = base[: len(base) - (n.level - 1)] if n.level > 1 else base
                    mod = ".".join(base + ([n.module] if n.module else []))
                    found.append(mod)
                    found.extend(f"{mod}.{a.name}" for a in n.names)
                else:
                    found.append(n.module)
                    found.extend(f"{n.module}.{a.name}" for a in n.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(n, field, None)
                if isinstance(child, list):
                    visit(child)
    visit(tree.body)
    return found


def _startup_imports(path: Path, package: str, seen=None):
    seen = set() if seen is None else seen
    out = set()
    for mod in _file_scope_imports(path, package):
        out.add(mod.split(".")[0])
        target = _module_path(mod)
        if target is not None and target not in seen:
            seen.add(target)
            pkg = mod if target.name == "__init__.py" else mod.rsplit(".", 1)[0]
            out |= _startup_imports(target, pkg, seen)
    return out


@pytest.mark.parametrize("path", sorted([MODULE / "LesionSeg.py"] + list(EFFECTS_DIR.glob("*.py"))),
                         ids=lambda p: p.name)
def test_no_torch_import_at_file_scope_in_what_slicer_loads(path):
    package = "LesionSegEffects" if path.parent == EFFECTS_DIR else ""
    roots = _startup_imports(path, package or path.stem)
    assert "torch" not in roots and "torchvision" not in roots, f"{path.name} imports torch at startup"
    assert roots & {"slicer", "qt"} or path.name == "__init__.py"


def test_library_imports_used_at_startup_do_not_load_torch():
    code = textwrap.dedent("""
        import sys
        import LesionSegLib, LesionSegLib.slicer.logic, LesionSegLib.slicer.bridge, LesionSegLib.weights
        import LesionSegLib.slicer.worker, LesionSegLib.slicer.cardhtml, LesionSegLib.slicer.torchsupport
        import LesionSegLib.models, LesionSegLib.inference
        from LesionSegLib.slicer.logic import LesionSegLogic
        LesionSegLogic.models(); LesionSegLogic.installedWeights(); LesionSegLogic.effectParameterDefaults("lseg")
        LesionSegLib.slicer.cardhtml.model_card_html("msenet"); LesionSegLogic.weightsChoices("msenet")
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
    """)
    env = dict(os.environ, LESIONSEG_CACHE=str(ROOT / ".pytest_cache" / "no-such-cache"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- .ui files

_UI_PROBE = textwrap.dedent("""
    import json, sys
    from PySide6.QtWidgets import QApplication, QWidget
    from PySide6.QtUiTools import QUiLoader
    app = QApplication([])
    stubs = [type(n, (QWidget,), {}) for n in
             ("qMRMLWidget", "ctkCollapsibleButton", "qMRMLNodeComboBox", "ctkPathLineEdit", "ctkSliderWidget")]
    result = {}
    for path in sys.argv[1:]:
        loader = QUiLoader()
        for s in stubs:
            loader.registerCustomWidget(s)
        try:
            widget = loader.load(path)
        except RuntimeError as e:
            widget = None
            error = f"{e}: {loader.errorString()}"
        else:
            error = loader.errorString()
        if widget is None:
            result[path] = {"error": error}
            continue
        children = {w.objectName(): type(w).__name__ for w in widget.findChildren(QWidget) if w.objectName()}
        children[widget.objectName()] = type(widget).__name__
        params = {w.objectName(): w.property("SlicerParameterName") for w in widget.findChildren(QWidget)
                  if w.property("SlicerParameterName")}
        result[path] = {"children": children, "params": params}
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def loaded_ui():
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is not installed (pip install PySide6-Essentials)")
    files = sorted(str(p) for p in (MODULE / "Resources" / "UI").glob("*.ui"))
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    # a separate process: a Qt crash must fail this test, not the whole session
    out = subprocess.run([sys.executable, "-c", _UI_PROBE, *files], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return {Path(k).name: v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def _attributes_used(path: Path, holder: str):
    """Names accessed as ``<holder>.<name>`` (e.g. self.ui.applyButton) in a source file."""
    text = path.read_text(encoding="utf-8")
    return set(re.findall(rf"\b{re.escape(holder)}\.([A-Za-z_]\w*)", text))


def test_ui_files_load_with_real_qt(loaded_ui):
    assert set(loaded_ui) == {"LesionSeg.ui", "LesionSegEffect.ui"}
    for name, info in loaded_ui.items():
        assert "error" not in info, f"{name}: {info.get('error')}"
    module = loaded_ui["LesionSeg.ui"]["children"]
    assert module["LesionSeg"] == "qMRMLWidget"
    assert module["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert loaded_ui["LesionSeg.ui"]["params"] == {"inputVolumeSelector": "inputVolume",
                                                   "outputSegmentationSelector": "outputSegmentation"}
    sections = {k for k, v in module.items() if v == "ctkCollapsibleButton"}
    assert {"segmentCollapsibleButton", "batchCollapsibleButton", "trainCollapsibleButton",
            "weightsCollapsibleButton", "modelCardCollapsibleButton"} <= sections


def test_every_widget_the_code_uses_exists_in_its_ui_file(loaded_ui):
    module_widgets = set(loaded_ui["LesionSeg.ui"]["children"])
    used = _attributes_used(MODULE / "LesionSeg.py", "self.ui") | _attributes_used(
        MODULE / "Testing" / "Python" / "LesionSegWidgetTest.py", "ui")
    used -= {"setMRMLScene"}
    assert used and not used - module_widgets, f"LesionSeg.ui lacks {sorted(used - module_widgets)}"
    effect_widgets = set(loaded_ui["LesionSegEffect.ui"]["children"])
    used = _attributes_used(EFFECTS_DIR / "AbstractLesionSegEffect.py", "self.w") | _attributes_used(
        EFFECTS_DIR / "AbstractLesionSegEffect.py", "w")
    assert used and not used - effect_widgets, f"LesionSegEffect.ui lacks {sorted(used - effect_widgets)}"


def test_malformed_ui_is_detected(tmp_path):
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is not installed")
    broken = tmp_path / "Broken.ui"
    text = (MODULE / "Resources" / "UI" / "LesionSegEffect.ui").read_text(encoding="utf-8")
    broken.write_text(text.replace("</widget>", "", 1), encoding="utf-8")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", _UI_PROBE, str(broken)], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0
    assert "error" in json.loads(out.stdout.strip().splitlines()[-1])[str(broken)]


def test_cmake_list_generator_is_in_sync():
    out = subprocess.run([sys.executable, str(ROOT / "Utilities" / "update_cmake_lists.py"), "--check"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_index_entry_format_screenshot_and_one_repository_url():
    """ExtensionsIndex format (2-space indent, one array item per line, LF, final
    newline); the screenshot is a file of this repository; every URL of the extension
    derives from the one intended public repository named in CMakeLists.txt."""
    raw = (ROOT / "LesionSeg.json").read_text(encoding="utf-8")
    assert raw == json.dumps(json.loads(raw), indent=2) + "\n"
    meta = _cmake_sets(ROOT / "CMakeLists.txt")
    (repo,) = meta["LESIONSEG_REPOSITORY"]
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", repo)
    assert json.loads(raw)["scm_url"] == f"https://github.com/{repo}"
    raw_prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    urls = meta["EXTENSION_ICONURL"] + " ".join(meta["EXTENSION_SCREENSHOTURLS"]).split()
    for url in urls:
        assert url.startswith(raw_prefix), url
        path = ROOT / url[len(raw_prefix):]
        assert path.is_file(), f"{url} names {path.relative_to(ROOT)}, which is not in the repository"
        w, h, *_ = _png(path)
        assert w >= 128 and h >= 128
    assert meta["EXTENSION_HOMEPAGE"][0].startswith(f"https://github.com/{repo}")
    # the documents name no other repository
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for found in re.findall(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?(?=[/#\s)`\"]|$)",
                                doc.read_text(encoding="utf-8")):
            if found.lower().startswith(("lesionseg/", "slicerlesionseg/")):
                assert found == repo, f"{doc.name} names {found}"


def test_shipped_weights_are_installed_where_the_library_looks_for_them():
    """release_dir() is ``weights/`` beside the LesionSegLib package; the extension installs
    LesionSegLib into the scripted-modules lib folder, so weights/ must go into that same
    folder, in the build tree and in the package."""
    import re
    from LesionSegLib import releases, weights
    text = (ROOT / "CMakeLists.txt").read_text()
    lib = re.search(r"INSTALL_DIR \$\{(\w+)\}/LesionSegLib", text).group(1)
    build = re.search(r"DESTINATION_DIR \$\{CMAKE_BINARY_DIR\}/\$\{(\w+)\}/LesionSegLib", text).group(1)
    assert re.search(rf"install\(DIRECTORY \$\{{CMAKE_CURRENT_SOURCE_DIR\}}/weights/\s+DESTINATION \$\{{{lib}\}}/weights\b", text)
    assert re.search(rf"file\(COPY \$\{{CMAKE_CURRENT_SOURCE_DIR\}}/weights/ DESTINATION \$\{{CMAKE_BINARY_DIR\}}/\$\{{{build}\}}/weights\)", text)
    package = Path(weights.__file__).resolve().parent
    assert releases.release_dir() == package.parent / "weights" or os.environ.get(releases.RELEASE_ENV_VAR)
