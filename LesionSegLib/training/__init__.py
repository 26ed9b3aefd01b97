"""Training of the LesionSeg networks: recipes as data, a resumable trainer, DDP.

>>> from LesionSegLib.training import train, load_recipe
>>> recipe = load_recipe("m2snet", "polyp", epochs=5)                   # doctest: +SKIP
>>> result = train("m2snet", "data/polyp", "runs/m2snet", preset="polyp",
...                recipe_overrides={"epochs": 5})                          # doctest: +SKIP
>>> result.best_checkpoint                                              # doctest: +SKIP

Modules: :mod:`.recipes` (``recipes/*.json``), :mod:`.trainer` (:func:`train`), the
:class:`~.loop.Trainer` it runs (:mod:`.loop`) and what that uses: :mod:`.data_prep`,
:mod:`.model_setup`, :mod:`.optim`, :mod:`.schedule`, :mod:`.validate`, :mod:`.state`,
:mod:`.output`, :mod:`.distributed`, :mod:`.plot`. Importing this package does not
import torch; :func:`train` does, when called.
"""
from __future__ import annotations

from .recipes import RecipeError, available_recipes, load_recipe, parse_assignment
from .result import TrainingError, TrainResult

__all__ = ["train", "load_recipe", "TrainResult", "TrainingError", "RecipeError", "available_recipes",
           "parse_assignment"]


def train(model_name, data, out_dir, preset=None, recipe_overrides=None, resume=False, device="auto", seed=0,
          progress=None, cancel=None, pretrained=None, **kwargs) -> TrainResult:
    """See :func:`LesionSegLib.training.trainer.train` (imports torch on first call)."""
    from .trainer import train as _train
    return _train(model_name, data, out_dir, preset=preset, recipe_overrides=recipe_overrides, resume=resume,
                  device=device, seed=seed, progress=progress, cancel=cancel, pretrained=pretrained, **kwargs)
