"""Orientation of volumes: which array axis the 2D networks slice, and how results go
back onto the input grid exactly.

The networks were trained on axial slices shown the radiological way (anterior at the
top, the patient's right on the left of the image). That is the array layout of an
image whose direction matrix is the identity in ITK's LPS world: index x runs towards
the patient's Left, y towards Posterior, z towards Superior, so a numpy array
``[z, y, x]`` holds axial slices in display orientation. This layout is called
*canonical* here; it is what ``SimpleITK.DICOMOrient(image, "LPS")`` produces.

Any input volume is brought to it by a permutation of its axes and flips of some of
them — never by resampling. For an oblique direction matrix each canonical axis takes
the input axis closest to it (largest absolute direction cosine), exactly as DICOMOrient
does; the volume is then sliced along the input axis closest to superior–inferior, and
each slice keeps its own (slightly tilted) voxel grid. No voxel is interpolated, so the
result is put back on the input grid by the inverse permutation and flips, bit for bit.

The canonical arrangement is applied as numpy *views* (transpose + negative strides)
of the input array and of the output arrays, so no whole-volume copy is made: a batch
of canonical slices is gathered from the input, and its results are written through
the canonical view straight into the output arrays laid out like the input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

#: letters of the LPS axes, positive direction first
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


def direction_matrix(direction: Sequence[float], dim: int = 3) -> np.ndarray:
    """ITK's flat, row-major direction tuple as a (dim, dim) matrix whose column i is the
    physical direction of index axis i."""
    d = np.asarray(direction, dtype=np.float64)
    if d.size != dim * dim:
        raise ValueError(f"a {dim}-D direction needs {dim * dim} numbers, got {d.size}")
    return d.reshape(dim, dim)


def orientation_code(direction: Sequence[float]) -> str:
    """Three letters naming where each index axis (x, y, z) points, e.g. 'RAS' for a
    typical NIfTI volume, 'LPS' for the canonical layout (nearest axes for obliques)."""
    perm, flip = axis_mapping(direction)
    letters = [""] * 3
    for j, (i, f) in enumerate(zip(perm, flip)):
        letters[i] = _AXIS_LETTERS[j][1 if f else 0]
    return "".join(letters)


def axis_mapping(direction: Sequence[float]) -> Tuple[Tuple[int, int, int], Tuple[bool, bool, bool]]:
    """``(perm, flip)`` in ITK axis order: canonical (LPS) axis j is input index axis
    ``perm[j]``, reversed when ``flip[j]``.

    Each input axis goes to the physical axis of its largest direction cosine; input
    axes are assigned in decreasing order of that cosine, so that a strongly oblique
    axis never takes the place of a clearly aligned one (what ITK's orientation filter
    does; ties at exactly 45° are broken in index order)."""
    d = direction_matrix(direction)
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise ValueError(f"the direction matrix is singular or not finite: {tuple(np.round(d.ravel(), 4))}")
    perm = [-1, -1, -1]
    flip = [False, False, False]
    free_rows = {0, 1, 2}
    for i in sorted(range(3), key=lambda c: -np.max(np.abs(d[:, c]))):
        j = max(sorted(free_rows), key=lambda r: abs(d[r, i]))
        free_rows.discard(j)
        perm[j] = i
        flip[j] = bool(d[j, i] < 0)
    return tuple(perm), tuple(flip)


def obliquity_degrees(direction: Sequence[float]) -> float:
    """Largest angle between an input axis and the canonical axis it was mapped to."""
    d = direction_matrix(direction)
    perm, _ = axis_mapping(direction)
    cos = [abs(d[j, perm[j]]) / max(np.linalg.norm(d[:, perm[j]]), 1e-12) for j in range(3)]
    return float(math.degrees(math.acos(min(1.0, min(cos)))))


@dataclass(frozen=True)
class Canonical:
    """The canonical arrangement of one input grid.

    ``perm``/``flip`` in ITK axis order (see :func:`axis_mapping`); ``shape`` of the
    input array (z, y, x). ``view(a)`` works on any array whose first three axes are the
    input's (z, y, x), extra trailing axes (colour components) are kept, and
    ``view_leading(a)`` on arrays with extra *leading* axes (per-class maps (C, z, y, x)).
    """
    perm: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]
    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]      # input spacing (x, y, z)

    @classmethod
    def of(cls, size_xyz: Sequence[int], spacing_xyz: Sequence[float], direction: Sequence[float]) -> "Canonical":
        perm, flip = axis_mapping(direction)
        shape = tuple(int(s) for s in reversed(tuple(size_xyz)))
        return cls(perm, flip, shape, tuple(float(s) for s in spacing_xyz))

    @property
    def numpy_axes(self) -> Tuple[int, int, int]:
        """Input numpy axis feeding each canonical numpy axis (z, y, x)."""
        return tuple(2 - self.perm[2 - b] for b in range(3))

    @property
    def slice_axis(self) -> int:
        """Numpy axis of the input array along which the volume is sliced (axial)."""
        return self.numpy_axes[0]

    @property
    def canonical_shape(self) -> Tuple[int, int, int]:
        return tuple(self.shape[a] for a in self.numpy_axes)

    @property
    def canonical_spacing(self) -> Tuple[float, float, float]:
        """Spacing (x, y, z) of the canonical layout."""
        return tuple(self.spacing[self.perm[j]] for j in range(3))

    def _flips(self) -> Tuple[bool, bool, bool]:
        return tuple(self.flip[2 - b] for b in range(3))  # per canonical numpy axis

    def view(self, array: np.ndarray) -> np.ndarray:
        if tuple(array.shape[:3]) != self.shape:
            raise ValueError(f"array of shape {array.shape[:3]} does not match the grid {self.shape}")
        v = np.transpose(array, self.numpy_axes + tuple(range(3, array.ndim)))
        for b, f in enumerate(self._flips()):
            if f:
                v = np.flip(v, axis=b)
        return v

    def view_leading(self, array: np.ndarray) -> np.ndarray:
        """Canonical view of an array shaped (…, z, y, x)."""
        lead = array.ndim - 3
        if tuple(array.shape[lead:]) != self.shape:
            raise ValueError(f"array of shape {array.shape[lead:]} does not match the grid {self.shape}")
        v = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.numpy_axes))
        for b, f in enumerate(self._flips()):
            if f:
                v = np.flip(v, axis=lead + b)
        return v

    def describe(self, direction: Sequence[float]) -> str:
        code = orientation_code(direction)
        angle = obliquity_degrees(direction)
        text = f"input orientation {code}; axial slices along index axis {'xyz'[self.perm[2]]}"
        if angle > 1e-3:
            text += f" (oblique by up to {angle:.1f}°, sliced without resampling)"
        return text
