"""Case-level train/validation splits and k-fold cross-validation.

Every item belongs to a case (patient, video sequence, volume); all items of a case go to
the same side. Items are anything with a ``case`` attribute (:class:`ImagePair`,
:class:`VolumePair`, :class:`VolumeCase`), or pass ``case_of`` to compute it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError


def _groups(items: Sequence[Any], case_of: Optional[Callable[[Any], str]]) -> Dict[str, List[int]]:
    groups: Dict[str, List[int]] = {}
    for i, it in enumerate(items):
        c = case_of(it) if case_of else getattr(it, "case", None)
        if c is None:
            raise DataError(f"item {i} ({it!r}) has no case id; pass case_of=…")
        groups.setdefault(str(c), []).append(i)
    return groups


def case_split(items: Sequence[Any], val_fraction: float = 0.2, seed: int = 0,
               case_of: Optional[Callable[[Any], str]] = None) -> Tuple[List[Any], List[Any]]:
    """(train, validation) with about ``val_fraction`` of the items in validation, whole
    cases only. Cases are shuffled with ``seed`` and taken until the fraction is reached
    (at least one case each side when there are two or more cases)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = _groups(items, case_of)
    names = sorted(groups)
    if val_fraction == 0 or len(names) < 2:
        if val_fraction > 0:
            raise DataError(f"a case-level validation split needs at least 2 cases; the data has {len(names)} "
                            f"({names[0] if names else 'none'}); give the case of each file (case_regex / "
                            f"cases.csv) or set val_fraction=0")
        return list(items), []
    order = np.random.default_rng(seed).permutation(len(names))
    target = val_fraction * len(items)
    val_idx: List[int] = []
    val_cases = 0
    for j in order:
        if val_cases >= len(names) - 1 or len(val_idx) >= target:
            break
        size = len(groups[names[j]])
        # take a case when it brings the validation size closer to the target (the first
        # case always: validation is never empty)
        if val_cases == 0 or abs(len(val_idx) + size - target) < abs(len(val_idx) - target):
            val_idx.extend(groups[names[j]])
            val_cases += 1
    chosen = set(val_idx)
    return [it for i, it in enumerate(items) if i not in chosen], [it for i, it in enumerate(items) if i in chosen]


def kfold_splits(items: Sequence[Any], k: int = 5, seed: int = 0,
                 case_of: Optional[Callable[[Any], str]] = None) -> List[Tuple[List[Any], List[Any]]]:
    """``k`` (train, validation) folds; each case is in exactly one validation fold.
    Cases are shuffled with ``seed`` and dealt, largest first, to the fold with the fewest
    items so far, which balances folds when cases have different numbers of slices."""
    groups = _groups(items, case_of)
    names = sorted(groups)
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if len(names) < k:
        raise DataError(f"{k}-fold cross-validation needs at least {k} cases; the data has {len(names)}")
    rng = np.random.default_rng(seed)
    shuffled = [names[j] for j in rng.permutation(len(names))]
    shuffled.sort(key=lambda n: -len(groups[n]))  # stable: ties keep the shuffled order
    folds: List[List[int]] = [[] for _ in range(k)]
    for n in shuffled:
        f = min(range(k), key=lambda i: (len(folds[i]), i))
        folds[f].extend(groups[n])
    out = []
    for f in range(k):
        val = set(folds[f])
        out.append(([it for i, it in enumerate(items) if i not in val], [it for i, it in enumerate(items) if i in val]))
    return out


def explicit_split(items: Sequence[Any], split, case_of: Optional[Callable[[Any], str]] = None):
    """``(train, validation, test cases)`` from a fixed split: a dict or a JSON file with
    ``val`` and optional ``test`` lists of case ids. Test cases are left out of training
    and validation entirely (held out for the final metrics); every other case trains.
    A listed case that the data does not have is an error (a typo would silently move a
    case into training)."""
    import json
    from pathlib import Path
    if isinstance(split, (str, Path)):
        path = Path(split)
        try:
            split = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the split file ({e})") from None
    if not isinstance(split, dict) or not isinstance(split.get("val"), list):
        raise DataError("a split must be a JSON object with a 'val' list of case ids (and optionally 'test')")
    groups = _groups(items, case_of)
    val, test = {str(c) for c in split["val"]}, {str(c) for c in split.get("test") or []}
    unknown = sorted((val | test) - set(groups))
    if unknown:
        raise DataError(f"the split names {len(unknown)} case(s) the data does not have: {', '.join(unknown[:5])}")
    if val & test:
        raise DataError(f"the split lists case(s) in both val and test: {', '.join(sorted(val & test)[:5])}")
    case = {i: c for c, idx in groups.items() for i in idx}
    train = [it for i, it in enumerate(items) if case[i] not in val and case[i] not in test]
    validation = [it for i, it in enumerate(items) if case[i] in val]
    if not train:
        raise DataError("the split leaves no case for training")
    return train, validation, test
