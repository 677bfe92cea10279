"""SimpleITK images and transforms as :class:`Grid` geometry and numpy arrays, without torch.

The library's images keep the file's geometry exactly (LPS mm, see
:mod:`SAMERegistrationLib.spatial.grid`); these helpers turn SimpleITK objects into grids, numpy
arrays and 4x4 matrices. They import no torch, so Slicer's own process (the MRML bridge,
:mod:`SAMERegistrationLib.mrml`) writes the worker's inputs and reads its outputs with them.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .spatial.grid import Grid


def grid_of_sitk(image: sitk.Image) -> Grid:
    """The :class:`Grid` of a 3-D SimpleITK image (ITK size reversed into array order)."""
    return Grid.create(image.GetSize()[::-1], image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def with_grid_geometry(image: sitk.Image, grid: Grid) -> sitk.Image:
    """Sets ``grid``'s spacing, origin and direction on a SimpleITK image (in place) and returns it."""
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(tuple(grid.direction_matrix.ravel()))
    return image


def affine_from_sitk(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 LPS matrix of any linear 3-D SimpleITK transform (fixed -> moving).

    Works for Affine, Euler3D, Similarity3D, Versor(Rigid)3D, Translation, Scale(Versor/Skew) and a
    CompositeTransform of linear transforms (whose last added transform acts first), by mapping the
    origin and the unit points through ``transform``; centres of rotation are thereby included.

    Raises:
        ValueError: the transform is not 3-D or not linear.
    """
    if transform.GetDimension() != 3 or not transform.IsLinear():
        raise ValueError(f"affine_from_sitk(): needs a linear 3-D transform, got a "
                         f"{transform.GetDimension()}-D {transform.GetName()}")
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for axis in range(3):
        matrix[:3, axis] = np.array(transform.TransformPoint(tuple(np.eye(3)[axis]))) - origin
    matrix[:3, 3] = origin
    return matrix


def sample_displacement(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    """``transform(x) - x`` at the voxel centres ``x`` of ``grid``, as ITK evaluates it (a
    displacement field is zero beyond half a voxel outside its own grid).

    Returns:
        ``(3, D, H, W)`` float64 LPS mm.
    """
    reference = with_grid_geometry(sitk.Image(grid.size_ijk, sitk.sitkUInt8), grid)
    sampler = sitk.TransformToDisplacementFieldFilter()
    sampler.SetReferenceImage(reference)
    sampler.SetOutputPixelType(sitk.sitkVectorFloat64)
    return np.moveaxis(sitk.GetArrayFromImage(sampler.Execute(transform)), -1, 0)
