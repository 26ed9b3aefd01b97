"""The trainer: :func:`train` runs a recipe on a data set and writes LesionSeg checkpoints.

Files in ``out_dir`` (only rank 0 writes):

* ``best.pt``  — weights of the epoch with the best ``best_monitor`` (validation Dice);
* ``last.pt``  — weights at the end of the last finished epoch;
* ``training_state.pt`` — everything needed to resume: weights, optimiser, schedule,
  AMP scaler, RNG states, the position in the epoch (written every
  ``checkpoint_every_steps`` optimiser steps and at each epoch end);
* ``log.csv``, ``curves.png``, ``recipe.json``, ``data.json``, ``tensorboard/`` (when
  TensorBoard is installed).

All checkpoint writes are atomic (temporary file, fsync, rename), so a run killed at any
moment leaves the previous files intact, and ``resume=True`` continues from the last
saved state with results bit-identical to an uninterrupted run on the same machine
(CPU; see docs/training.md for the conditions).
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .. import models
from .data_prep import PreparedData, class_suffixes, folder_items, prepare_data
from .distributed import DistEnv
from .loop import Trainer
from .model_setup import RunConfig, resolve_config
from .output import BEST_NAME, CURVES_NAME, LAST_NAME, LOG_NAME, STATE_NAME
from .recipes import load_recipe
from .result import TrainingError, TrainResult
from .state import RunState, seed_everything, read_state
from .validate import counts, dice_iou_channels, dice_iou_from_counts, predict_labels

__all__ = ["train", "Trainer", "RunConfig", "RunState", "PreparedData", "prepare_data", "folder_items",
           "class_suffixes", "counts", "dice_iou_from_counts", "dice_iou_channels", "predict_labels",
           "STATE_NAME", "BEST_NAME", "LAST_NAME", "LOG_NAME", "CURVES_NAME"]


def train(model_name: str, data, out_dir, preset: Optional[str] = None,
          recipe_overrides: Optional[Dict[str, Any]] = None, resume: bool = False, device: str = "auto",
          seed: int = 0, progress: Optional[Callable[[int, int, int, Dict[str, Any]], None]] = None,
          cancel=None, pretrained=None, verbose: bool = False) -> TrainResult:
    """Train ``model_name`` with its recipe (:func:`load_recipe`) on ``data``.

    ``data``: a 2D image/mask folder, a folder of volumes, a list of (image, label) file
    pairs, or a list of in-memory cases ``(image zyx, spacing, label)``.
    ``recipe_overrides``: dict of recipe keys (dotted keys reach into sections).
    ``resume``: continue from ``out_dir/training_state.pt`` (the saved recipe is used,
    updated by ``recipe_overrides``, e.g. more epochs). Without ``resume`` an ``out_dir``
    that already holds a run is refused (nothing is overwritten).
    ``progress(epoch, step, steps_per_epoch, metrics)``: called after every optimiser step
    (metrics: loss, lr) and at each epoch end (with the validation metrics); epochs count
    from 0, ``metrics["epochs"]`` is the total. ``cancel``: an object with ``.cancelled``
    (:class:`LesionSegLib.inference.CancelToken`): the run stops at the next step, saves a
    resumable state and raises ``Cancelled`` (``.result`` holds the checkpoints so far).
    ``pretrained``: an ImageNet backbone file (Res2Net-50, VGG-16) or a checkpoint whose
    weights initialise the network (fine-tuning). ``verbose``: print progress.
    """
    t_start = time.time()
    dist = DistEnv.from_env()
    out = Path(out_dir)
    name = models.card(model_name)["name"]
    saved_state = read_state(out / STATE_NAME, name) if resume else None
    recipe = _recipe(name, preset, recipe_overrides, saved_state, out, dist)
    if saved_state is not None:
        seed = int(saved_state["training_state"]["seed"])
    cfg, preset_dict = resolve_config(name, recipe, seed)
    dev = _device(device, dist)
    dist.init(dev.type)
    try:
        with _determinism(recipe.get("deterministic", "auto"), dev):
            seed_everything(seed)
            prepared = prepare_data(data, name, preset_dict, cfg.input_spec, cfg.spec, recipe, seed)
            trainer = Trainer(cfg, prepared, dev, dist, out, progress=progress, cancel=cancel, pretrained=pretrained,
                              verbose=verbose, resuming=saved_state is not None, t_start=t_start)
            if saved_state is not None:
                trainer.restore(saved_state)
            return trainer.fit()
    finally:
        dist.shutdown()


def _recipe(name: str, preset: Optional[str], overrides: Optional[Dict[str, Any]], saved_state,
            out: Path, dist: DistEnv) -> Dict[str, Any]:
    """The run's recipe: a resumed run's saved recipe updated by ``overrides``, else the
    network's recipe; a new run never writes into a folder that holds one."""
    if saved_state is None:
        if dist.is_main and out.exists() and any((out / n).exists() for n in (STATE_NAME, BEST_NAME, LAST_NAME)):
            raise TrainingError(f"{out} already holds a training run; resume it (--resume) or choose another folder")
        return load_recipe(name, preset, overrides)
    saved = saved_state["training_state"]
    preset = preset or saved["recipe"]["preset"]
    if saved["recipe"]["preset"] != preset:
        raise TrainingError(f"{out / STATE_NAME}: the run used preset {saved['recipe']['preset']!r}, not {preset!r}")
    base = {k: v for k, v in saved["recipe"].items() if k not in ("model", "preset", "sources")}
    return load_recipe(name, preset, {**base, **(overrides or {})})


def _device(device: Optional[str], dist: DistEnv) -> torch.device:
    """This process's device, chosen as inference chooses it (:func:`runtime.select_device`);
    under DDP each rank takes the GPU of its local rank."""
    from ..inference.runtime import select_device
    wanted = "auto" if device is None else str(device)
    auto = wanted.strip().lower() == "auto"
    if auto and dist.enabled and torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)  # "auto" runs a test kernel: on this rank's GPU, not on GPU 0
    try:
        dev, message = select_device(wanted)
    except (RuntimeError, ValueError) as e:
        raise TrainingError(str(e)) from None
    if auto and dev.type == "cpu" and torch.cuda.is_available():
        warnings.warn(message)  # a GPU that cannot run a kernel: training on the CPU is slow
    if dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    return dev


@contextlib.contextmanager
def _determinism(deterministic, dev: torch.device):
    """The recipe's ``deterministic`` during the run, the process's settings again after it."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    try:
        # CPU kernels are deterministic at a fixed thread count, so "auto" changes nothing
        # there (torch.use_deterministic_algorithms also costs seconds of imports); on CUDA
        # "auto" lets cuDNN pick the fastest kernels and true trades speed for repeatability
        if deterministic is True:
            if dev.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        if torch.are_deterministic_algorithms_enabled() != prev_det:
            torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.benchmark = prev_bench
