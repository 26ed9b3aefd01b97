"""LesionSegLib: the Slicer-free core of LesionSeg.

Five published lesion-segmentation networks (MSE-Net, M2SNet, L-Seg, BSNet, MS-LKSeg)
and a U-Net baseline behind one registry (:mod:`LesionSegLib.models`), their checkpoint
format (:mod:`LesionSegLib.checkpoint`) and the ``lesionseg`` command line.

Importing this package does not import torch; Slicer loads it at startup.
"""
__version__ = "0.1.0"
