"""Learning-rate schedules of the recipes, as plain functions of the epoch.

Each schedule gives a factor applied to every parameter group's base lr at the start of
an epoch (``group["lr"] = group["initial_lr"] · factor``), so the state to save for
resuming is the epoch itself, plus the plateau reducer's counters.

* ``constant``;
* ``triangular`` (M2SNet): ``1 − |2(e+1)/(E+1) − 1|`` for epoch e of E (0-based): a linear
  warm-up to the peak in the middle of training and a linear decay;
* ``step``: ``gamma`` per milestone reached (``step_epochs``: a list of epochs, or an
  integer n for every n epochs);
* ``cosine``: linear warm-up over ``warmup_epochs``, then half a cosine to ``min_ratio``;
* ``poly``: ``(1 − e/E)^power``;
* ``plateau``: ``factor`` after ``patience`` epochs without improvement of ``monitor``
  by more than ``min_delta`` (1e-4), Keras ReduceLROnPlateau semantics (X-Net's recipe
  is Keras code): the lr drops on the ``patience``-th bad epoch and the count restarts.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional


class Schedule:
    def __init__(self, cfg: Optional[Dict[str, Any]], epochs: int):
        cfg = dict(cfg or {"name": "constant"})
        self.name = cfg.get("name", "constant")
        self.cfg = cfg
        self.epochs = int(epochs)
        # plateau state
        self.scale = 1.0
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def factor(self, epoch: int) -> float:
        c, e, n = self.cfg, int(epoch), self.epochs
        if self.name == "triangular":
            return 1.0 - abs(2.0 * (e + 1) / (n + 1) - 1.0)
        if self.name == "step":
            steps = c.get("step_epochs", [])
            gamma = float(c.get("gamma", 0.1))
            if isinstance(steps, int):
                return gamma ** (e // steps)
            return gamma ** sum(1 for s in steps if e >= int(s))
        if self.name == "cosine":
            warm = int(c.get("warmup_epochs", 0))
            floor = float(c.get("min_ratio", 0.0))
            if e < warm:
                return (e + 1) / (warm + 1)
            t = (e - warm) / max(1, n - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if self.name == "poly":
            return max(0.0, 1.0 - e / n) ** float(c.get("power", 0.9))
        if self.name == "plateau":
            return self.scale
        return 1.0

    @property
    def monitor(self) -> Optional[str]:
        return self.cfg.get("monitor", "val_loss") if self.name == "plateau" else None

    def observe(self, value: Optional[float]) -> bool:
        """End-of-epoch value of the plateau monitor; True when the lr was reduced."""
        if self.name != "plateau" or value is None or not math.isfinite(value):
            return False
        mode = self.cfg.get("mode", "min")
        delta = float(self.cfg.get("min_delta", 1e-4))
        better = self.best is None or (value < self.best - delta if mode == "min" else value > self.best + delta)
        if better:
            self.best, self.bad_epochs = value, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= int(self.cfg.get("patience", 3)):
            new = max(self.scale * float(self.cfg.get("factor", 0.1)), float(self.cfg.get("min_scale", 0.0)))
            reduced = new < self.scale
            self.scale = new
            self.bad_epochs = 0
            return reduced
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.best = state["best"]
        self.bad_epochs = int(state["bad_epochs"])


def apply_lr(optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
