"""The weights shipped with LesionSeg: ``weights/`` beside the package (the repository's
root, and where the Slicer extension installs it), described by ``manifest.json`` (file,
network, preset, SHA-256, size, card, held-out metrics), each file verified against it
before use. :func:`LesionSegLib.weights.find` falls back to these when the user has
installed none."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from .weights import InstalledWeights, WeightsError, sha256_file

RELEASE_ENV_VAR = "LESIONSEG_RELEASE_WEIGHTS"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lesionseg.release-manifest"
#: output rules a release may set beside its file (``with_release_outputs``)
RELEASE_OUTPUT_KEYS = ("threshold", "seed_threshold")
_digests: Dict[tuple, str] = {}


def release_dir() -> Path:
    """The folder of the weights shipped with LesionSeg: ``LESIONSEG_RELEASE_WEIGHTS`` if
    set, else ``weights/`` beside the LesionSegLib package (the repository's root, and
    where the Slicer extension installs it)."""
    env = os.environ.get(RELEASE_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "weights"


def release_manifest(folder=None) -> Dict[str, Any]:
    """The manifest of the shipped weights (``{"files": [...]}``; empty when there is none)."""
    path = Path(folder or release_dir()) / MANIFEST_NAME
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "version": 1, "files": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable manifest of the shipped weights ({e})") from None
    if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), list):
        raise WeightsError(f"{path}: not a LesionSeg weights manifest")
    return data


def list_released(model: Optional[str] = None) -> List[InstalledWeights]:
    """The shipped weights (``kind="release"``), in manifest order, optionally of one
    model. Files listed but absent are skipped (a checkout without them)."""
    folder = release_dir()
    from . import models
    want = models.registry_name(model) if model else None
    out = []
    for f in release_manifest(folder)["files"]:
        path = folder / f["file"]
        if not path.is_file() or (want and f["model"] != want):
            continue
        out.append(InstalledWeights(id=f"release/{f['file']}", model=f["model"], preset=f.get("preset"),
                                    path=str(path), sha256=f["sha256"], size=int(f["size"]), kind="release",
                                    source=str(folder / f.get("card", f["file"])), installed=f.get("date", ""),
                                    provenance={k: f[k] for k in ("metrics", "card", "training") if k in f}))
    return out


def find_released(model: str, preset: Optional[str] = None) -> Optional[InstalledWeights]:
    """The shipped weights of ``model`` for ``preset`` (None: the card's default preset
    first, else any), verified against the manifest's SHA-256 and size: a damaged or
    replaced file raises :class:`WeightsError` instead of being used."""
    entries = list_released(model)
    if preset is None and entries:
        from . import models
        default = models.card(entries[0].model).get("default_preset")
        entries = sorted(entries, key=lambda e: e.preset != default)
    for entry in entries:
        if preset is None or entry.preset in (None, preset):
            verify_release(entry)
            return entry
    return None


def shipped_entry(path) -> Optional[Dict[str, Any]]:
    """The manifest entry of ``path`` when it holds one of the shipped files, else None: a
    file in :func:`release_dir` listed under its name and of the listed size, or a file
    anywhere else (a downloaded or imported copy, a file the user moved) whose size and
    SHA-256 are those of a listed file. The release rules kept beside a file (output rules,
    precision agreement) belong to its bytes, not to where it lies."""
    path = Path(path)
    try:
        size = path.stat().st_size
        files = release_manifest()["files"]
        if path.resolve().parent == release_dir().resolve():
            entry = next((f for f in files if f["file"] == path.name), None)
            return entry if entry is not None and size == int(entry["size"]) else None
        same_size = [f for f in files if int(f["size"]) == size]
        if not same_size:
            return None
        digest = _digest(path)
        return next((f for f in same_size if f["sha256"] == digest), None)
    except (OSError, WeightsError):
        return None


def with_release_outputs(card: Dict[str, Any], entry: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``card`` with the output rules a release chose after training (the manifest entry's
    ``outputs``, e.g. a seed threshold picked on the validation split) over its preset's:
    the file itself is committed once and never rewritten, so such choices live beside it."""
    extra = {k: v for k, v in ((entry or {}).get("outputs") or {}).items() if k in RELEASE_OUTPUT_KEYS}
    if not extra or not isinstance(card.get("preset"), dict):
        return card
    card = copy.deepcopy(card)
    # resolver.network_card takes a checkpoint's outputs from its stored preset
    card["preset"]["outputs"] = dict(card["preset"].get("outputs", {}), **extra)
    return card


def no_weights_message(model: str, preset: Optional[str] = None) -> str:
    """Why there are no weights for ``model``/``preset``, and what can be done."""
    from . import models
    name = models.card(model)["display_name"]
    shipped = sorted({e.preset for e in list_released(model) if e.preset})
    there = (f"LesionSeg ships {name} weights for: {', '.join(shipped)}" if shipped
             else f"LesionSeg ships no {name} weights")
    return (f"no weights for {name}" + (f" ({preset})" if preset else "") + f"; {there}. Give a checkpoint "
            f"(--checkpoint FILE, or import one in Slicer's LesionSeg module), train one (lesionseg train), "
            f"or use --random-weights to test the pipeline")


def _digest(path) -> str:
    """SHA-256 of ``path``, remembered while its size and modification time stay the same:
    a release file of 60 MB is hashed once per process, not at every load."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def verify_release(entry: InstalledWeights) -> None:
    if os.stat(entry.path).st_size != entry.size or _digest(entry.path) != entry.sha256:
        raise WeightsError(f"{entry.path}: the shipped weights file is damaged or was replaced (its size or "
                           f"SHA-256 differs from {MANIFEST_NAME}); restore it from the LesionSeg release")
