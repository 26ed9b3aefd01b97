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

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from .. import models
from ..data import DataError
from ..fileio import atomic_write_text
from ..data.dataset import (EpochBatchSampler, FolderSource, SegmentationDataset, TargetSpec, VolumeSource,
                            collate, target_spec)
from ..data.folders import case_ids, case_table, class_mask_pairs, detect_layout, folder_pairs, has_class_masks
from ..data.splits import case_split, explicit_split, kfold_splits
from ..data.volumes import VolumeCase, VolumePair, is_volume_file, load_case, memory_case, volume_pairs
from .distributed import DistEnv
from .recipes import RecipeError, load_recipe
from .result import TrainingError, TrainResult
from .schedule import Schedule, apply_lr

STATE_NAME = "training_state.pt"
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
LOG_NAME = "log.csv"
CURVES_NAME = "curves.png"


def _cancelled_class():
    try:
        from ..inference import Cancelled
        return Cancelled
    except Exception:  # pragma: no cover - the inference package is part of LesionSeg
        class Cancelled(Exception):
            pass
        return Cancelled


# ============================================================================ data
@dataclass
class PreparedData:
    train: Any
    val: Optional[Any]
    description: Dict[str, Any]
    fit: str = "resize"


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _folder_list(data) -> List[Path]:
    """The 2D training folders in ``data`` (one folder, or a list of folders), else []."""
    if _is_path(data):
        paths = [Path(data)]
    elif isinstance(data, (list, tuple)) and data and all(_is_path(d) for d in data):
        paths = [Path(d) for d in data]
    else:
        return []
    if len(paths) == 1:
        try:
            detect_layout(paths[0])
        except DataError:
            return []
        return paths
    for p in paths:
        detect_layout(p)  # several folders: each must be a 2D folder (the error names it)
    return paths


def folder_items(folders: List[Path], spec: TargetSpec, recipe: Dict[str, Any], desc: Dict[str, Any]) -> list:
    """The pairs of one or several 2D folders (several train as one set: Kvasir-SEG +
    CVC-ClinicDB, the papers' polyp training set; each case id is then prefixed with its
    folder's name). Multi-label networks read per-class mask files where a folder has them."""
    suffixes = class_suffixes(spec) if spec.multi_label else ()
    items, rules, layouts = [], [], []
    regex, block = recipe.get("case_regex"), recipe.get("number_block", 10)
    for root in folders:
        layouts.append(detect_layout(root).name)
        per_class = bool(suffixes) and has_class_masks(root, suffixes)
        its = (class_mask_pairs(root, suffixes, case_regex=regex, number_block=block) if per_class
               else folder_pairs(root, case_regex=regex, number_block=block))
        rule = case_ids([p.key for p in its], regex, case_table(root) if regex is None else None, block)[1]
        if per_class:
            rule += f"; one mask file per class: <image>_{{{','.join(suffixes)}}}"
        if len(folders) > 1:
            its = [dataclasses.replace(it, case=f"{root.name}/{it.case}") for it in its]
        items.extend(its)
        rules.append(rule)
    one = len(folders) == 1
    desc.update({"kind": "folder", "root": str(folders[0].resolve()) if one else [str(r.resolve()) for r in folders],
                 "layout": layouts[0] if one else layouts, "case_rule": rules[0] if one else rules})
    return items


def class_suffixes(spec: TargetSpec) -> Tuple[str, ...]:
    """File-name suffixes of per-class mask files, from the class names of the preset:
    the abbreviation in brackets ("Hard exudate (EX)" → "EX"), else the name."""
    out = []
    for c in spec.classes:
        name = str(c.get("name", ""))
        m = re.search(r"\(([A-Za-z0-9]+)\)\s*$", name)
        out.append(m.group(1) if m else name)
    return tuple(out)


def _input_spec(name: str, preset_dict: Dict[str, Any], context: int) -> Dict[str, Any]:
    """The preset's input entry, with the 2.5D context recorded the way the predictor
    reads it: ``channels`` stays the per-slice count (1) and ``slice_context`` says that
    the network takes 2k+1 neighbouring slices (its ``in_channels``)."""
    spec = json.loads(json.dumps(preset_dict["input"]))
    if context:
        if int(spec.get("channels", 1)) != 1:
            raise RecipeError(f"{name}: slices.context (2.5D) needs a one-channel preset; "
                              f"{preset_dict['name']!r} takes {spec['channels']} channels per slice")
        sc = spec.get("slice_context") if isinstance(spec.get("slice_context"), dict) else {}
        spec["slice_context"] = {**sc, "k": context, "config_key": "in_channels",
                                 "rule": "slices z-k..z+k as channels (increasing z), edge slices repeated"}
    return spec


