"""Training-curve PNG: matplotlib when installed, else a small numpy raster (Slicer's
Python has no matplotlib), so that every run leaves a picture of its curves; the numbers
are in ``log.csv``. PNG files are written by SimpleITK.

The fallback draws two panels: losses (train: blue, validation: orange) on the left,
scaled to their own range, and validation Dice (green) and IoU (purple) on [0, 1] on the
right, with grid lines at quarter steps; it has no text (the ranges are in ``log.csv``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..fileio import atomic_path

COLORS = {"train_loss": (31, 119, 180), "val_loss": (255, 127, 14), "val_dice": (44, 160, 44),
          "val_iou": (148, 103, 189)}


def write_png(path, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 array as an RGB PNG (atomically, read back before use)."""
    import SimpleITK as sitk
    from ..inference.io import write_image
    return write_image(sitk.GetImageFromArray(np.ascontiguousarray(rgb, dtype=np.uint8), isVector=True), path)


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    h, w, _ = img.shape
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            xx, yy = np.clip(xs + dx, 0, w - 1), np.clip(ys + dy, 0, h - 1)
            img[yy, xx] = color


def _panel(img, box, series: Dict[str, List[Optional[float]]], lo: float, hi: float, n_epochs: int) -> None:
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    for k in range(5):  # grid at quarter steps
        y = int(y1 - (y1 - y0) * k / 4)
        img[y, x0:x1] = (225, 225, 225)
    img[y0:y1, x0] = img[y1 - 1, x0:x1] = (0, 0, 0)
    span = (hi - lo) or 1.0
    for name, values in series.items():
        pts = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        color = COLORS.get(name, (0, 0, 0))

        def xy(i, v):
            return (x0 + (x1 - x0 - 1) * (i / max(1, n_epochs - 1)), y1 - 1 - (y1 - y0 - 1) * (v - lo) / span)
        for (ia, va), (ib, vb) in zip(pts, pts[1:]):
            _line(img, *xy(ia, va), *xy(ib, vb), color)
        if len(pts) == 1:
            _line(img, *xy(*pts[0]), *xy(*pts[0]), color, width=5)


def plot_curves(history: Sequence[Dict[str, float]], path) -> Path:
    """Write the training curves of ``history`` (one dict per epoch) to ``path``."""
    path = Path(path)
    keys_loss = [k for k in ("train_loss", "val_loss") if any(h.get(k) is not None for h in history)]
    keys_score = [k for k in ("val_dice", "val_iou") if any(h.get(k) is not None for h in history)]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # not installed (or no usable backend): numpy raster
        plt = None
    epochs = [h.get("epoch", i) + 1 for i, h in enumerate(history)]
    if plt is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        marker = "o" if len(history) == 1 else None
        for ax, keys in ((a, keys_loss), (b, keys_score)):
            for k in keys:
                ax.plot(epochs, [h.get(k) for h in history], label=k, color=[c / 255 for c in COLORS[k]], marker=marker)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if keys:
                ax.legend()
            if len(history) == 1:
                ax.set_xlim(0.5, 1.5)
        a.set_ylabel("loss")
        b.set_ylim(0, 1)
        b.set_ylabel("validation Dice / IoU")
        fig.tight_layout()
        with atomic_path(path, suffix=".tmp.png") as tmp:  # matplotlib picks the format by extension
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        return path
    h, w = 360, 900
    img = np.full((h, w, 3), 245, np.uint8)
    losses = [h_.get(k) for h_ in history for k in keys_loss if h_.get(k) is not None and math.isfinite(h_.get(k))]
    lo, hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(history), 1)
    _panel(img, (20, 20, 440, 320), {k: [h_.get(k) for h_ in history] for k in keys_loss}, lo, hi, n)
    _panel(img, (470, 20, 880, 320), {k: [h_.get(k) for h_ in history] for k in keys_score}, 0.0, 1.0, n)
    for i, k in enumerate(keys_loss + keys_score):  # legend swatches, in the documented colours
        img[335:345, 20 + i * 60:50 + i * 60] = COLORS[k]
    return write_png(path, img)
