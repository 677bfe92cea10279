"""Two augmented views of one CT with known voxel correspondence, for self-supervised training.

A view is a cube of ``patch`` voxels resampled from a canonical working volume on a *view grid*:
a seed point inside the body plus a random offset, a random isotropic scale (voxel size
``spacing * s``), a small random rotation about the superior axis, then intensity changes
(contrast, offset, noise, blur). Because both views are grids in the same physical (LPS) space,
the correspondence of any point is just its world position.

A *cross-patient* view pair takes its second view from another patient's CT registered onto the
first volume's grid (:class:`AlignedPartner`): the same world point then shows the same anatomy of
a different person, up to the registration's error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..image import Image
from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points


@dataclass(frozen=True)
class ViewAugmentation:
    """Random ranges of the view sampler (lengths in mm, angles in degrees, intensities in HU).

    ``overlap_probability`` of the pairs are cut around one seed (overlapping views); the rest
    come from two independent seeds of the same volume (global negatives within a volume).
    """

    patch: int = 48
    scale: tuple[float, float] = (0.8, 1.2)
    max_offset_fraction: float = 0.3
    max_rotation_deg: float = 10.0
    overlap_probability: float = 0.8
    contrast: tuple[float, float] = (0.85, 1.15)
    offset_hu: float = 60.0
    max_noise_hu: float = 30.0
    blur_probability: float = 0.3


@dataclass(frozen=True)
class TrainingVolume:
    """A CT on its canonical working grid (HU) with the voxel centres of its body mask ``(M, 3)``."""

    image: Image
    body_points: torch.Tensor


@dataclass(frozen=True)
class AlignedPartner:
    """A training volume with another patient's CT resampled onto its working grid ``(D, H, W)``
    in HU (by the project's own intensity registration, so approximately corresponding anatomy;
    voxels outside the other scan's field of view hold air, -1024 HU)."""

    volume: TrainingVolume
    partner: Image


def view_grid(centre: np.ndarray, spacing: float, patch: int, angle_deg: float) -> Grid:
    """A cubic ``patch``^3 grid of voxel size ``spacing`` mm centred on ``centre``, rotated about S."""
    angle = math.radians(angle_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    half = (patch - 1) / 2.0 * spacing
    origin = centre - rotation @ np.full(3, half)
    return Grid.create((patch,) * 3, (spacing,) * 3, origin, rotation)


def sample_view(image: Image, grid: Grid, augmentation: ViewAugmentation, generator: torch.Generator,
                fill: float = -1024.0) -> torch.Tensor:
    """The image's HU on ``grid`` with random intensity changes: ``(D, H, W)``."""
    points = grid.world_points()
    hu = sample_at_points(image.data - fill, image.grid, points) + fill
    low, high = augmentation.contrast
    contrast = low + (high - low) * float(torch.rand((), generator=generator))
    offset = augmentation.offset_hu * (2 * float(torch.rand((), generator=generator)) - 1)
    hu = (hu - 40.0) * contrast + 40.0 + offset
    if float(torch.rand((), generator=generator)) < augmentation.blur_probability:
        hu = F.avg_pool3d(hu[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    noise = augmentation.max_noise_hu * float(torch.rand((), generator=generator))
    return hu + noise * torch.randn(hu.shape, generator=generator)


def sample_view_pair(volume: TrainingVolume, spacing: float, augmentation: ViewAugmentation,
                     generator: torch.Generator, partner: Image | None = None
                     ) -> tuple[torch.Tensor, Grid, torch.Tensor, Grid]:
    """Two views of ``volume``: ``(hu_1, grid_1, hu_2, grid_2)``.

    With ``partner`` (another patient's CT on ``volume``'s grid, see :class:`AlignedPartner`) the
    second view is cut from the partner, always around the first view's seed; which of the two
    images gives view 1 is random, so both directions are trained.
    """
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    def body_point() -> np.ndarray:
        index = int(torch.randint(len(volume.body_points), (1,), generator=generator))
        return volume.body_points[index].double().numpy()

    patch = augmentation.patch
    seed = body_point()
    grids = []
    for view in range(2):
        scale = uniform(*augmentation.scale)
        if view == 1 and partner is None and uniform(0.0, 1.0) > augmentation.overlap_probability:
            centre = body_point()
        else:
            reach = augmentation.max_offset_fraction * patch * spacing * scale
            centre = seed + np.array([uniform(-reach, reach) for _ in range(3)])
        angle = uniform(-augmentation.max_rotation_deg, augmentation.max_rotation_deg)
        grids.append(view_grid(centre, spacing * scale, patch, angle))
    images = [volume.image, volume.image if partner is None else partner]
    if partner is not None and uniform(0.0, 1.0) < 0.5:
        images.reverse()
    return (sample_view(images[0], grids[0], augmentation, generator), grids[0],
            sample_view(images[1], grids[1], augmentation, generator), grids[1])