def prepare_data(data, name: str, preset_dict: Dict[str, Any], input_spec: Dict[str, Any], spec: TargetSpec,
                 recipe: Dict[str, Any], seed: int) -> PreparedData:
    """Sources for training and validation from any accepted ``data``, split by case,
    every file read and checked (errors name the file) before training starts."""
    slices = recipe.get("slices") or {}
    context = int(slices.get("context", 0) or 0)
    # "resize" (default): axial slices resized to the training size, as the predictor does;
    # "spacing": resampled in-plane to the card's pixel_spacing_mm, then centre-cropped
    fit_mode = slices.get("fit", "resize")
    if fit_mode not in ("resize", "spacing"):
        raise RecipeError(f"slices.fit must be resize or spacing, got {fit_mode!r}")
    pixel_spacing = input_spec.get("pixel_spacing_mm") if fit_mode == "spacing" else None
    if fit_mode == "spacing" and not pixel_spacing:
        raise RecipeError(f"slices.fit spacing needs input.pixel_spacing_mm in the card of {name}")
    desc: Dict[str, Any] = {}
    kind = None
    folders = _folder_list(data)
    if folders:
        kind = "folder"
        items = folder_items(folders, spec, recipe, desc)
    elif _is_path(data):
        root = Path(data)
        if not root.exists():
            raise DataError(f"{root}: no such file or folder")
        if not (root.is_dir() and any(is_volume_file(p) for p in root.rglob("*"))):
            detect_layout(root)  # raises the error that lists the 2D layouts
        kind = "volumes"
        items = volume_pairs(root, recipe.get("modality"))
        desc.update({"kind": "volumes", "root": str(root.resolve()), "case_rule": "one volume = one case"})
    elif isinstance(data, (list, tuple)) and data:
        first = data[0]
        if isinstance(first, (tuple, list)) and len(first) == 2 and all(_is_path(v) for v in first):
            kind = "volumes"
            items = [VolumePair(Path(a), Path(b)) for a, b in data]
            desc.update({"kind": "volumes", "root": None, "case_rule": "one volume = one case"})
        else:
            kind = "memory"
            n_cls = spec.n_classes
            items = [memory_case(it, i, n_cls, pixel_spacing) for i, it in enumerate(data)]
            names = [c.case for c in items]
            if len(set(names)) != len(names):  # one case per item, whatever their names
                for i, c in enumerate(items):
                    c.case = f"{c.case}#{i}"
            desc.update({"kind": "memory", "root": None, "case_rule": "one in-memory case = one case"})
    else:
        raise DataError("training data must be a folder, a list of (image, label) file pairs or a list of "
                        "in-memory (image, spacing, label) cases; got "
                        + (type(data).__name__ if not isinstance(data, (list, tuple)) else "an empty list"))
    if context and kind == "folder":
        raise DataError("slices.context (2.5D) needs 3D volumes; 2D image folders have no neighbouring slices")

    folds, fold = recipe.get("folds"), recipe.get("fold")
    if recipe.get("split"):
        train_items, val_items, test_cases = explicit_split(items, recipe["split"])
        desc["split"] = {"kind": "explicit", "source": recipe["split"] if isinstance(recipe["split"], str) else "recipe",
                         "held_out_test_cases": sorted(test_cases)}
    elif folds:
        splits = kfold_splits(items, int(folds), seed)
        f = int(fold or 0)
        if not 0 <= f < int(folds):
            raise RecipeError(f"fold must be in 0..{int(folds) - 1}, got {fold}")
        train_items, val_items = splits[f]
        desc["split"] = {"kind": "kfold", "folds": int(folds), "fold": f, "seed": seed}
    else:
        vf = float(recipe.get("val_fraction", 0.2))
        train_items, val_items = case_split(items, vf, seed)
        desc["split"] = {"kind": "case_split", "val_fraction": vf, "seed": seed}
    def case_of(it):
        return it.case
    desc["items"] = len(items)
    desc["train_items"], desc["val_items"] = len(train_items), len(val_items)
    desc["train_cases"] = sorted({case_of(it) for it in train_items})
    desc["val_cases"] = sorted({case_of(it) for it in val_items})
    overlap = set(desc["train_cases"]) & set(desc["val_cases"])
    assert not overlap, f"case split leaked cases {overlap}"  # case_split guarantees it

    lesion_fraction = (recipe.get("slices") or {}).get("lesion_fraction", 0.5)
    if kind == "folder":
        train = FolderSource(train_items, input_spec, spec)
        val = FolderSource(val_items, input_spec, spec) if val_items else None
        fit = "tile" if recipe.get("tile_from") else "resize"
        desc["files"] = {"train": [str(p.image.name) for p in train_items], "val": [str(p.image.name) for p in val_items]}
    else:
        def load(its):
            out = []
            for it in its:
                if isinstance(it, VolumeCase):
                    out.append(it)
                else:
                    out.append(load_case(it.image, it.label, it.case, pixel_spacing, spec.n_classes))
            return out
        train = VolumeSource(load(train_items), input_spec, spec, context, lesion_fraction, pixel_spacing)
        val = VolumeSource(load(val_items), input_spec, spec, context, None, pixel_spacing) if val_items else None
        fit = "crop" if pixel_spacing else "resize"
        desc["orientation"] = "LPS (axial slices along array axis 0)"
        desc["slices"] = {"context": context, "lesion_fraction": lesion_fraction,
                          "pixel_spacing_mm": pixel_spacing, "fit": fit}
        if kind != "memory":
            desc["files"] = {"train": [str(p.image) for p in train_items], "val": [str(p.image) for p in val_items]}
        notes = [f"{c.case}: {n}" for c in train.cases + (val.cases if val else []) for n in c.notes]
        if notes:
            desc["notes"] = notes
    desc["check"] = {"train": train.check()}
    if val is not None:
        try:
            desc["check"]["val"] = val.check()
        except DataError as e:
            if "empty" not in str(e):  # an all-empty validation set is legal (Dice of empty = 1)
                raise
            desc["check"]["val"] = {"note": "validation masks all empty"}
    return PreparedData(train, val, desc, fit)


