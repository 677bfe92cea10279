"""The library's in-memory image: a voxel array plus the :class:`Grid` it lives on.

Conventions (see :mod:`SAMERegistrationLib.spatial.grid`): ``data`` is indexed ``[k, j, i]``
(array order D, H, W) and the grid's origin/spacing/direction are LPS millimetres in ITK order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .sitk_geometry import grid_of_sitk, with_grid_geometry
from .spatial.grid import Grid


@dataclass(frozen=True)
class Image:
    """A scalar 3-D image.

    Attributes:
        data: tensor ``(D, H, W)``; float32 for intensities, int64 for label maps.
        grid: where each voxel is in LPS millimetres.
    """

    data: torch.Tensor
    grid: Grid

    def __post_init__(self) -> None:
        if tuple(self.data.shape) != self.grid.shape:
            raise ValueError(f"Image: data shape {tuple(self.data.shape)} does not match grid shape {self.grid.shape}")

    @staticmethod
    def from_sitk(image: sitk.Image, dtype: torch.dtype = torch.float32) -> Image:
        """Converts a 3-D scalar SimpleITK image (values copied, geometry kept exactly)."""
        array = sitk.GetArrayFromImage(image)
        return Image(torch.from_numpy(np.ascontiguousarray(array)).to(dtype), grid_of_sitk(image))

    def to_sitk(self, pixel_type: int | None = None) -> sitk.Image:
        """Converts to SimpleITK with the same geometry; ``pixel_type`` e.g. ``sitk.sitkUInt8``."""
        image = with_grid_geometry(sitk.GetImageFromArray(self.data.detach().cpu().numpy()), self.grid)
        return image if pixel_type is None else sitk.Cast(image, pixel_type)

    def to(self, device: torch.device | str) -> Image:
        return Image(self.data.to(device), self.grid)

    def numpy(self) -> np.ndarray:
        """The voxel array in ``[k, j, i]`` order, on the CPU."""
        return self.data.detach().cpu().numpy()
