"""The training loop: :class:`Trainer` trains one resolved recipe (:class:`.model_setup.RunConfig`)
on prepared data and writes the run's files (listed in :mod:`.trainer`)."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from .. import models
from ..data.dataset import EpochBatchSampler, SegmentationDataset, collate
from ..jobs import Cancelled
from .data_prep import PreparedData
from .distributed import DistEnv
from .model_setup import RunConfig, build_model, trained_preset
from .optim import autocast_choice, build_optimizer
from .output import BEST_NAME, LAST_NAME, LOG_NAME, STATE_NAME, Printer, write_csv, write_json, draw_curves
from .result import TrainingError, TrainResult
from .schedule import Schedule, apply_lr
from .state import RunState, rng_state, set_rng_state, zero_acc
from .validate import validate_epoch


class Trainer:
    """One run: the constructor builds network, loss, optimiser, schedule, precision and
    data; :meth:`restore` continues a saved run; :meth:`fit` trains. Only rank 0
    (``dist.is_main``) writes files; every rank takes part in the collectives."""

    def __init__(self, cfg: RunConfig, prepared: PreparedData, dev: torch.device, dist: DistEnv, out: Path,
                 progress: Optional[Callable[[int, int, int, Dict[str, Any]], None]] = None, cancel=None,
                 pretrained=None, verbose: bool = False, resuming: bool = False,
                 t_start: Optional[float] = None):
        self.cfg, self.recipe, self.prepared = cfg, cfg.recipe, prepared
        self.dev, self.dist, self.out, self.main = dev, dist, out, dist.is_main
        self.progress, self.cancel, self.pretrained = progress, cancel, pretrained
        self.t_start = time.time() if t_start is None else t_start
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
        self.printer = Printer(verbose and self.main)
        self.model, self.channels_last = build_model(cfg, dev, dist, pretrained if not resuming else None,
                                                     self.printer)
        self.ddp_model = self.model
        self._build_optimisation()
        self._build_data()
        self._read_options()
        self.state = RunState()
        self.tb = None

    # ------------------------------------------------------------------ building
    def _build_optimisation(self) -> None:
        """Loss, optimiser, lr schedule and mixed precision."""
        from ..losses import build_loss
        cfg, recipe, dev = self.cfg, self.recipe, self.dev
        self.loss_fn = build_loss(cfg.name, cfg.preset, **(recipe.get("loss") or {})).to(dev)
        self.optimizer = build_optimizer(self.model, cfg.name, recipe["optimizer"])
        self.schedule = Schedule(recipe.get("schedule"), recipe["epochs"])
        self.amp_dtype, use_scaler = autocast_choice(recipe.get("amp", "auto"), dev)
        amp = self.amp_dtype
        self.printer.line(f"training on {dev} in " + (f"{str(amp).split('.')[-1]} autocast" if amp else "fp32")
                          + (" (GradScaler)" if use_scaler else ""))
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if dev.type == "cuda" else None
        self.epochs = int(recipe["epochs"])

    def _build_data(self) -> None:
        """The batch sampler and the datasets (validation: no augmentation, nearest masks)."""
        cfg, recipe, prepared, dist = self.cfg, self.recipe, self.prepared, self.dist
        ms = recipe.get("multiscale") or {}
        n_workers = recipe.get("num_workers", "auto")
        if n_workers == "auto":
            n_workers = (0 if self.dev.type == "cpu"
                         else min(8, max(1, (os.cpu_count() or 2) // max(1, dist.world_size))))
        self.n_workers = n_workers
        self.sampler = EpochBatchSampler(len(prepared.train), int(recipe["batch_size"]), cfg.seed, sizes=cfg.sizes,
                                         size_mode=ms.get("mode", "random") if ms else "random",
                                         weights=getattr(prepared.train, "weights", None),
                                         rank=dist.rank, world_size=dist.world_size,
                                         augment=bool(recipe.get("augment")), epoch_length=recipe.get("epoch_length"))
        tile_from = recipe.get("tile_from") if prepared.fit == "tile" else None
        self.train_ds = SegmentationDataset(prepared.train, cfg.spec, cfg.size, recipe.get("augment"),
                                            recipe.get("mask_interpolation", "bilinear"), prepared.fit, tile_from)
        self.val_ds = None
        if prepared.val is not None:
            self.val_ds = SegmentationDataset(prepared.val, cfg.spec, cfg.size, None, "nearest", prepared.fit,
                                              tile_from)

    def _read_options(self) -> None:
        cfg, recipe = self.cfg, self.recipe
        preset_for_card = trained_preset(models.preset(cfg.name, cfg.preset), cfg.input_spec, cfg.spec)
        self.card = dict(models.card(cfg.name), preset=preset_for_card)
        self.threshold = models.Outputs.of(preset_for_card).threshold
        self.accumulate = int(recipe.get("accumulate", 1))
        self.clip = recipe.get("grad_clip")
        self.every = int(recipe.get("checkpoint_every_steps") or 0)
        self.log_every = int(recipe.get("log_every_steps") or 0)
        self.dyconv = recipe.get("dyconv_temperature")
        self.best_monitor = recipe.get("best_monitor", "val_dice")
        self.es = recipe.get("early_stopping")

    def restore(self, saved_state: Dict[str, Any]) -> None:
        """Continue from a saved ``training_state.pt``: weights, optimiser, scaler, schedule,
        position and bookkeeping, RNG states."""
        st = saved_state["training_state"]
        ckpt.load_state_dict_strict(self.model, saved_state["state_dict"], str(self.out / STATE_NAME))
        self.optimizer.load_state_dict(st["optimizer"])
        for g, ig in zip(self.optimizer.param_groups, st["initial_lrs"]):
            g["initial_lr"] = ig
        if st.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(st["scaler"])
        self.schedule.load_state_dict(st["schedule"])
        self.state = RunState.from_saved(st, self.dist.rank)
        set_rng_state(st["rng"])

    def _start(self) -> None:
        """DDP around the network; rank 0 records recipe and data and opens TensorBoard."""
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
                find_unused_parameters=bool(self.recipe.get("find_unused_parameters", False)))
        if self.main:
            write_json(self.out / "recipe.json", self.recipe)
            write_json(self.out / "data.json", self.prepared.description)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # TensorBoard not installed: CSV and PNG only
                self.tb = None

    # ------------------------------------------------------------------ records
    def provenance(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        s = self.state
        return {"recipe": self.recipe, "data": {k: v for k, v in self.prepared.description.items() if k != "files"},
                "metrics": metrics, "loss": getattr(self.loss_fn, "config", {}),
                "training": {"seed": self.cfg.seed, "device": str(self.dev), "world_size": self.dist.world_size,
                             "amp": str(self.amp_dtype) if self.amp_dtype else None, "epochs_run": s.epoch,
                             "global_step": s.global_step, "best_epoch": s.best_epoch,
                             "torch_threads": torch.get_num_threads(),
                             "deterministic": torch.are_deterministic_algorithms_enabled(),
                             "pretrained": str(self.pretrained) if self.pretrained else None}}

    def reduced_acc(self) -> Dict[str, Any]:
        """The running train-loss sums of all ranks (a collective: every rank calls it)."""
        acc = self.state.run_acc
        if not self.dist.enabled:
            return acc
        keys = sorted(acc["components"])
        t = torch.tensor([acc["loss_sum"], acc["n"]] + [acc["components"][k] for k in keys],
                         dtype=torch.float64, device=self.dev)
        self.dist.all_reduce_sum(t)
        t = t.cpu().tolist()
        return {"loss_sum": t[0], "n": int(round(t[1])), "components": dict(zip(keys, t[2:]))}

    def save_state(self) -> None:
        """``training_state.pt`` at the current position (a collective, rank 0 writes)."""
        acc = self.reduced_acc()
        if not self.main:
            return
        s, opt = self.state, self.optimizer
        st = {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
              "optimizer": opt.state_dict(), "initial_lrs": [g["initial_lr"] for g in opt.param_groups],
              "scaler": self.scaler.state_dict() if self._scaling else None,
              "schedule": self.schedule.state_dict(), "history": s.history, "best_value": s.best_value,
              "best_epoch": s.best_epoch, "es_best": s.es_best, "es_bad": s.es_bad, "run_acc": acc,
              "rng": rng_state(), "recipe": self.recipe, "seed": self.cfg.seed,
              "elapsed": s.elapsed_before + time.time() - self.t_start}
        ckpt.save(self.out / STATE_NAME, self.model, card=self.card, config=self.cfg.full_config,
                  provenance=self.provenance(s.history[-1] if s.history else {}), extra={"training_state": st})

    def result(self, stopped_early: bool = False) -> TrainResult:
        from ..inference.fastconv import restore_convolutions
        restore_convolutions(self.model)  # the caller gets the network as built (nn.Conv2d)
        best, last = self.out / BEST_NAME, self.out / LAST_NAME
        return TrainResult(str(best) if best.exists() else None, str(last) if last.exists() else None,
                           self.state.history, state_checkpoint=str(self.out / STATE_NAME), out_dir=str(self.out),
                           stopped_early=stopped_early, model=self.model)

    def check_cancel(self) -> None:
        """When cancelled: save a resumable state and raise ``Cancelled`` (``.result`` set)."""
        if self.cancel is None or not getattr(self.cancel, "cancelled", False):
            return
        self.save_state()
        if self.main and self.state.history:
            draw_curves(self.out, self.state.history)
        self.dist.barrier()
        err = Cancelled("training cancelled by the user; resume with resume=True")
        err.result = self.result()
        raise err

    # ------------------------------------------------------------------ training
    @property
    def _scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def fit(self) -> TrainResult:
        """Train to the recipe's last epoch, or until early stopping or the time limit."""
        self._start()
        stopped_early = False
        while self.state.epoch < self.epochs:
            if self._should_stop():
                stopped_early = True
                break
            self.end_epoch(*self.train_epoch())
        if self.tb is not None:
            self.tb.close()
        if self.main and self.state.history:
            draw_curves(self.out, self.state.history)
        self.dist.barrier()
        return self.result(stopped_early)

    def _should_stop(self) -> bool:
        s, es, limit = self.state, self.es, self.recipe.get("time_limit_s")
        if es is not None and s.es_bad >= int(es["patience"]):
            return True  # Keras EarlyStopping: stop after `patience` epochs without improvement
        if limit and s.history:
            # stop between epochs when the next one would end past the limit (a resume continues)
            used = s.elapsed_before + time.time() - self.t_start
            if used + float(s.history[-1].get("epoch_time_s", 0.0)) > float(limit):
                self.printer.line(f"time limit {limit} s reached after {s.epoch} epochs ({used:.0f} s)")
                return True
        return False

    def _loader(self) -> torch.utils.data.DataLoader:
        # a private generator: the loader never draws from the global torch RNG, which
        # keeps that RNG's stream identical between an interrupted and a whole run
        g = torch.Generator()
        g.manual_seed(self.cfg.seed)
        return torch.utils.data.DataLoader(self.train_ds, batch_sampler=self.sampler, num_workers=int(self.n_workers),
                                           collate_fn=collate, pin_memory=self.dev.type == "cuda", generator=g)

    def train_epoch(self) -> Tuple[int, float]:
        """The epoch's batches (the rest of them after a mid-epoch resume);
        ``(steps in the epoch, its start time)``."""
        s = self.state
        apply_lr(self.optimizer, self.schedule.factor(s.epoch))
        if self.dyconv and hasattr(self.model, "set_dyconv_temperature"):
            t0, t1, n = float(self.dyconv["start"]), float(self.dyconv["end"]), max(1, int(self.dyconv["epochs"]))
            self.model.set_dyconv_temperature(t0 + (t1 - t0) * min(1.0, s.epoch / n))
        self.sampler.set_epoch(s.epoch, s.step_in_epoch)
        steps_total = len(self.sampler) + s.step_in_epoch
        if s.step_in_epoch == 0:
            s.run_acc = zero_acc()
        self.model.train()
        self.loss_fn.train()
        self.printer.start_epoch(s.epoch, self.epochs, steps_total, s.step_in_epoch)
        t_epoch = time.time()
        loader = self._loader()
        self.optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            self.train_step(batch, steps_total)
        return steps_total, t_epoch

    def train_step(self, batch: Dict[str, torch.Tensor], steps_total: int) -> None:
        """One batch forward and backward; an optimiser step every ``accumulate`` batches."""
        s = self.state
        loss = self._backward(batch)
        s.step_in_epoch += 1
        boundary = s.step_in_epoch % self.accumulate == 0 or s.step_in_epoch == steps_total
        if boundary:
            self.optimizer_step()
        lv = float(loss.detach())
        s.run_acc["loss_sum"] += lv
        s.run_acc["n"] += 1
        for k, v in getattr(self.loss_fn, "last_components", {}).items():
            s.run_acc["components"][k] = s.run_acc["components"].get(k, 0.0) + float(v)
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.printer.step(s.step_in_epoch, steps_total, lv, lr_now, self.log_every)
        if self.tb is not None and self.log_every and s.global_step % self.log_every == 0:
            self.tb.add_scalar("train/loss_step", lv, s.global_step)
        if self.progress is not None:
            self.progress(s.epoch, s.step_in_epoch, steps_total, {"loss": lv, "lr": lr_now, "epochs": self.epochs})
        if boundary:
            if self.every and s.global_step % self.every == 0 and s.step_in_epoch < steps_total:
                self.save_state()
            self.check_cancel()

    def _backward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss, its gradient (scaled, divided by ``accumulate``) accumulated."""
        batch = {k: v.to(self.dev, non_blocking=True) for k, v in batch.items()}
        x = batch["image"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.ddp_model(x)
            loss = self.loss_fn(outputs, batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {float(loss)} at epoch {self.state.epoch + 1}, step "
                                f"{self.state.step_in_epoch + 1}; lower the learning rate (optimizer.lr) or "
                                f"enable grad_clip")
        scaled = loss / self.accumulate
        if self._scaling:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return loss

    def optimizer_step(self) -> None:
        """Unscale, clip, step, clear the gradients."""
        opt = self.optimizer
        if self._scaling:
            self.scaler.unscale_(opt)
        if self.clip:
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.clip.get("kind", "norm") == "value":
                torch.nn.utils.clip_grad_value_(params, float(self.clip["max"]))
            else:
                torch.nn.utils.clip_grad_norm_(params, float(self.clip["max"]))
        if self._scaling:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.state.global_step += 1

    # ------------------------------------------------------------------ end of epoch
    def end_epoch(self, steps_total: int, t_epoch: float) -> None:
        """The epoch's row (train loss, validation), best and early-stopping bookkeeping,
        files, report."""
        self.dist.broadcast_buffers(self.model)
        row = self._train_row()
        if self.val_ds is not None:
            row.update(self.validate())
        row["epoch_time_s"] = round(time.time() - t_epoch, 3)
        s = self.state
        s.history.append(row)
        improved_best = self._track(row)
        s.epoch += 1
        s.step_in_epoch = 0
        self.save_epoch(row, improved_best)
        vals = " ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss", "val_dice", "val_iou") if k in row)
        self.printer.line(f"epoch {s.epoch}/{self.epochs}  {vals}  lr {row['lr']:.3g}  ({row['epoch_time_s']:.1f} s)")
        if self.progress is not None:
            self.progress(s.epoch - 1, steps_total, steps_total, {**row, "epochs": self.epochs})
        self.check_cancel()

    def _train_row(self) -> Dict[str, Any]:
        acc = self.reduced_acc()
        s, n = self.state, max(1, acc["n"])
        row: Dict[str, Any] = {"epoch": s.epoch, "global_step": s.global_step,
                               "lr": self.optimizer.param_groups[0]["lr"], "train_loss": acc["loss_sum"] / n}
        for k, v in sorted(acc["components"].items()):
            if k != "total":
                row[f"train_{k}"] = v / n
        return row

    def validate(self) -> Dict[str, float]:
        if self.dyconv and hasattr(self.model, "set_dyconv_temperature"):
            # validate the network that inference runs and best.pt holds: DyConv at the
            # configured temperature (1), not the annealed training one (30 → 1); the
            # next epoch sets the training temperature again
            self.model.set_dyconv_temperature(float(self.cfg.full_config.get("dyconv_temperature", 1.0)))
        val = validate_epoch(self.ddp_model, self.model, self.val_ds, self.loss_fn, self.cfg.spec, self.threshold,
                        self.dev, self.dist, self.amp_dtype, self.channels_last, self.recipe, self.cfg.name,
                        self.cancel)
        if val is None:  # cancelled during validation: resume re-validates this epoch
            self.check_cancel()
        return val

    def _track(self, row: Dict[str, Any]) -> bool:
        """Feed the plateau schedule and early stopping their monitors (validation, else the
        train loss); whether this epoch is the best so far by ``best_monitor``."""
        s, es, mon = self.state, self.es, self.best_monitor
        if self.schedule.monitor:
            self.schedule.observe(row.get(self.schedule.monitor, row.get("train_loss")))
        improved_best = False
        bv = row.get(mon)
        if bv is None and self.val_ds is None:
            bv = -row["train_loss"] if mon.endswith(("dice", "iou")) else row["train_loss"]
        if bv is not None and math.isfinite(bv):
            if s.best_value is None or (bv < s.best_value if mon.endswith("loss") else bv > s.best_value):
                s.best_value, s.best_epoch, improved_best = bv, s.epoch, True
        if es is not None:
            v = row.get(es.get("monitor", "val_loss"))
            if v is not None and math.isfinite(v):
                better = s.es_best is None or (v < s.es_best if es.get("mode", "min") == "min" else v > s.es_best)
                s.es_best, s.es_bad = (v, 0) if better else (s.es_best, s.es_bad + 1)
        return improved_best

    def save_epoch(self, row: Dict[str, Any], improved_best: bool) -> None:
        """Rank 0: ``last.pt`` (and ``best.pt``), ``log.csv``, TensorBoard; then the state."""
        s, out = self.state, self.out
        if self.main:
            metrics = dict(row)
            for path in [out / LAST_NAME] + ([out / BEST_NAME] if improved_best else []):
                ckpt.save(path, self.model, card=self.card, config=self.cfg.full_config,
                          provenance=self.provenance(metrics))
            write_csv(out / LOG_NAME, s.history)
            if self.tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("epoch",):
                        self.tb.add_scalar(k, v, s.epoch)
        self.save_state()
        self.dist.barrier()
