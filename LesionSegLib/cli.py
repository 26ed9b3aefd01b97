"""``lesionseg`` command line. Each verb is one ``cmd_*`` function; heavy imports (torch) happen inside the verbs, so ``lesionseg --help`` is instant."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (``lesionseg VERB: error: …``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    p = _Parser(prog="lesionseg", description="LesionSeg: lesion segmentation networks.")
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
    if args.verb not in ("list", "card"):
        _quiet_itk()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"lesionseg {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one line; LESIONSEG_DEBUG=1 shows the traceback
        if os.environ.get("LESIONSEG_DEBUG"):
            raise
        print(f"lesionseg {args.verb}: error: {error_message(e)}", file=sys.stderr)
        return 1


def error_message(e: BaseException) -> str:
    """One line saying what went wrong (file-system errors name their file)."""
    from .models import UnknownModelError, UnknownPresetError
    if isinstance(e, (UnknownModelError, UnknownPresetError)) and e.args:
        text = str(e.args[0])      # KeyError's str() would quote the message
    elif isinstance(e, OSError) and e.strerror and type(e).__str__ is OSError.__str__:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _quiet_itk() -> None:
    """ITK prints header warnings (several lines each) to stderr; LesionSeg reports the
    problems that matter itself, one line per file."""
    try:
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    except Exception:  # pragma: no cover
        pass


if __name__ == "__main__":
    raise SystemExit(main())
