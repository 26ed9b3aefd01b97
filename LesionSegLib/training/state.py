"""The resumable state of a run: its position and bookkeeping (:class:`RunState`), the RNG
states, and the reading of a saved ``training_state.pt``."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .result import TrainingError


def zero_acc() -> Dict[str, Any]:
    """Empty running sums of the training loss and its components."""
    return {"loss_sum": 0.0, "n": 0, "components": {}}


@dataclass
class RunState:
    """Where a run is and what it has seen; ``training_state.pt`` stores these fields under
    the same names (``run_acc`` summed over the ranks; ``elapsed`` the time used so far,
    ``elapsed_before`` when read back)."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_value: Optional[float] = None
    best_epoch: Optional[int] = None
    es_best: Optional[float] = None
    es_bad: int = 0
    run_acc: Dict[str, Any] = field(default_factory=zero_acc)
    elapsed_before: float = 0.0

    @classmethod
    def from_saved(cls, st: Dict[str, Any], rank: int) -> "RunState":
        """The state saved by rank 0; rank 0 saved the loss sums of all ranks, so the
        others continue from zero."""
        return cls(int(st["epoch"]), int(st["step_in_epoch"]), int(st["global_step"]), list(st["history"]),
                   st["best_value"], st["best_epoch"], st["es_best"], int(st["es_bad"]),
                   st["run_acc"] if rank == 0 else zero_acc(), float(st.get("elapsed", 0.0)))


def read_state(path: Path, name: str) -> Dict[str, Any]:
    """The saved training state of a ``name`` run, or a TrainingError that says why not."""
    if not path.is_file():
        raise TrainingError(f"{path.parent}: nothing to resume ({path.name} not found)")
    try:
        saved_state = torch.load(str(path), map_location="cpu", weights_only=True)
        saved_state["training_state"]["recipe"]["preset"], saved_state["training_state"]["seed"]
    except Exception as e:  # cut short, damaged, or not a training state at all
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            detail = "it holds Python objects, and LesionSeg never executes code from a file"
        raise TrainingError(f"{path}: not a readable training state ({detail}); restore it or "
                            f"start the run again in a new folder") from None
    if saved_state.get("model") != name:
        raise TrainingError(f"{path}: holds a {saved_state.get('model')!r} run, not {name!r}")
    return saved_state


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                     int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
