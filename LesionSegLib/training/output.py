"""What a run writes besides checkpoints (``log.csv``, ``curves.png``, JSON records) and
what it prints while it runs."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

from ..fileio import atomic_write_text

STATE_NAME = "training_state.pt"
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
LOG_NAME = "log.csv"
CURVES_NAME = "curves.png"


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def write_csv(path: Path, history: List[Dict[str, Any]]) -> None:
    import csv
    import io
    keys: List[str] = []
    for h in history:
        for k in h:
            if k not in keys:
                keys.append(k)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=keys)
    w.writeheader()
    for h in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})
    atomic_write_text(path, text.getvalue())


class Printer:
    """Progress output: tqdm when installed and writing to a terminal, plain lines else."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self._tqdm = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._tqdm = tqdm
            except ImportError:
                pass

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        if self._tqdm is not None:
            self.bar = self._tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False)

    def step(self, step: int, total: int, loss: float, lr: float, every: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
        elif self.enabled and every and (step % every == 0 or step == total):
            print(f"  step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}", flush=True)

    def line(self, line: str) -> None:
        """Close the progress bar (if any) and print one line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(line, flush=True)


def draw_curves(out: Path, history) -> None:
    try:
        from .plot import plot_curves
        plot_curves(history, out / CURVES_NAME)
    except Exception as e:  # a picture must never stop or fail a training run
        warnings.warn(f"could not draw {CURVES_NAME}: {e}")
