"""Weights as the Slicer logic offers them: installed and shipped files, import,
download, and the one "no weights" check of the module and the effects."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .. import weights as _weights
from ..jobs import ProgressCallback
from .errors import LesionSegError


class WeightsLogic:
    """``LesionSegLogic``'s weights methods (mixed in)."""

    @staticmethod
    def weightsCacheDir() -> Path:
        """The weights cache (environment variable ``LESIONSEG_CACHE`` moves it)."""
        return _weights.cache_dir()

    @staticmethod
    def installedWeights(model: Optional[str] = None) -> List[_weights.InstalledWeights]:
        return _weights.list_installed(model)

    @staticmethod
    def importCheckpoint(path, name: Optional[str] = None, model: Optional[str] = None,
                         preset: Optional[str] = None) -> _weights.InstalledWeights:
        """Install a weight file the user has (offline use); the original is not touched."""
        return _weights.import_checkpoint(path, name=name, model=model, preset=preset)

    @staticmethod
    def downloadWeights(url: str, sha256: str, name: Optional[str] = None, model: Optional[str] = None,
                        preset: Optional[str] = None, progress: Optional[ProgressCallback] = None, cancel=None) -> _weights.InstalledWeights:
        """Download weights into the cache; refused unless the SHA-256 matches."""
        return _weights.download(url, sha256, name=name, model=model, preset=preset, progress=progress, cancel=cancel)

    @staticmethod
    def removeWeights(entry_id: str) -> int:
        return _weights.remove(entry_id)

    @staticmethod
    def clearWeightsCache() -> int:
        """Delete all installed weights; returns the bytes freed."""
        return _weights.clear_cache()

    @staticmethod
    def resolveCheckpoint(model: str, checkpoint=None, preset: Optional[str] = None) -> Optional[str]:
        """The weight file to use: ``checkpoint`` (a path, or an installed entry's id), else
        the newest installed or the shipped weights of ``model`` for ``preset``; None when
        there are none (:func:`LesionSegLib.resolver.choose_weights`)."""
        from .. import models, resolver
        try:
            return resolver.choose_weights(model, preset, checkpoint, allow_random=True).path
        except (_weights.WeightsError, models.UnknownModelError, models.UnknownPresetError) as e:
            raise LesionSegError(str(e)) from None

    def requireWeights(self, model: str, checkpoint=None, preset: Optional[str] = None,
                       allowRandomWeights: bool = False) -> Optional[str]:
        """The weight file a run will use, or a :class:`LesionSegError` saying that none is
        installed and what to do (the one "no weights" check of the module and effects)."""
        path = self.resolveCheckpoint(model, checkpoint, preset)
        if path is None and not allowRandomWeights:
            from .. import models
            name = models.card(model)["display_name"]
            raise LesionSegError(
                f"no weights installed for {name}"
                + (f" ({preset})" if preset else "")
                + ": import a checkpoint file or download weights in the LesionSeg module (Weights section), "
                  "or train the network on your own cases")
        return path

    @staticmethod
    def weightsChoices(model: str, preset: Optional[str] = None) -> List[tuple]:
        """(label, value) items of a weights selector: "newest installed" (value "") and
        the installed weights of ``model`` usable with ``preset``."""
        entries = [e for e in _weights.list_installed(model) if e.preset in (None, preset)]
        items = [("newest installed" if entries else "(no weights installed: see the LesionSeg module)", "")]
        return items + [(e.label, e.id) for e in entries]

    @staticmethod
    def weightsFileFilter() -> str:
        """File-dialog filter for importing weights (``.safetensors`` only when the
        safetensors package is installed)."""
        import importlib.util
        patterns = ["*.pt", "*.pth", "*.ckpt"]
        if importlib.util.find_spec("safetensors") is not None:
            patterns.append("*.safetensors")
        return f"Weights ({' '.join(patterns)});;All files (*)"
