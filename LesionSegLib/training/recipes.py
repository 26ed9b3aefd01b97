"""Training recipes as data: ``LesionSegLib/recipes/<model>.json``.

A recipe is ``_defaults.json``'s ``defaults``, updated (deeply) by the model file's
``defaults``, then by its ``presets[<preset>]`` entry, then by the caller's overrides.
Every value can be overridden: ``load_recipe("m2snet", "polyp", epochs=5,
**{"optimizer.lr": 0.01})`` or on the command line ``--set optimizer.lr=0.01``;
``lr`` is short for ``optimizer.lr``. Unknown top-level keys are errors (typos would
otherwise be ignored silently).

No torch here: the Slicer module reads recipes to fill its panel.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SHORTCUTS = {"lr": "optimizer.lr"}


class RecipeError(ValueError):
    """A recipe or an override that cannot be used."""


@lru_cache(maxsize=None)
def _read(name: str) -> Dict[str, Any]:
    path = RECIPES_DIR / f"{name}.json"
    if not path.is_file():
        raise RecipeError(f"no training recipe for model {name!r} ({path} missing)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: invalid JSON ({e})") from None


def deep_merge(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``update``; nested dicts are merged, anything else replaced.
    A dict replacing ``None`` (e.g. turning on early stopping) is taken as it is."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false/null, lists,
    objects), else the string itself."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        low = str(text).strip().lower()
        if low in ("none", "off"):
            return None
        if low in ("yes", "on"):
            return True
        if low == "no":
            return False
        return text


def parse_assignment(item: str):
    """``key=value`` → (key, parsed value)."""
    if "=" not in item:
        raise RecipeError(f"expected key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), parse_value(value.strip())


def _set_dotted(recipe: Dict[str, Any], key: str, value: Any, known: Mapping[str, Any]) -> None:
    key = SHORTCUTS.get(key, key)
    parts = key.split(".")
    if parts[0] not in known:
        raise RecipeError(f"unknown recipe key {parts[0]!r}; known: {', '.join(sorted(known))}")
    node = recipe
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    current = node.get(parts[-1])
    # a section given with another "name" (optimizer sgd → adam, schedule step → cosine)
    # starts afresh: the old kind's options (momentum, step_epochs …) mean nothing to it
    renamed = isinstance(value, Mapping) and isinstance(current, dict) and "name" in value \
        and value["name"] != current.get("name")
    if isinstance(value, Mapping) and isinstance(current, dict) and not renamed:
        node[parts[-1]] = deep_merge(current, value)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def available_recipes():
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json") if not p.stem.startswith("_"))


def load_recipe(model_name: str, preset: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                **kw) -> Dict[str, Any]:
    """The recipe of ``model_name`` for task ``preset`` (default: the card's default
    preset) with ``overrides`` (a dict, and/or keyword arguments; dotted keys reach into
    sections). The result records ``model``, ``preset`` and ``sources``."""
    from .. import models
    card = models.card(model_name)
    name = card["name"]
    preset = preset or card.get("default_preset")
    models.preset(name, preset)  # raises UnknownPresetError with the list of presets
    base = _read("_defaults")["defaults"]
    data = _read(name)
    recipe = deep_merge(base, data.get("defaults", {}))
    if preset in data.get("presets", {}):
        recipe = deep_merge(recipe, data["presets"][preset])
    known = dict(base)
    for k, v in {**(overrides or {}), **kw}.items():
        _set_dotted(recipe, k, v, known)
    unknown = sorted(set(recipe) - set(base))
    if unknown:
        raise RecipeError(f"{name}.json: unknown recipe key(s) {', '.join(unknown)}")
    if recipe.get("size") is None:
        recipe["size"] = list(models.preset(name, preset)["input"]["size"])
    recipe["model"] = name
    recipe["preset"] = preset
    recipe["sources"] = copy.deepcopy(data.get("sources", {}))
    validate(recipe)
    return recipe


def validate(recipe: Dict[str, Any]) -> None:
    def need(cond, msg):
        if not cond:
            raise RecipeError(f"recipe of {recipe.get('model')}: {msg}")
    need(isinstance(recipe["epochs"], int) and recipe["epochs"] >= 1, f"epochs must be an integer >= 1, got {recipe['epochs']!r}")
    need(isinstance(recipe["batch_size"], int) and recipe["batch_size"] >= 1,
         f"batch_size must be an integer >= 1, got {recipe['batch_size']!r}")
    need(isinstance(recipe["accumulate"], int) and recipe["accumulate"] >= 1, "accumulate must be an integer >= 1")
    opt = recipe["optimizer"]
    need(isinstance(opt, dict) and opt.get("name") in ("sgd", "adam", "adamw"),
         f"optimizer.name must be sgd, adam or adamw, got {opt.get('name') if isinstance(opt, dict) else opt!r}")
    need(isinstance(opt.get("lr"), (int, float)) and opt["lr"] > 0, f"optimizer.lr must be > 0, got {opt.get('lr')!r}")
    sched = recipe["schedule"] or {"name": "constant"}
    need(sched.get("name") in ("constant", "triangular", "step", "plateau", "cosine", "poly"),
         f"schedule.name must be constant, triangular, step, plateau, cosine or poly, got {sched.get('name')!r}")
    size = recipe["size"]
    need(isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size),
         f"size must be [H, W], got {size!r}")
    ms = recipe.get("multiscale")
    if ms:
        need(isinstance(ms, dict) and ms.get("sizes") and ms.get("mode", "random") in ("random", "cycle"),
             "multiscale must be {sizes: [...], mode: random|cycle}")
    vf = recipe["val_fraction"]
    need(isinstance(vf, (int, float)) and 0 <= vf < 1, f"val_fraction must be in [0, 1), got {vf!r}")
    need(recipe["amp"] in ("auto", "bf16", "fp16", False, None, "off", True),
         f"amp must be auto, bf16, fp16 or false, got {recipe['amp']!r}")
    gc = recipe.get("grad_clip")
    if gc is not None:
        need(isinstance(gc, dict) and gc.get("kind", "norm") in ("norm", "value") and gc.get("max", 0) > 0,
             "grad_clip must be null or {kind: norm|value, max: > 0}")
    es = recipe.get("early_stopping")
    if es is not None:
        need(isinstance(es, dict) and isinstance(es.get("patience"), int) and es.get("mode", "max") in ("min", "max"),
             "early_stopping must be null or {monitor, mode: min|max, patience: int}")
    need(recipe["mask_interpolation"] in ("bilinear", "nearest"), "mask_interpolation must be bilinear or nearest")