# ============================================================================ metrics
def _metrics_fn():
    """``LesionSegLib.metrics.dice_iou`` (the project's definition), or None."""
    try:
        from ..metrics import dice_iou
        return dice_iou
    except Exception:  # pragma: no cover - metrics.py is part of LesionSeg
        return None


def counts(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per sample and class: (intersection, predicted, true) pixel counts, (B, N, 3)."""
    out = []
    for c in range(1, n_classes + 1):
        p, t = pred == c, target == c
        out.append(torch.stack([(p & t).flatten(1).sum(1), p.flatten(1).sum(1), t.flatten(1).sum(1)], 1))
    return torch.stack(out, 1).double()


def dice_iou_from_counts(c: np.ndarray):
    """Dice and IoU of one item from its (N classes, 3) counts (intersection, predicted,
    true), with the definitions of :func:`LesionSegLib.metrics.dice_iou`: per class
    ``2tp/(P+G)`` and ``tp/(P+G−tp)``, 1 where the class is absent from both, then the
    mean over the classes."""
    inter, p, t = c[:, 0], c[:, 1], c[:, 2]
    total = p + t
    union = total - inter
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(dice.mean()), float(iou.mean())


def dice_iou_channels(pred: torch.Tensor, target: torch.Tensor):
    """Per item, the mean over channels of Dice and IoU of binary (B, K, H, W) maps (1 for a
    channel empty in both), as float64 (B,) tensors."""
    p, t = pred.flatten(2).double(), target.flatten(2).double()
    inter, total = (p * t).sum(2), p.sum(2) + t.sum(2)
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    iou = torch.where(total - inter > 0, inter / (total - inter).clamp(min=1), torch.ones_like(total))
    return dice.mean(1).cpu(), iou.mean(1).cpu()


def predict_labels(out: torch.Tensor, spec: TargetSpec, threshold: float) -> torch.Tensor:
    out = out.float()
    if spec.softmax:
        return out.argmax(1)
    prob = torch.sigmoid(out)
    if out.shape[1] == 1:
        return (prob[:, 0] >= threshold).long()
    best = prob.argmax(1) + 1  # multi-label: most probable class where any passes
    return torch.where(prob.max(1).values >= threshold, best, torch.zeros_like(best))


# ============================================================================ helpers
def _pick_device(device: str) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} requested but CUDA is not available")
    return d


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                     int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _param_groups(model: nn.Module, name: str, opt: Dict[str, Any]) -> List[Dict[str, Any]]:
    lr, wd = float(opt["lr"]), float(opt.get("weight_decay", 0.0))
    kind = opt.get("param_groups", "all")
    if kind == "lseg_caffe":
        if not hasattr(model, "caffe_param_groups"):
            raise RecipeError(f"optimizer.param_groups lseg_caffe needs L-Seg, not {name}")
        groups = model.caffe_param_groups(lr, wd)
    else:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        mult = float(opt.get("backbone_lr_mult", 1.0))
        prefix = models.card(name)["architecture"].get("backbone_prefix")
        if mult != 1.0 and prefix:
            bb = [p for n, p in params if n.startswith(prefix)]
            head = [p for n, p in params if not n.startswith(prefix)]
            groups = [{"name": "backbone", "params": bb, "lr": lr * mult, "weight_decay": wd},
                      {"name": "head", "params": head, "lr": lr, "weight_decay": wd}]
        else:
            groups = [{"name": "all", "params": [p for _, p in params], "lr": lr, "weight_decay": wd}]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def _optimizer(model: nn.Module, name: str, opt: Dict[str, Any]) -> torch.optim.Optimizer:
    known = {"sgd": {"momentum", "nesterov"}, "adam": {"betas", "eps"}, "adamw": {"betas", "eps"}}
    common = {"name", "lr", "weight_decay", "param_groups", "backbone_lr_mult"}
    unknown = set(opt) - common - known[opt["name"]]
    if unknown:
        raise RecipeError(f"optimizer {opt['name']}: unknown option(s) {', '.join(sorted(unknown))}; to change "
                          f"the optimiser give the whole section, e.g. --set 'optimizer={{\"name\": "
                          f"\"{opt['name']}\", \"lr\": {opt.get('lr')}}}'")
    groups = _param_groups(model, name, opt)
    if opt["name"] == "sgd":
        return torch.optim.SGD(groups, lr=float(opt["lr"]), momentum=float(opt.get("momentum", 0.0)),
                               nesterov=bool(opt.get("nesterov", False)))
    cls = torch.optim.Adam if opt["name"] == "adam" else torch.optim.AdamW
    kw = {"betas": tuple(opt.get("betas", (0.9, 0.999))), "eps": float(opt.get("eps", 1e-8))}
    return cls(groups, lr=float(opt["lr"]), **kw)


def _check_sizes(name: str, spec_in: Dict[str, Any], sizes: Sequence[Sequence[int]]) -> None:
    div, low = int(spec_in.get("size_divisor", 1)), int(spec_in.get("min_size", 1))
    for s in sizes:
        for v in s:
            if v % div or v < low:
                raise RecipeError(f"{name}: training size {list(s)} does not fit the network (sides must be "
                                  f"multiples of {div} and at least {low})")


def _amp(recipe_amp, device: torch.device):
    """(autocast dtype or None, use GradScaler)."""
    if recipe_amp in (False, None, "off"):
        return None, False
    if device.type != "cuda":
        if recipe_amp == "bf16":
            return torch.bfloat16, False
        if device.type == "cpu" and recipe_amp in ("auto", True):
            # the Predictor's choice: bf16 autocast only where the CPU has native bf16 (AMX, AVX512-BF16)
            from ..inference.runtime import cpu_autocast_dtype
            return cpu_autocast_dtype(), False
        return None, False
    if recipe_amp == "fp16":
        return torch.float16, True
    if recipe_amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _write_csv(path: Path, history: List[Dict[str, Any]]) -> None:
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


class _Printer:
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


# ============================================================================ train
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
    state_path = out / STATE_NAME
    saved_state = None
    name = models.card(model_name)["name"]
    if resume:
        if not state_path.is_file():
            raise TrainingError(f"{out}: nothing to resume ({STATE_NAME} not found)")
        try:
            saved_state = torch.load(str(state_path), map_location="cpu", weights_only=True)
            saved_state["training_state"]["recipe"]["preset"], saved_state["training_state"]["seed"]
        except Exception as e:  # cut short, damaged, or not a training state at all
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                detail = "it holds Python objects, and LesionSeg never executes code from a file"
            raise TrainingError(f"{state_path}: not a readable training state ({detail}); restore it or "
                                f"start the run again in a new folder") from None
        if saved_state.get("model") != name:
            raise TrainingError(f"{state_path}: holds a {saved_state.get('model')!r} run, not {name!r}")
        saved = saved_state["training_state"]
        preset = preset or saved["recipe"]["preset"]
        if saved["recipe"]["preset"] != preset:
            raise TrainingError(f"{state_path}: the run used preset {saved['recipe']['preset']!r}, not {preset!r}")
        base = {k: v for k, v in saved["recipe"].items() if k not in ("model", "preset", "sources")}
        recipe = load_recipe(name, preset, {**base, **(recipe_overrides or {})})
        seed = int(saved["seed"])
    else:
        if dist.is_main and out.exists() and any((out / n).exists() for n in (STATE_NAME, BEST_NAME, LAST_NAME)):
            raise TrainingError(f"{out} already holds a training run; resume it (--resume) or choose another folder")
        recipe = load_recipe(name, preset, recipe_overrides)
    preset = recipe["preset"]
    preset_dict = models.preset(name, preset)
    context = int((recipe.get("slices") or {}).get("context", 0) or 0)
    input_spec = _input_spec(name, preset_dict, context)

    model_config = dict(preset_dict.get("config", {}))
    model_config.update(recipe.get("model_config") or {})
    if context:
        if "in_channels" not in models.config(name):
            raise RecipeError(f"{name} has no in_channels option; slices.context needs one")
        model_config["in_channels"] = 2 * context + 1
    full_config = models.config(name, **model_config)
    spec = target_spec(name, preset_dict, full_config)

    size = tuple(int(s) for s in recipe["size"])
    ms = recipe.get("multiscale") or None
    sizes = [tuple(s) if isinstance(s, (list, tuple)) else (int(s), int(s)) for s in ms["sizes"]] if ms else [size]
    _check_sizes(name, input_spec, sizes + [size])
    # the checkpoint's card records the size the network was trained (and validated) at, so
    # the predictor resizes to it; a run at a non-card size must not be fed card-size slices
    # (tiles: the image size the tiles were cut from, which is what the network sees whole)
    input_spec["size"] = list(recipe["tile_from"]) if recipe.get("tile_from") else list(size)

    dev = _pick_device(device)
    if dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    dist.init(dev.type)
    # CPU kernels are deterministic at a fixed thread count, so "auto" changes nothing
    # there (torch.use_deterministic_algorithms also costs seconds of imports); on CUDA
    # "auto" lets cuDNN pick the fastest kernels and true trades speed for repeatability
    deterministic = recipe.get("deterministic", "auto")
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    try:
        if deterministic is True:
            if dev.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        _seed_everything(seed)
        prepared = prepare_data(data, name, preset_dict, input_spec, spec, recipe, seed)
        return _run(name, preset, recipe, prepared, input_spec, spec, full_config, sizes, size, dev, dist, out,
                    saved_state, seed, progress, cancel, pretrained, verbose, t_start)
    finally:
        if torch.are_deterministic_algorithms_enabled() != prev_det:
            torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.benchmark = prev_bench
        dist.shutdown()


def _run(name, preset, recipe, prepared: PreparedData, input_spec, spec: TargetSpec, full_config, sizes, size,
         dev: torch.device, dist: DistEnv, out: Path, saved_state, seed, progress, cancel, pretrained, verbose,
         t_start) -> TrainResult:
    main = dist.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    printer = _Printer(verbose and main)
    model = models.create(name, **full_config)
    if pretrained and saved_state is None:
        printer.line(f"starting from {_load_pretrained(model, name, pretrained)}")
    if recipe.get("sync_bn") and dist.enabled:
        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif main:  # PyTorch's SyncBatchNorm runs on GPUs only
            warnings.warn("sync_bn ignored: SyncBatchNorm needs CUDA; each CPU process keeps its own batch statistics")
    model.to(dev)
    if dev.type == "cpu":
        # oneDNN computes depthwise kernels above 13×13 on a slow generic path (MS-LKSeg's
        # 21×21 Re-DWConv: 3-4× the whole step); the FFT computes the same map and shares
        # the parameters, so optimiser, state dict and checkpoints are unchanged
        from ..inference.fastconv import replace_large_depthwise
        replace_large_depthwise(model, trainable=True)
    channels_last = recipe.get("channels_last", "auto")
    channels_last = (dev.type == "cuda") if channels_last == "auto" else bool(channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    from ..losses import build_loss
    loss_fn = build_loss(name, preset, **(recipe.get("loss") or {})).to(dev)
    optimizer = _optimizer(model, name, recipe["optimizer"])
    schedule = Schedule(recipe.get("schedule"), recipe["epochs"])
    amp_dtype, use_scaler = _amp(recipe.get("amp", "auto"), dev)
    printer.line(f"training on {dev} in " + (f"{str(amp_dtype).split('.')[-1]} autocast" if amp_dtype else "fp32")
                 + (" (GradScaler)" if use_scaler else ""))
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if dev.type == "cuda" else None
    epochs = int(recipe["epochs"])

    ms = recipe.get("multiscale") or {}
    batch_size = int(recipe["batch_size"])
    n_workers = recipe.get("num_workers", "auto")
    if n_workers == "auto":
        n_workers = 0 if dev.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) // max(1, dist.world_size)))
    sampler = EpochBatchSampler(len(prepared.train), batch_size, seed, sizes=sizes,
                                size_mode=ms.get("mode", "random") if ms else "random",
                                weights=getattr(prepared.train, "weights", None),
                                rank=dist.rank, world_size=dist.world_size,
                                augment=bool(recipe.get("augment")), epoch_length=recipe.get("epoch_length"))
    tile_from = recipe.get("tile_from") if prepared.fit == "tile" else None
    train_ds = SegmentationDataset(prepared.train, spec, size, recipe.get("augment"),
                                   recipe.get("mask_interpolation", "bilinear"), prepared.fit, tile_from)

    def make_loader(ds, batch_sampler):
        # a private generator: the loader never draws from the global torch RNG, which
        # keeps that RNG's stream identical between an interrupted and a whole run
        g = torch.Generator()
        g.manual_seed(seed)
        return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, num_workers=int(n_workers),
                                           collate_fn=collate, pin_memory=dev.type == "cuda", generator=g)

    val_ds = None
    if prepared.val is not None:
        val_ds = SegmentationDataset(prepared.val, spec, size, None, "nearest", prepared.fit, tile_from)

    # ---- state
    epoch, step_in_epoch, global_step = 0, 0, 0
    history: List[Dict[str, Any]] = []
    best_value, best_epoch = None, None
    es_best, es_bad = None, 0
    run_acc = {"loss_sum": 0.0, "n": 0, "components": {}}
    elapsed_before = 0.0
    if saved_state is not None:
        st = saved_state["training_state"]
        ckpt.load_state_dict_strict(model, saved_state["state_dict"], str(out / STATE_NAME))
        optimizer.load_state_dict(st["optimizer"])
        for g, ig in zip(optimizer.param_groups, st["initial_lrs"]):
            g["initial_lr"] = ig
        if st.get("scaler") and scaler is not None:
            scaler.load_state_dict(st["scaler"])
        schedule.load_state_dict(st["schedule"])
        epoch, step_in_epoch, global_step = int(st["epoch"]), int(st["step_in_epoch"]), int(st["global_step"])
        history = list(st["history"])
        best_value, best_epoch = st["best_value"], st["best_epoch"]
        es_best, es_bad = st["es_best"], int(st["es_bad"])
        # rank 0 saved the sums of all ranks: the others continue from zero
        run_acc = st["run_acc"] if dist.rank == 0 else {"loss_sum": 0.0, "n": 0, "components": {}}
        elapsed_before = float(st.get("elapsed", 0.0))
        _set_rng_state(st["rng"])
    ddp_model = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=bool(recipe.get("find_unused_parameters", False)))

    if main:
        _write_json(out / "recipe.json", recipe)
        _write_json(out / "data.json", prepared.description)
    tb = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # TensorBoard not installed: CSV and PNG only
            tb = None

    card = models.card(name)
    preset_for_card = _trained_preset(models.preset(name, preset), input_spec, spec)
    card_with_preset = dict(card, preset=preset_for_card)
    threshold = float(preset_for_card["outputs"].get("threshold", 0.5))
    Cancelled = _cancelled_class()
    accumulate = int(recipe.get("accumulate", 1))
    clip = recipe.get("grad_clip")
    every = int(recipe.get("checkpoint_every_steps") or 0)
    log_every = int(recipe.get("log_every_steps") or 0)
    dyconv = recipe.get("dyconv_temperature")
    best_monitor = recipe.get("best_monitor", "val_dice")
    es = recipe.get("early_stopping")

    def provenance(metrics: Dict[str, Any]) -> Dict[str, Any]:
        return {"recipe": recipe, "data": {k: v for k, v in prepared.description.items() if k != "files"},
                "metrics": metrics, "loss": getattr(loss_fn, "config", {}),
                "training": {"seed": seed, "device": str(dev), "world_size": dist.world_size,
                             "amp": str(amp_dtype) if amp_dtype else None, "epochs_run": epoch,
                             "global_step": global_step, "best_epoch": best_epoch,
                             "torch_threads": torch.get_num_threads(),
                             "deterministic": torch.are_deterministic_algorithms_enabled(),
                             "pretrained": str(pretrained) if pretrained else None}}

    def reduced_acc() -> Dict[str, Any]:
        """The running train-loss sums of all ranks (a collective: every rank calls it)."""
        if not dist.enabled:
            return run_acc
        keys = sorted(run_acc["components"])
        t = torch.tensor([run_acc["loss_sum"], run_acc["n"]] + [run_acc["components"][k] for k in keys],
                         dtype=torch.float64, device=dev)
        dist.all_reduce_sum(t)
        t = t.cpu().tolist()
        return {"loss_sum": t[0], "n": int(round(t[1])), "components": dict(zip(keys, t[2:]))}

    def save_state(where_epoch: int, where_step: int) -> None:
        acc = reduced_acc()
        if not main:
            return
        st = {"epoch": where_epoch, "step_in_epoch": where_step, "global_step": global_step,
              "optimizer": optimizer.state_dict(), "initial_lrs": [g["initial_lr"] for g in optimizer.param_groups],
              "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
              "schedule": schedule.state_dict(), "history": history, "best_value": best_value,
              "best_epoch": best_epoch, "es_best": es_best, "es_bad": es_bad, "run_acc": acc,
              "rng": _rng_state(), "recipe": recipe, "seed": seed,
              "elapsed": elapsed_before + time.time() - t_start}
        ckpt.save(out / STATE_NAME, model, card=card_with_preset, config=full_config,
                  provenance=provenance(history[-1] if history else {}), extra={"training_state": st})

    def result(stopped_early=False) -> TrainResult:
        from ..inference.fastconv import restore_convolutions
        restore_convolutions(model)  # the caller gets the network as built (nn.Conv2d)
        best = out / BEST_NAME
        last = out / LAST_NAME
        return TrainResult(str(best) if best.exists() else None, str(last) if last.exists() else None, history,
                           state_checkpoint=str(out / STATE_NAME), out_dir=str(out), stopped_early=stopped_early,
                           model=model)

    def check_cancel(ep, st):
        if cancel is not None and getattr(cancel, "cancelled", False):
            save_state(ep, st)
            if main and history:
                draw_curves(out, history)
            dist.barrier()
            err = Cancelled("training cancelled by the user; resume with resume=True")
            err.result = result()
            raise err

    stopped_early = False
    time_limit = recipe.get("time_limit_s")
    while epoch < epochs:
        if es is not None and es_bad >= int(es["patience"]):
            stopped_early = True  # Keras EarlyStopping: stop after `patience` epochs without improvement
            break
        if time_limit and history:
            # stop between epochs when the next one would end past the limit (a resume continues)
            used = elapsed_before + time.time() - t_start
            if used + float(history[-1].get("epoch_time_s", 0.0)) > float(time_limit):
                stopped_early = True
                printer.line(f"time limit {time_limit} s reached after {epoch} epochs ({used:.0f} s)")
                break
        factor = schedule.factor(epoch)
        apply_lr(optimizer, factor)
        if dyconv and hasattr(model, "set_dyconv_temperature"):
            t0, t1, n = float(dyconv["start"]), float(dyconv["end"]), max(1, int(dyconv["epochs"]))
            model.set_dyconv_temperature(t0 + (t1 - t0) * min(1.0, epoch / n))
        sampler.set_epoch(epoch, step_in_epoch)
        steps_total = len(sampler) + step_in_epoch
        if step_in_epoch == 0:
            run_acc = {"loss_sum": 0.0, "n": 0, "components": {}}
        model.train()
        loss_fn.train()
        printer.start_epoch(epoch, epochs, steps_total, step_in_epoch)
        t_epoch = time.time()
        loader = make_loader(train_ds, sampler)
        optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            x = batch["image"]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = ddp_model(x)
                loss = loss_fn(outputs, batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {float(loss)} at epoch {epoch + 1}, step {step_in_epoch + 1}; "
                                    f"lower the learning rate (optimizer.lr) or enable grad_clip")
            scaled = loss / accumulate
            if scaler is not None and scaler.is_enabled():
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
            step_in_epoch += 1
            boundary = step_in_epoch % accumulate == 0 or step_in_epoch == steps_total
            if boundary:
                if scaler is not None and scaler.is_enabled():
                    scaler.unscale_(optimizer)
                if clip:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    if clip.get("kind", "norm") == "value":
                        torch.nn.utils.clip_grad_value_(params, float(clip["max"]))
                    else:
                        torch.nn.utils.clip_grad_norm_(params, float(clip["max"]))
                if scaler is not None and scaler.is_enabled():
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
            lv = float(loss.detach())
            run_acc["loss_sum"] += lv
            run_acc["n"] += 1
            for k, v in getattr(loss_fn, "last_components", {}).items():
                run_acc["components"][k] = run_acc["components"].get(k, 0.0) + float(v)
            lr_now = optimizer.param_groups[0]["lr"]
            printer.step(step_in_epoch, steps_total, lv, lr_now, log_every)
            if tb is not None and log_every and global_step % log_every == 0:
                tb.add_scalar("train/loss_step", lv, global_step)
            if progress is not None:
                progress(epoch, step_in_epoch, steps_total, {"loss": lv, "lr": lr_now, "epochs": epochs})
            if boundary:
                if every and global_step % every == 0 and step_in_epoch < steps_total:
                    save_state(epoch, step_in_epoch)
                check_cancel(epoch, step_in_epoch)
        # ---- end of epoch
        dist.broadcast_buffers(model)
        acc = reduced_acc()
        train_loss = acc["loss_sum"] / max(1, acc["n"])
        row: Dict[str, Any] = {"epoch": epoch, "global_step": global_step,
                               "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss}
        for k, v in sorted(acc["components"].items()):
            if k != "total":
                row[f"train_{k}"] = v / max(1, acc["n"])
        if val_ds is not None:
            if dyconv and hasattr(model, "set_dyconv_temperature"):
                # validate the network that inference runs and best.pt holds: DyConv at the
                # configured temperature (1), not the annealed training one (30 → 1); the
                # next epoch sets the training temperature again
                model.set_dyconv_temperature(float(full_config.get("dyconv_temperature", 1.0)))
            val = _validate(ddp_model, model, val_ds, loss_fn, spec, threshold, dev, dist, amp_dtype,
                            channels_last, recipe, name, cancel)
            if val is None:  # cancelled during validation: resume re-validates this epoch
                check_cancel(epoch, step_in_epoch)
            row.update(val)
        row["epoch_time_s"] = round(time.time() - t_epoch, 3)
        history.append(row)
        # plateau and early stopping watch their monitors (validation, else the train loss)
        mon = schedule.monitor
        if mon:
            schedule.observe(row.get(mon, row.get("train_loss")))
        improved_best = False
        bv = row.get(best_monitor)
        if bv is None and val_ds is None:
            bv = -train_loss if best_monitor.endswith(("dice", "iou")) else train_loss
        if bv is not None and math.isfinite(bv):
            better = best_value is None or (bv < best_value if best_monitor.endswith("loss") else bv > best_value)
            if better:
                best_value, best_epoch, improved_best = bv, epoch, True
        if es is not None:
            v = row.get(es.get("monitor", "val_loss"))
            if v is not None and math.isfinite(v):
                better = es_best is None or (v < es_best if es.get("mode", "min") == "min" else v > es_best)
                es_best, es_bad = (v, 0) if better else (es_best, es_bad + 1)
        epoch += 1
        step_in_epoch = 0
        metrics = {k: v for k, v in row.items()}
        if main:
            ckpt.save(out / LAST_NAME, model, card=card_with_preset, config=full_config, provenance=provenance(metrics))
            if improved_best:
                ckpt.save(out / BEST_NAME, model, card=card_with_preset, config=full_config,
                          provenance=provenance(metrics))
            _write_csv(out / LOG_NAME, history)
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("epoch",):
                        tb.add_scalar(k, v, epoch)
        save_state(epoch, 0)
        dist.barrier()
        vals = " ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss", "val_dice", "val_iou") if k in row)
        printer.line(f"epoch {epoch}/{epochs}  {vals}  lr {row['lr']:.3g}  ({row['epoch_time_s']:.1f} s)")
        if progress is not None:
            progress(epoch - 1, steps_total, steps_total, {**metrics, "epochs": epochs})
        check_cancel(epoch, 0)
    if tb is not None:
        tb.close()
    if main and history:
        draw_curves(out, history)
    dist.barrier()
    return result(stopped_early)


def draw_curves(out: Path, history) -> None:
    try:
        from .plot import plot_curves
        plot_curves(history, out / CURVES_NAME)
    except Exception as e:  # a picture must never stop or fail a training run
        warnings.warn(f"could not draw {CURVES_NAME}: {e}")


def _trained_preset(preset: Dict[str, Any], input_spec: Dict[str, Any], spec: TargetSpec) -> Dict[str, Any]:
    """The preset as trained, for the checkpoint's card: the input (2.5D context) and, for a
    network built with more classes than the preset lists (``model_config.num_classes``),
    softmax outputs and the extra classes (named "Class k"; rename them in the card)."""
    p = json.loads(json.dumps(preset))
    p["input"] = input_spec
    classes = list(p.get("classes", []))
    if spec.softmax and (p["outputs"].get("activation") != "softmax" or len(classes) != spec.n_classes):
        palette = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (80, 200, 120), (200, 80, 255), (255, 128, 0)]
        while len(classes) < spec.n_classes:
            v = len(classes) + 1
            classes.append({"value": v, "name": f"Class {v}", "color": list(palette[(v - 1) % len(palette)])})
        p["classes"] = classes[:spec.n_classes]
        p["outputs"] = dict(p["outputs"], channels=spec.channels, activation="softmax")
    return p


def _validate(ddp_model, model, val_ds, loss_fn, spec, threshold, dev, dist: DistEnv, amp_dtype, channels_last,
              recipe, name, cancel) -> Optional[Dict[str, float]]:
    """Validation loss, Dice and IoU. Dice/IoU per item (an image of a 2D folder, a case
    of volumes: slices summed into one volume score), averaged; ranks share the items
    and add their counts. None when cancelled."""
    n = len(val_ds)
    source = val_ds.source
    per_case = source.kind != "folder" and not spec.multi_label  # volumes: one score per case, its slices summed
    item_names = sorted({source.case(i) for i in range(n)}) if per_case else None
    item_index = {c: j for j, c in enumerate(item_names)} if per_case else None
    table = torch.zeros(len(item_names) if per_case else 1, spec.n_classes, 3, dtype=torch.float64)
    image_scores = torch.zeros(3, dtype=torch.float64)  # sum of Dice, sum of IoU, images
    loss_sum = torch.zeros(2, dtype=torch.float64)
    dice_iou = _metrics_fn()
    bs = int(recipe.get("val_batch_size") or recipe["batch_size"])
    mine = list(range(dist.rank, n, dist.world_size))
    model.eval()
    loss_fn.eval()
    with torch.no_grad():
        for b0 in range(0, len(mine), bs):
            if cancel is not None and getattr(cancel, "cancelled", False) and not dist.enabled:
                return None
            idx = mine[b0:b0 + bs]
            batch = collate([val_ds[i] for i in idx])
            batch = {k: v.to(dev) for k, v in batch.items()}
            x = batch["image"]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(x)  # the bare module: no DDP synchronisation in evaluation
                loss = loss_fn(outputs, batch)
            loss_sum += torch.tensor([float(loss) * len(idx), len(idx)], dtype=torch.float64)
            if spec.multi_label:
                # overlapping classes: each channel is its own binary map
                prob = torch.sigmoid(models.inference_output(name, outputs).float())
                d, u = dice_iou_channels(prob >= threshold, batch["mask"] >= 0.5)
                image_scores += torch.stack([d.sum(), u.sum(), torch.tensor(float(len(idx)), dtype=torch.float64)])
                continue
            pred = predict_labels(models.inference_output(name, outputs), spec, threshold)
            if per_case:
                c = counts(pred, batch["label"], spec.n_classes).cpu()
                for j, i in enumerate(idx):
                    table[item_index[source.case(i)]] += c[j]
            else:
                classes = torch.arange(1, spec.n_classes + 1, device=pred.device)[None, :, None, None]
                p_oh, g_oh = pred[:, None] == classes, batch["label"][:, None] == classes
                if dice_iou is not None:
                    d, u = dice_iou(p_oh, g_oh)
                    d, u = d.double().mean(1).cpu(), u.double().mean(1).cpu()
                else:
                    pairs = [dice_iou_from_counts(c.numpy()) for c in counts(pred, batch["label"], spec.n_classes).cpu()]
                    d = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
                    u = torch.tensor([b for _, b in pairs], dtype=torch.float64)
                image_scores += torch.stack([d.sum(), u.sum(), torch.tensor(float(len(idx)), dtype=torch.float64)])
    dist.all_reduce_sum(loss_sum)
    if per_case:
        dist.all_reduce_sum(table)
        scores = [dice_iou_from_counts(table[i].numpy()) for i in range(len(item_names))]
        dice = float(np.mean([s_[0] for s_ in scores])) if scores else float("nan")
        iou = float(np.mean([s_[1] for s_ in scores])) if scores else float("nan")
    else:
        dist.all_reduce_sum(image_scores)
        k = float(image_scores[2])
        dice = float(image_scores[0]) / k if k else float("nan")
        iou = float(image_scores[1]) / k if k else float("nan")
    return {"val_loss": float(loss_sum[0] / max(1.0, float(loss_sum[1]))), "val_dice": dice, "val_iou": iou}


def _load_pretrained(model: nn.Module, name: str, path) -> str:
    """Load an ImageNet backbone or a checkpoint into ``model``; says what was loaded."""
    path = Path(path)
    sd = ckpt._unwrap_state_dict(ckpt._read(path)) if path.is_file() else None
    if sd is None:
        raise TrainingError(f"pretrained weights {path}: no such file")
    kind = ckpt.identify(sd)
    if kind in ckpt.BACKBONES:
        try:
            return f"{path.name}: backbone {ckpt.load_pretrained_backbone(model, path)}"
        except ckpt.CheckpointError as e:
            raise TrainingError(f"pretrained weights {path}: {e}") from None
    try:
        ck = ckpt.load(path, model=name)
    except ckpt.CheckpointError as e:
        raise TrainingError(f"pretrained weights {path}: {e}") from None
    ckpt.load_state_dict_strict(model, ck.model.state_dict(), f"{path} (fine-tuning {name})")
    return f"{path.name}: all weights ({ck.kind} {ck.name})"
