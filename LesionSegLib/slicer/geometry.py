"""Volume geometry between MRML (RAS) and SimpleITK (LPS); ``slicer`` and ``vtk`` are
imported inside the functions.

Geometry conventions
--------------------
MRML volumes are in RAS, ITK/SimpleITK images in LPS. A volume node's ``IJKToRAS`` matrix
is ``[D·diag(spacing) | origin]`` with unit direction columns D; the SimpleITK image of
the same voxels has direction ``F·D`` and origin ``F·origin`` with ``F = diag(-1, -1, 1)``.
numpy arrays are (k, j, i) = (z, y, x) on both sides, so voxel arrays are never
transposed. Oblique directions, anisotropic spacing and any origin are kept exactly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import BridgeError

_LPS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras(node) -> np.ndarray:
    """4×4 IJKToRAS matrix of a volume node (its own coordinates, parent transform not applied)."""
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(a: np.ndarray):
    import vtk
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def sitk_geometry_to_ijk_to_ras(spacing, origin, direction) -> np.ndarray:
    """IJKToRAS of a SimpleITK geometry (LPS) — the inverse of :func:`ijk_to_ras_to_sitk_geometry`."""
    d = np.asarray(direction, float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = _LPS @ d @ np.diag(np.asarray(spacing, float))
    m[:3, 3] = _LPS @ np.asarray(origin, float)
    return m


def ijk_to_ras_to_sitk_geometry(matrix: np.ndarray):
    """(spacing, origin, direction) in LPS of an IJKToRAS matrix."""
    a = np.asarray(matrix, float)[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    if np.any(spacing <= 0):
        raise BridgeError(f"degenerate IJKToRAS matrix (zero spacing): {matrix.tolist()}")
    direction = _LPS @ (a / spacing)
    origin = _LPS @ np.asarray(matrix, float)[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.reshape(-1).tolist())


def volume_array(node) -> np.ndarray:
    """A copy of a volume node's voxels: (z, y, x) or (z, y, x, components)."""
    from vtk.util import numpy_support
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise BridgeError(f"volume {getattr(node, 'GetName', lambda: node)()!r} has no voxel data")
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    ncomp = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars)
    shape = (dims[2], dims[1], dims[0]) + ((ncomp,) if ncomp > 1 else ())
    # copy: the caller may run inference on another thread while the node changes
    return np.array(arr.reshape(shape), copy=True)


def volume_to_sitk(node):
    """SimpleITK image of a scalar or vector volume node, with its exact geometry
    (oblique direction, anisotropic spacing, origin; image extents not starting at 0
    are folded into the origin). Vector volumes (RGB) become vector images."""
    import SimpleITK as sitk
    arr = volume_array(node)
    matrix = ijk_to_ras(node)
    extent = node.GetImageData().GetExtent()
    if extent[0] or extent[2] or extent[4]:
        matrix = matrix.copy()
        matrix[:3, 3] = matrix[:3, :3] @ np.array([extent[0], extent[2], extent[4]], float) + matrix[:3, 3]
    spacing, origin, direction = ijk_to_ras_to_sitk_geometry(matrix)
    image = sitk.GetImageFromArray(arr, isVector=arr.ndim == 4)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def sitk_to_volume(image, scene, name: str, node_class: Optional[str] = None, node=None):
    """Add (or update ``node``) a volume node holding a SimpleITK image with its geometry.
    ``node_class`` defaults to a vector volume for multi-component images, otherwise a
    scalar volume; pass "vtkMRMLLabelMapVolumeNode" for labels."""
    import SimpleITK as sitk
    arr = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:
        arr = arr[None]
        spacing = tuple(image.GetSpacing()) + (1.0,)
        origin = tuple(image.GetOrigin()) + (0.0,)
        d2 = np.asarray(image.GetDirection()).reshape(2, 2)
        d = np.eye(3)
        d[:2, :2] = d2
        direction = tuple(d.reshape(-1))
    else:
        spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    vector = image.GetNumberOfComponentsPerPixel() > 1
    if node is None:
        node_class = node_class or ("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode")
        node = scene.AddNewNodeByClass(node_class, name)
    update_volume_from_array(node, arr, sitk_geometry_to_ijk_to_ras(spacing, origin, direction))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def update_volume_from_array(node, arr: np.ndarray, matrix: Optional[np.ndarray] = None) -> None:
    """Replace a volume node's voxels with ``arr`` (z, y, x[, c]) (deep copy) and, when
    given, its IJKToRAS matrix."""
    import vtk
    from vtk.util import numpy_support
    arr = np.ascontiguousarray(arr)
    if arr.ndim not in (3, 4):
        raise BridgeError(f"volume arrays are (z, y, x) or (z, y, x, c), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    ncomp = arr.shape[3] if arr.ndim == 4 else 1
    flat = numpy_support.numpy_to_vtk(arr.reshape(-1, ncomp) if ncomp > 1 else arr.reshape(-1), deep=True)
    flat.SetNumberOfComponents(ncomp)
    image.GetPointData().SetScalars(flat)
    if matrix is not None:
        node.SetIJKToRASMatrix(_vtk_matrix(matrix))
    node.SetAndObserveImageData(image)


def _oriented_image(mask: np.ndarray, matrix: np.ndarray):
    """uint8 vtkOrientedImageData of a (z, y, x) mask with an IJK→world matrix."""
    import slicer
    import vtk
    from vtk.util import numpy_support
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(mask.shape)[:] = mask
    image.SetImageToWorldMatrix(_vtk_matrix(matrix))
    return image


def _oriented_array(image) -> np.ndarray:
    from vtk.util import numpy_support
    ext = image.GetExtent()
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _volume_to_segmentation_matrix(volume_node, segmentation_node) -> np.ndarray:
    """IJK of the volume → the segmentation node's own coordinates (they differ only
    when the two nodes sit under different linear transforms)."""
    import slicer
    import vtk
    m = ijk_to_ras(volume_node)
    vt, st = volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode()
    if vt is st:
        return m
    between = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(vt, st, between):
        raise BridgeError(f"volume {volume_node.GetName()!r} and segmentation {segmentation_node.GetName()!r} "
                          "are related by a non-linear transform; harden it or put both under the same transform")
    b = np.array([[between.GetElement(r, c) for c in range(4)] for r in range(4)])
    return b @ m
