"""``lesionseg`` command line. Each verb is one ``cmd_*`` function; heavy imports (torch) happen inside the verbs, so ``lesionseg --help`` is instant."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _format_count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def cmd_list(args: argparse.Namespace) -> int:
    from . import models
    rows = []
    for name in models.list_models():
        c = models.card(name)
        inp = c["input"]
        size = "×".join(str(s) for s in inp.get("size", [])) or "any"
        presets = ", ".join(c.get("presets", {})) or "-"
        rows.append({"name": name, "display_name": c["display_name"], "task": c["summary"].split(";")[0],
                     "presets": presets, "input": f"{inp['channels']}ch {size}",
                     "params": c["parameters"]["trainable"],
                     "outputs": len(c["outputs"]["names"]), "activation": c["outputs"]["activation"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("model", "network", "task presets", "input", "params", "outputs")
    table = [header] + [(r["name"], r["display_name"], r["presets"], r["input"], _format_count(r["params"]),
                         f"{r['outputs']} ({r['activation']})") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from . import models
    print(json.dumps(models.card(args.model), indent=2, ensure_ascii=False))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import load
    ck = load(args.checkpoint, model=args.model)
    n = sum(p.numel() for p in ck.model.parameters() if p.requires_grad)
    print(f"{args.checkpoint}: {ck.kind} weights of {ck.name} ({_format_count(n)} trainable parameters)")
    for k, v in ck.provenance.items():
        print(f"  {k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="lesionseg", description="LesionSeg: lesion segmentation networks.")
    p.add_argument("--version", action="version", version=f"lesionseg {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    s = sub.add_parser("list", help="list the registered networks")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("card", help="print a network's model card (JSON)")
    s.add_argument("model")
    s.set_defaults(func=cmd_card)
    s = sub.add_parser("inspect", help="load a weight file and describe it")
    s.add_argument("checkpoint")
    s.add_argument("--model", help="network name, for plain state dicts that are not recognised")
    s.set_defaults(func=cmd_inspect)
    _register_command_modules(sub)
    return p


def _register_command_modules(sub) -> None:
    import importlib
    import pkgutil
    from . import commands
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .models import UnknownModelError, UnknownPresetError
    try:
        return args.func(args)
    except (CheckpointError, UnknownModelError, UnknownPresetError) as e:
        print(f"lesionseg {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
