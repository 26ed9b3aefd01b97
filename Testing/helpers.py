"""Helpers shared by the tests: a synthetic oblique volume with a known lesion, hand-set
U-Nets whose output is a known function of the input (an intensity threshold, optionally
read from a neighbouring pixel), so that tests know where the segments must be without
training anything, and rotation matrices for oblique directions."""
from __future__ import annotations

import numpy as np

# Rz(30°)·Rx(-15°): an oblique direction with no axis aligned to the world axes
_c30, _s30 = np.cos(np.radians(30)), np.sin(np.radians(30))
_c15, _s15 = np.cos(np.radians(-15)), np.sin(np.radians(-15))
OBLIQUE = (np.array([[_c30, -_s30, 0], [_s30, _c30, 0], [0, 0, 1]])
           @ np.array([[1, 0, 0], [0, _c15, -_s15], [0, _s15, _c15]]))
SPACING = (0.9, 1.1, 3.0)
ORIGIN = (12.5, -30.25, 47.0)
SIZE_XYZ = (64, 48, 10)
BACKGROUND, LESION = 100.0, 400.0


def lesion_volume(seed: int = 0, size_xyz=SIZE_XYZ):
    """(SimpleITK image, lesion mask z,y,x): a smooth background with noise and one
    bright ellipsoid placed off-centre, so that any flip or axis swap would show."""
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    # ellipsoid in millimetres, so that it is round in space despite anisotropic voxels
    cx, cy, cz = 0.68 * nx, 0.35 * ny, 0.55 * nz
    r = ((x - cx) * SPACING[0] / 9.0) ** 2 + ((y - cy) * SPACING[1] / 7.0) ** 2 + ((z - cz) * SPACING[2] / 7.5) ** 2
    lesion = r <= 1.0
    vol = BACKGROUND + 15.0 * x / nx + rng.normal(0.0, 6.0, x.shape)
    vol[lesion] = LESION + rng.normal(0.0, 6.0, int(lesion.sum()))
    image = sitk.GetImageFromArray(vol.astype(np.float32))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(tuple(OBLIQUE.reshape(-1)))
    return image, lesion


def threshold_unet(z_threshold: float = 2.5, gain: float = 8.0, *, preset=None, shift=(0, 0), small: bool = True):
    """A real registered U-Net whose logit is ``gain·(relu(v(y+dy, x+dx)) − z_threshold)`` for
    the normalised input v: the first conv reads the ``shift`` = (dy, dx) neighbour into
    channel 0, every other conv of the top encoder and decoder level passes channel 0
    through (centre tap 1), the deeper path contributes zero, BatchNorms are the identity,
    and the head thresholds. ``small``: width 4, depth 2 (else the preset's configuration).
    Built with models.create, so it is saved, loaded, fused and run exactly like a trained
    network."""
    import torch
    from LesionSegLib import models
    net = models.create("unet", preset=preset, **(dict(base_width=4, depth=2) if small else {}))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)   # so that BN is exactly the identity
                m.weight.fill_(1.0)
        first = True
        for level in (net.encoder[0], net.decoder[-1].conv):  # decoder input: [skip, up], channel 0 = skip 0
            for block in level:
                conv = next(c for c in block.modules() if isinstance(c, torch.nn.Conv2d))
                dy, dx = shift if first else (0, 0)
                conv.weight[0, 0, 1 + dy, 1 + dx] = 1.0
                first = False
        net.head.weight[0, 0, 0, 0] = gain
        net.head.bias[0] = -gain * z_threshold
    return net.eval()


def shifted_threshold_unet(preset="covid-ct", dy=1, dx=1, t=0.5, gain=20.0):
    """:func:`threshold_unet` in the preset's full configuration, reading the (dy, dx) neighbour."""
    return threshold_unet(t, gain, preset=preset, shift=(dy, dx), small=False)


def rotation(axis, degrees):
    a = np.asarray(axis, float)
    a /= np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    th = np.radians(degrees)
    return np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * k @ k


#: the preset the threshold U-Net of the Slicer-logic tests is saved with (conftest.unet_checkpoint)
THRESHOLD_PRESET = "stroke-dwi"


def require_slicer_core():
    """Skip the calling test module unless the real MRML of slicer-core is installed;
    returns the ``slicer`` module."""
    import pytest
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
    return slicer
