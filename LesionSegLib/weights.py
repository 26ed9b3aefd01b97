"""Installed network weights: list, import, download (SHA-256 verified), remove, clear.

Weights live in a cache folder, by default the user's cache directory
(``~/.cache/lesionseg`` on Linux, ``~/Library/Caches/lesionseg`` on macOS,
``%LOCALAPPDATA%\\lesionseg\\Cache`` on Windows, from platformdirs); set the environment variable
``LESIONSEG_CACHE`` to move it (a shared drive, a bigger disk, an offline copy). Layout::

    <cache>/weights/<model>/<name>.pt          the checkpoint (LesionSeg or official file)
    <cache>/weights/<model>/<name>.pt.json     what it is: model, preset, SHA-256, source, date

Rules the users of other AI extensions asked for:

* a download is always checked against the SHA-256 the caller gives, while it streams;
  a wrong or incomplete file is deleted and never installed;
* a file that is already installed (same SHA-256) is not downloaded or copied again;
* offline use: :func:`import_checkpoint` installs a file the user has (a copy; the
  user's file is never moved or changed);
* :func:`clear_cache` removes everything LesionSeg put there, and only that.

Importing this module does not import torch (Slicer loads it at startup); checking that a
file really is a usable checkpoint does, when it happens.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .fileio import atomic_write_text

ENV_VAR = "LESIONSEG_CACHE"
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class WeightsError(ValueError):
    """A weight file that cannot be installed or found, with the reason."""


@dataclass
class InstalledWeights:
    """One installed weight file and what it holds."""
    id: str                      # "<model>/<file name>", unique in the cache
    model: str                   # registry name
    preset: Optional[str]
    path: str
    sha256: str
    size: int
    kind: str                    # "lesionseg" checkpoint or "official" release
    source: str                  # URL, or the path it was imported from
    installed: str               # ISO date
    provenance: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        """Short text for a drop-down: file, preset, training metric if recorded."""
        bits = [Path(self.path).name]
        if self.preset:
            bits.append(self.preset)
        metric = self.provenance.get("best_metric") or self.provenance.get("metrics")
        if isinstance(metric, (int, float)):
            bits.append(f"{metric:.3f}")
        return " · ".join(bits)


# ----------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """The cache folder (``LESIONSEG_CACHE`` if set)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError:  # Slicer's Python has it only inside the pip it ships
        from pip._vendor import platformdirs
    # ~/.cache/lesionseg (XDG_CACHE_HOME respected), ~/Library/Caches/lesionseg, %LOCALAPPDATA%\lesionseg\Cache
    return Path(platformdirs.user_cache_dir("lesionseg", appauthor=False))


def weights_dir() -> Path:
    return cache_dir() / "weights"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")
    if not name:
        raise WeightsError("empty weight file name")
    return name


# ----------------------------------------------------------------------------- listing


