"""The optimiser of a recipe (parameter groups, SGD/Adam/AdamW) and its mixed precision."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

from .. import models
from .recipes import RecipeError


def param_groups(model: nn.Module, name: str, opt: Dict[str, Any]) -> List[Dict[str, Any]]:
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


def build_optimizer(model: nn.Module, name: str, opt: Dict[str, Any]) -> torch.optim.Optimizer:
    known = {"sgd": {"momentum", "nesterov"}, "adam": {"betas", "eps"}, "adamw": {"betas", "eps"}}
    common = {"name", "lr", "weight_decay", "param_groups", "backbone_lr_mult"}
    unknown = set(opt) - common - known[opt["name"]]
    if unknown:
        raise RecipeError(f"optimizer {opt['name']}: unknown option(s) {', '.join(sorted(unknown))}; to change "
                          f"the optimiser give the whole section, e.g. --set 'optimizer={{\"name\": "
                          f"\"{opt['name']}\", \"lr\": {opt.get('lr')}}}'")
    groups = param_groups(model, name, opt)
    if opt["name"] == "sgd":
        return torch.optim.SGD(groups, lr=float(opt["lr"]), momentum=float(opt.get("momentum", 0.0)),
                               nesterov=bool(opt.get("nesterov", False)))
    cls = torch.optim.Adam if opt["name"] == "adam" else torch.optim.AdamW
    kw = {"betas": tuple(opt.get("betas", (0.9, 0.999))), "eps": float(opt.get("eps", 1e-8))}
    return cls(groups, lr=float(opt["lr"]), **kw)


def autocast_choice(recipe_amp, device: torch.device):
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
