"""Shared helpers of the training tests: tiny synthetic image/mask folders written as real
PNG files, and a trainer run that records every step's loss."""
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LesionSegLib import models


def smallest_size(name: str) -> int:
    inp = models.preset(name)["input"]
    div = int(inp.get("size_divisor", 1))
    low = max(int(inp.get("min_size", 1)), 64)
    return -(-low // div) * div


def write_folder(root: Path, n: int, size: int, channels: int, prefix: str = "p") -> Path:
    """``n`` images with a bright disc lesion and its mask, in ``root/{images,masks}``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2
        img = (60 + 40 * rng.random((size, size)) + 120 * m).astype(np.uint8)
        arr = img if channels == 1 else np.stack([img, img // 2 + 30, 255 - img], -1)
        sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=channels != 1), str(root / "images" / f"{prefix}{i}_{i}.png"))
        sitk.WriteImage(sitk.GetImageFromArray((m * 255).astype(np.uint8)), str(root / "masks" / f"{prefix}{i}_{i}.png"))
    return root


def overfit(name: str, tmp_path: Path, steps: int, batch: int = 2, size: int = None, **overrides):
    """Train ``name`` for ``steps`` optimiser steps on ``batch`` fixed images (no
    augmentation, no validation) with its recipe, and return the per-step losses."""
    from LesionSegLib.training import train
    size = size or smallest_size(name)
    data = write_folder(tmp_path / "data", batch, size, int(models.preset(name)["input"]["channels"]))
    ov = {"epochs": 1, "batch_size": batch, "epoch_length": batch * steps, "val_fraction": 0, "size": [size, size],
          "multiscale": None, "augment": None, "checkpoint_every_steps": 0, "accumulate": 1}
    ov.update(overrides)
    losses = []

    def progress(epoch, step, total, metrics):
        if "val_dice" not in metrics and "train_loss" not in metrics:
            losses.append(metrics["loss"])
    result = train(name, data, tmp_path / "run", recipe_overrides=ov, progress=progress)
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    return losses, result