def list_installed(model: Optional[str] = None) -> List[InstalledWeights]:
    """Installed weights, newest first, optionally of one model (any spelling the
    registry accepts). Entries whose file went missing are skipped."""
    root = weights_dir()
    if not root.is_dir():
        return []
    want = _resolve_model(model) if model else None
    found = []
    for meta in root.glob("*/*.json"):
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            entry = InstalledWeights(**{k: data[k] for k in InstalledWeights.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError):
            continue  # a damaged sidecar is not fatal for listing the others
        if not Path(entry.path).is_file():
            entry.path = str(meta.with_suffix(""))
            if not Path(entry.path).is_file():
                continue
        if want and entry.model != want:
            continue
        found.append(entry)
    return sorted(found, key=lambda e: (e.installed, e.id), reverse=True)


def find(model: str, preset: Optional[str] = None) -> Optional[InstalledWeights]:
    """The weights to use for ``model`` (and ``preset`` when given; weights that record no
    preset match any): the newest weights the user installed, else the weights shipped
    with LesionSeg (:func:`.releases.list_released`; their SHA-256 is checked before use); None when
    there are neither."""
    for entry in list_installed(model):
        if preset is None or entry.preset in (None, preset):
            return entry
    from .releases import find_released
    return find_released(model, preset)


def get(entry_id: str) -> InstalledWeights:
    for entry in list_installed():
        if entry.id == entry_id or entry.path == entry_id:
            return entry
    raise WeightsError(f"no installed weights {entry_id!r}; installed: "
                       f"{', '.join(e.id for e in list_installed()) or 'none'}")


def _resolve_model(name: str) -> str:
    from . import models
    return models.registry_name(name)


# ----------------------------------------------------------------------------- checking


def describe_checkpoint(path, model: Optional[str] = None) -> Dict[str, Any]:
    """What a weight file holds, by loading it the safe way (tensors only): ``{"model",
    "preset", "kind", "provenance"}``. Raises :class:`WeightsError` naming the file and
    the problem. Imports torch."""
    from . import checkpoint
    try:
        ck = checkpoint.load(path, model=model)   # builds the net: proves the weights fit it
    except checkpoint.CheckpointError as e:
        raise WeightsError(str(e)) from e
    if ck.kind == "backbone":
        raise WeightsError(f"{path}: is an ImageNet backbone ({ck.name}), not the weights of a segmentation "
                           "network; use it as 'pretrained' for training instead")
    preset = ck.card.get("preset") if isinstance(ck.card, dict) else None
    preset = preset.get("name") if isinstance(preset, dict) else preset
    return {"model": ck.name, "preset": preset or ck.provenance.get("preset"), "kind": ck.kind,
            "provenance": ck.provenance}


# ----------------------------------------------------------------------------- installing


def _install(tmp: Path, digest: str, size: int, name: str, source: str, model: Optional[str],
             preset: Optional[str], validate: bool) -> InstalledWeights:
    """Move a fully written temporary file into place with its sidecar."""
    try:
        for entry in list_installed():
            if entry.sha256 == digest:
                return entry   # already there: never a second copy
        if validate:
            try:
                info = describe_checkpoint(tmp, model)
            except WeightsError as e:   # name the user's file, not our temporary copy
                raise WeightsError(str(e).replace(str(tmp), source)) from None
        else:
            if not model:
                raise WeightsError("without validation the model name must be given")
            info = {"model": _resolve_model(model), "preset": preset, "kind": "unchecked", "provenance": {}}
        suffix = Path(name).suffix.lower()
        if suffix not in WEIGHT_SUFFIXES:
            name = f"{name}.pt"
        folder = weights_dir() / info["model"]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / _safe_name(name)
        stem, ext = target.stem, target.suffix
        n = 1
        while target.exists():   # a different file of the same name: keep both
            target = folder / f"{stem}-{n}{ext}"
            n += 1
        entry = InstalledWeights(
            id=f"{info['model']}/{target.name}", model=info["model"], preset=preset or info.get("preset"),
            path=str(target), sha256=digest, size=size, kind=info["kind"], source=source,
            installed=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            provenance=_jsonable(info.get("provenance") or {}))
        os.replace(tmp, target)
        _write_json(target.with_name(target.name + ".json"), entry.to_dict())
        return entry
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def _tmp_in_cache(prefix: str) -> Path:
    root = weights_dir()
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{prefix}.", suffix=".part", dir=str(root))
    os.close(fd)
    return Path(tmp)


def import_checkpoint(path, name: Optional[str] = None, model: Optional[str] = None,
                      preset: Optional[str] = None, validate: bool = True) -> InstalledWeights:
    """Install a weight file the user has (offline use): it is checked (it must load
    into its network), copied into the cache and listed. The original is not touched.
    ``model`` is needed only for plain state dicts that are not recognised."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise WeightsError(f"no such weight file: {src}")
    tmp = _tmp_in_cache(src.name)
    h = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            for block in iter(lambda: fin.read(CHUNK), b""):
                h.update(block)
                fout.write(block)
                size += len(block)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _install(tmp, h.hexdigest(), size, name or src.name, str(src.resolve()), model, preset, validate)


def _check_cancel(cancel) -> None:
    if cancel is None:
        return
    if hasattr(cancel, "raise_if_cancelled"):
        cancel.raise_if_cancelled()
    elif (callable(cancel) and cancel()) or getattr(cancel, "cancelled", False) is True:
        raise WeightsError("download cancelled")


def download(url: str, sha256: str, name: Optional[str] = None, model: Optional[str] = None,
             preset: Optional[str] = None, progress: Optional[Callable[[float, str], None]] = None,
             cancel=None, timeout: float = 60.0, validate: bool = True) -> InstalledWeights:
    """Download a weight file into the cache, verifying its SHA-256 while it streams.

    Nothing is installed unless every byte arrived and the digest matches ``sha256``;
    otherwise :class:`WeightsError` says which (the partial file is deleted). Weights
    already installed with that digest are returned without downloading.
    ``progress(fraction, message)``; ``cancel``: a CancelToken (or a callable returning
    True) checked between chunks."""
    expected = (sha256 or "").strip().lower()
    if not _SHA256.match(expected):
        raise WeightsError(f"a SHA-256 digest (64 hex digits) is required to download {url}; got {sha256!r}")
    for entry in list_installed():
        if entry.sha256 == expected:
            if progress:
                progress(1.0, f"already installed: {entry.id}")
            return entry
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("https", "http", "file"):
        raise WeightsError(f"unsupported URL scheme {scheme!r} in {url} (use https)")
    name = name or Path(urllib.request.url2pathname(url.split("?", 1)[0].rstrip("/"))).name or "weights.pt"
    tmp = _tmp_in_cache(name)
    h = hashlib.sha256()
    received = 0
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - scheme checked above
        except urllib.error.HTTPError as e:
            raise WeightsError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            raise WeightsError(f"download of {url} failed: {getattr(e, 'reason', e)}") from e
        with response, open(tmp, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            while True:
                _check_cancel(cancel)
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError) as e:   # connection dropped mid-file
                    raise WeightsError(f"download of {url} was interrupted after {received} bytes: {e}") from e
                if not block:
                    break
                h.update(block)
                out.write(block)
                received += len(block)
                if progress:
                    frac = min(received / total, 1.0) if total else 0.0
                    progress(frac * 0.95, f"downloading {name}: {received / 1e6:.1f} MB")
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise WeightsError(f"download of {url} is incomplete: {received} of {total} bytes")
        digest = h.hexdigest()
        if digest != expected:
            raise WeightsError(f"download of {url} does not match its SHA-256: expected {expected}, got {digest}; "
                               "the file was discarded")
        if progress:
            progress(0.97, f"checking {name}")
        entry = _install(tmp, digest, received, name, url, model, preset, validate)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        progress(1.0, f"installed {entry.id}")
    return entry


# ----------------------------------------------------------------------------- removing


def remove(entry_id: str) -> int:
    """Delete one installed weight file and its sidecar; returns the bytes freed."""
    entry = get(entry_id)
    path = Path(entry.path)
    freed = path.stat().st_size if path.exists() else 0
    path.unlink(missing_ok=True)
    Path(str(path) + ".json").unlink(missing_ok=True)
    return freed


def cache_size() -> int:
    root = weights_dir()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def clear_cache() -> int:
    """Delete every installed weight file (the ``weights`` folder of the cache, nothing
    else); returns the bytes freed."""
    root = weights_dir()
    if not root.is_dir():
        return 0
    freed = cache_size()
    shutil.rmtree(root)
    return freed
