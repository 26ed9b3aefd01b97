"""``lesionseg train``: train a network with its recipe.

    lesionseg train --model bsnet --data covid-semiseg/train --out runs/bsnet
    lesionseg train --model m2snet --preset polyp --data kvasir --out runs/m2 --epochs 5 --set optimizer.lr=0.01
    lesionseg train --model bsnet --data … --out runs/bsnet --resume
    torchrun --nproc_per_node 4 -m LesionSegLib train --model m2snet --data … --out runs/m2

Ctrl-C stops at the next step after saving a resumable state (a second Ctrl-C aborts).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from ..validation import arg_type, device_arg, number


def register(subparsers) -> None:
    s = subparsers.add_parser("train", help="train a network on image/mask folders or volumes",
                              description="Train a LesionSeg network with its recipe (LesionSegLib/recipes/*.json). "
                                          "Every recipe value can be overridden with --set key=value "
                                          "(dotted keys reach into sections, e.g. optimizer.lr=0.01).")
    s.add_argument("--model", required=True, help="network name (lesionseg list)")
    s.add_argument("--preset", help="task preset (default: the card's default preset)")
    s.add_argument("--data", nargs="+", help="2D folder ({images,masks} | {Imgs,GT[,Edge]} | {image,mask}) or a "
                                             "folder of volumes (NIfTI/NRRD/MHA with label files); several 2D "
                                             "folders train as one set")
    s.add_argument("--split", help="JSON file with the 'val' (model selection) and 'test' (held out, never "
                                   "trained on) case ids; default: a seeded case-level split (val_fraction)")
    s.add_argument("--out", help="output folder (checkpoints, log.csv, curves.png)")
    s.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    s.add_argument("--epochs", type=arg_type(number, lo=1, integer=True), help="number of epochs")
    s.add_argument("--batch-size", type=arg_type(number, lo=1, integer=True), help="batch size (per process under torchrun)")
    s.add_argument("--lr", type=arg_type(number, lo=0.0, lo_open=True), help="base learning rate (optimizer.lr)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (JSON values: 5, 0.01, true, null, [352,352], {\"name\":\"adam\"})")
    s.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:1, mps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pretrained", help="ImageNet backbone file or checkpoint to start from")
    s.add_argument("--show-recipe", action="store_true", help="print the merged recipe and exit")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=run)


def _overrides(args) -> dict:
    from ..training import parse_assignment
    ov = {}
    for item in args.set:
        k, v = parse_assignment(item)
        ov[k] = v
    if args.epochs is not None:
        ov["epochs"] = args.epochs
    if args.batch_size is not None:
        ov["batch_size"] = args.batch_size
    if args.lr is not None:
        ov["optimizer.lr"] = args.lr
    if args.split is not None:
        ov["split"] = str(args.split)
    return ov


class _SignalToken:
    """Cancel token set by the first Ctrl-C."""
    cancelled = False


def run(args: argparse.Namespace) -> int:
    from ..data import DataError
    from ..training import RecipeError, TrainingError, load_recipe
    try:
        overrides = _overrides(args)
        if args.show_recipe:
            print(json.dumps(load_recipe(args.model, args.preset, overrides), indent=2))
            return 0
        if not args.data or not args.out:
            print("lesionseg train: error: --data and --out are required", file=sys.stderr)
            return 2
        from ..jobs import Cancelled
        from ..training import train
        token = _SignalToken()
        previous = None
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            def handler(signum, frame):
                if token.cancelled:
                    raise KeyboardInterrupt
                token.cancelled = True
                print("\nstopping after this step (Ctrl-C again to abort) …", file=sys.stderr, flush=True)
            previous = signal.signal(signal.SIGINT, handler)
        try:
            data = args.data[0] if len(args.data) == 1 else args.data
            result = train(args.model, data, args.out, preset=args.preset, recipe_overrides=overrides or None,
                           resume=args.resume, device=args.device, seed=args.seed, cancel=token,
                           pretrained=args.pretrained, verbose=not args.quiet)
        except Cancelled:
            print(f"lesionseg train: stopped; resume with: lesionseg train --model {args.model} --data "
                  f"{' '.join(args.data)} --out {args.out} --resume", file=sys.stderr)
            return 130
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    except (DataError, RecipeError, TrainingError) as e:
        print(f"lesionseg train: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        last = result.history[-1] if result.history else {}
        summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("val_dice", "val_iou", "train_loss") if k in last)
        print(f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}"
              + (f"\nlast epoch: {summary}" if summary else "") + ("\n(stopped early)" if result.stopped_early else ""))
    return 0
