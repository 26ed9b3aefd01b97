"""Training data from any accepted ``data``: sources for training and validation, split by
case, every file read and checked before training starts."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import models
from ..data import DataError
from ..data.sources import FolderSource, TargetSpec, VolumeSource
from ..data.folders import case_ids, case_table, class_mask_pairs, detect_layout, folder_pairs, has_class_masks
from ..data.splits import case_split, explicit_split, kfold_splits
from ..data.volumes import VolumeCase, VolumePair, is_volume_file, load_case, memory_case, volume_pairs
from .recipes import RecipeError


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


def input_spec_for(name: str, preset_dict: Dict[str, Any], context: int) -> Dict[str, Any]:
    """The preset's input entry, with the 2.5D context recorded the way the predictor
    reads it: ``channels`` stays the per-slice count (1) and ``slice_context`` says that
    the network takes 2k+1 neighbouring slices (its ``in_channels``)."""
    spec = json.loads(json.dumps(preset_dict["input"]))
    if context:
        if models.Inputs.of(spec).channels != 1:
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
