"""Intensity preparation and the body mask, on any :class:`Image` (usually a working-grid image).

CT intensities are Hounsfield units (HU). The registration channel maps the soft-tissue/lung window
``CT_WINDOW_HU`` linearly to [-1, 1] (clipped), as the SAME authors do. Images that do not look
like CT in HU (no air near -1000, e.g. MR or an 8-bit export) are scaled by their 0.5 and 99.5
percentiles instead, with a warning.
"""

from __future__ import annotations

import warnings

import numpy as np
import SimpleITK as sitk
import torch

from .image import Image
from .spatial.warp import resample_image

CT_WINDOW_HU = (-800.0, 400.0)
"""HU range mapped to [-1, 1] for the registration channel."""

BODY_THRESHOLD_HU = -500.0
"""Voxels above this HU are tissue candidates for the body mask (air and lung are below)."""

CT_AIR_HU = -1024.0
"""Fill value for CT voxels outside the scanned field of view."""

_ANTIALIAS_SIGMA_FRACTION = 0.4
_TABLE_OPENING_MM = 6.0
_SMOOTHING_CLOSING_MM = 6.0


def looks_like_ct(image: Image) -> bool:
    """True when the image has air at about -1000 HU and values above water, as CT in HU does."""
    values = _subsample(image.data)
    low, high = torch.quantile(values, torch.tensor([0.01, 0.99], dtype=values.dtype)).tolist()
    return low <= -700.0 and high >= 0.0


def ct_window(hu: torch.Tensor) -> torch.Tensor:
    """The registration channel of CT values (any shape): ``CT_WINDOW_HU`` mapped to [-1, 1], clipped."""
    low, high = CT_WINDOW_HU
    return ((hu.float() - low) / (high - low) * 2.0 - 1.0).clamp(-1.0, 1.0)


def normalise_intensity(image: Image, is_ct: bool) -> Image:
    """The registration channel in [-1, 1]: the CT window, or robust percentiles for non-CT."""
    if is_ct:
        return Image(ct_window(image.data), image.grid)
    else:
        values = _subsample(image.data)
        low, high = torch.quantile(values, torch.tensor([0.005, 0.995], dtype=values.dtype)).tolist()
        high = high if high > low else low + 1.0
    scaled = (image.data.float() - low) / (high - low) * 2.0 - 1.0
    return Image(scaled.clamp(-1.0, 1.0), image.grid)


def to_working_grid(image: Image, spacing: float, is_ct: bool) -> Image:
    """``image`` resampled onto its canonical working grid (``Grid.with_spacing``: isotropic
    ``spacing`` mm, identity LPS direction), Gaussian-smoothed first when downsampling so that
    coarse levels do not alias. Outside the scanned field: air for CT, the minimum otherwise."""
    target = image.grid.with_spacing(spacing)
    fill = CT_AIR_HU if is_ct else float(image.data.min())
    sigmas = [_ANTIALIAS_SIGMA_FRACTION * (spacing**2 - s**2) ** 0.5 if spacing > s else 0.0
              for s in image.grid.spacing]
    if max(sigmas) > 0:
        smoothed = sitk.SmoothingRecursiveGaussian(image.to_sitk(sitk.sitkFloat32), [max(s, 1e-3) for s in sigmas])
        image = Image.from_sitk(smoothed)
    return resample_image(image, target, fill=fill)


def body_mask(image: Image, is_ct: bool) -> Image:
    """A binary mask (uint8) of the patient's body, without the scanner table.

    Steps: threshold (``BODY_THRESHOLD_HU`` for CT, Otsu otherwise); a morphological opening of
    ~6 mm that cuts the thin table and blanket bridges; the largest connected component; a ~6 mm
    closing; holes filled slice by slice along the superior axis (so the lungs, open at the top and
    bottom of a slab, are inside). Radii are in mm and converted with the image's spacing.

    Returns an all-ones mask, with a warning, when nothing body-like is found.
    """
    volume = image.to_sitk()
    if is_ct:
        tissue = volume > BODY_THRESHOLD_HU
    else:
        tissue = sitk.OtsuThreshold(volume, 0, 1)
    tissue = sitk.Cast(tissue, sitk.sitkUInt8)
    opened = sitk.BinaryMorphologicalOpening(tissue, _radius_voxels(image, _TABLE_OPENING_MM))
    components = sitk.RelabelComponent(sitk.ConnectedComponent(opened), sortByObjectSize=True)
    largest = sitk.Cast(components == 1, sitk.sitkUInt8)
    if sitk.GetArrayViewFromImage(largest).sum() == 0:
        warnings.warn("body mask: no body found, using the whole image", stacklevel=2)
        return Image(torch.ones(image.grid.shape, dtype=torch.uint8), image.grid)
    closed = sitk.BinaryMorphologicalClosing(largest, _radius_voxels(image, _SMOOTHING_CLOSING_MM))
    array = sitk.GetArrayFromImage(closed)
    axial_axis = _superior_array_axis(image)
    filled = np.stack([_fill_holes_2d(plane) for plane in np.moveaxis(array, axial_axis, 0)], axis=0)
    filled = np.moveaxis(filled, 0, axial_axis)
    return Image(torch.from_numpy(np.ascontiguousarray(filled)).to(torch.uint8), image.grid)


def _fill_holes_2d(plane: np.ndarray) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(plane)))


def _superior_array_axis(image: Image) -> int:
    """The array axis (0=D, 1=H, 2=W) whose index axis points most along LPS z (superior)."""
    index_axis = int(np.argmax(np.abs(image.grid.direction_matrix[2])))
    return 2 - index_axis


def _radius_voxels(image: Image, radius_mm: float) -> list[int]:
    return [max(1, int(round(radius_mm / s))) for s in image.grid.spacing]


def _subsample(data: torch.Tensor, count: int = 200_000) -> torch.Tensor:
    flat = data.reshape(-1).float()
    step = max(1, flat.numel() // count)
    return flat[::step]
