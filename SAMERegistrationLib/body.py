"""The patient's body in a volume, from a numpy array with SimpleITK (no torch).

Used on the working grids by the registration (through :mod:`SAMERegistrationLib.preprocess`) and
on the fixed volume by Slicer's own process, which shows the Jacobian map inside the body only
(:mod:`SAMERegistrationLib.mrml`): both use this one definition.
"""

from __future__ import annotations

import warnings

import numpy as np
import SimpleITK as sitk

from .sitk_geometry import with_grid_geometry
from .spatial.grid import Grid

BODY_THRESHOLD_HU = -500.0
"""Voxels above this HU are tissue candidates for the body mask (air and lung are below)."""

_TABLE_OPENING_MM = 6.0
_SMOOTHING_CLOSING_MM = 6.0
_SUBSAMPLE_VOXELS = 200_000


def looks_like_ct_array(array: np.ndarray) -> bool:
    """True when the voxel values have air at about -1000 HU and values above water, as CT in HU
    does (1st percentile <= -700, 99th >= 0, over an evenly strided subsample of about 200,000 voxels)."""
    flat = np.asarray(array).reshape(-1)
    values = flat[::max(1, flat.size // _SUBSAMPLE_VOXELS)].astype(np.float32)
    low, high = np.quantile(values, [0.01, 0.99])
    return bool(low <= -700.0 and high >= 0.0)


def body_mask_array(array: np.ndarray, grid: Grid, is_ct: bool) -> np.ndarray:
    """A binary mask of the patient's body, without the scanner table.

    Steps: threshold (``BODY_THRESHOLD_HU`` for CT, Otsu otherwise); a morphological opening of
    ~6 mm that cuts the thin table and blanket bridges; the largest connected component; a ~6 mm
    closing; holes filled slice by slice along the superior axis (so the lungs, open at the top and
    bottom of a slab, are inside). Radii are in mm and converted with the grid's spacing.

    Args:
        array: ``[k, j, i]`` voxel values on ``grid`` (HU for CT).
        grid: the array's grid (its spacing and direction matter).
        is_ct: threshold at ``BODY_THRESHOLD_HU`` (else Otsu).

    Returns:
        a uint8 ``[k, j, i]`` array of 0/1; all ones, with a warning, when nothing body-like is found.
    """
    volume = with_grid_geometry(sitk.GetImageFromArray(np.asarray(array)), grid)
    if is_ct:
        tissue = volume > BODY_THRESHOLD_HU
    else:
        tissue = sitk.OtsuThreshold(volume, 0, 1)
    tissue = sitk.Cast(tissue, sitk.sitkUInt8)
    opened = sitk.BinaryMorphologicalOpening(tissue, _radius_voxels(grid, _TABLE_OPENING_MM))
    components = sitk.RelabelComponent(sitk.ConnectedComponent(opened), sortByObjectSize=True)
    largest = sitk.Cast(components == 1, sitk.sitkUInt8)
    if sitk.GetArrayViewFromImage(largest).sum() == 0:
        warnings.warn("body mask: no body found, using the whole image", stacklevel=2)
        return np.ones(grid.shape, dtype=np.uint8)
    closed = sitk.BinaryMorphologicalClosing(largest, _radius_voxels(grid, _SMOOTHING_CLOSING_MM))
    mask = sitk.GetArrayFromImage(closed)
    axial_axis = _superior_array_axis(grid)
    filled = np.stack([_fill_holes_2d(plane) for plane in np.moveaxis(mask, axial_axis, 0)], axis=0)
    return np.ascontiguousarray(np.moveaxis(filled, 0, axial_axis)).astype(np.uint8, copy=False)


def _fill_holes_2d(plane: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(plane)))


def _superior_array_axis(grid: Grid) -> int:
    """The array axis (0=D, 1=H, 2=W) whose index axis points most along LPS z (superior)."""
    index_axis = int(np.argmax(np.abs(grid.direction_matrix[2])))
    return 2 - index_axis


def _radius_voxels(grid: Grid, radius_mm: float) -> list[int]:
    return [max(1, int(round(radius_mm / s))) for s in grid.spacing]
