"""What :func:`LesionSegLib.training.train` returns (no torch import here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class TrainingError(RuntimeError):
    """A training run that cannot start or continue, with the reason."""


@dataclass
class TrainResult:
    """``best_checkpoint`` / ``last_checkpoint``: paths of the LesionSeg checkpoints
    (``best`` is None when no epoch finished); ``history``: one dict per epoch (the rows
    of ``log.csv``). Also: ``state_checkpoint`` (resumable state), ``out_dir``,
    ``stopped_early``, and ``model`` (the trained network in memory, this process's copy)."""
    best_checkpoint: Optional[str]
    last_checkpoint: Optional[str]
    history: List[Dict[str, Any]] = field(default_factory=list)
    state_checkpoint: Optional[str] = None
    out_dir: Optional[str] = None
    stopped_early: bool = False
    model: Any = field(default=None, repr=False)
