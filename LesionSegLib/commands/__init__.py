"""``lesionseg`` verbs beyond the registry ones, one module each.

A module here defines ``register(subparsers)``, which adds its sub-parser and sets
``func`` to a function taking the parsed ``argparse.Namespace`` and returning the exit
code. Modules must not import torch at import time (``lesionseg --help`` stays fast).
"""
