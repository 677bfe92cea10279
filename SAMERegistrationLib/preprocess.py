"""Intensity preparation and the body mask, on any :class:`Image` (usually a working-grid image).

CT intensities are Hounsfield units (HU). The registration channel maps the soft-tissue/lung window
``CT_WINDOW_HU`` linearly to [-1, 1] (clipped), as the SAME authors do. Images that do not look
like CT in HU (no air near -1000, e.g. MR or an 8-bit export) are scaled by their 0.5 and 99.5
percentiles instead, with a warning.
"""

from __future__ import annotations

import SimpleITK as sitk
import torch

from .body import body_mask_array, looks_like_ct_array
from .image import Image
from .spatial.warp import resample_image

CT_WINDOW_HU = (-800.0, 400.0)
"""HU range mapped to [-1, 1] for the registration channel."""

CT_AIR_HU = -1024.0
"""Fill value for CT voxels outside the scanned field of view."""

_ANTIALIAS_SIGMA_FRACTION = 0.4


def looks_like_ct(image: Image) -> bool:
    """True when the image has air at about -1000 HU and values above water, as CT in HU does
    (:func:`~SAMERegistrationLib.body.looks_like_ct_array`)."""
    return looks_like_ct_array(image.numpy())


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
    """The patient's body (uint8 0/1 on ``image``'s grid), without the scanner table: see
    :func:`~SAMERegistrationLib.body.body_mask_array`."""
    return Image(torch.from_numpy(body_mask_array(image.numpy(), image.grid, is_ct)), image.grid)


def _subsample(data: torch.Tensor, count: int = 200_000) -> torch.Tensor:
    flat = data.reshape(-1).float()
    step = max(1, flat.numel() // count)
    return flat[::step]
