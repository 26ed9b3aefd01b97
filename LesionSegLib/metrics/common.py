"""What the metrics share: the error types, NaN, and label arrays from images or tensors."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk


NAN = float("nan")


class MetricsError(ValueError):
    """Inputs that cannot be compared, with the reason."""


class GeometryError(MetricsError):
    """Prediction and reference are not on the same voxel grid."""


def _as_array(x) -> np.ndarray:
    if isinstance(x, sitk.Image):
        if x.GetNumberOfComponentsPerPixel() != 1:
            raise MetricsError(f"a label image must have one component per voxel, this one has "
                               f"{x.GetNumberOfComponentsPerPixel()}")
        return sitk.GetArrayViewFromImage(x)
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
