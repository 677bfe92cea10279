"""Known deformations of a real image, for tests and benchmarks with exact ground truth.

A synthetic pair is built from a fixed image and a known mapping ``psi`` from moving space to fixed
space, ``psi(y) = B (y + v(y))`` (a :class:`SpatialTransform` on the moving grid). The moving image is
``fixed(psi(y))``, so a perfect registration result ``phi`` (fixed -> moving) satisfies
``psi(phi(x)) = x``, and ``|psi(phi(x)) - x|`` is its error in mm at fixed point ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image
from .spatial.grid import Grid
from .spatial.transform import SpatialTransform
from .spatial.warp import resample_image


@dataclass(frozen=True)
class SyntheticPair:
    """A moving image made from ``fixed`` and the moving->fixed mapping ``psi`` that made it."""

    fixed: Image
    moving: Image
    psi: SpatialTransform

    def error_mm(self, phi: SpatialTransform, points: torch.Tensor) -> torch.Tensor:
        """``|psi(phi(x)) - x|`` in mm for fixed LPS points ``(N, 3)``."""
        with torch.no_grad():
            return (self.psi.map_points(phi.map_points(points)) - points).norm(dim=-1)


def rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation about LPS x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_synthetic_pair(fixed: Image, rotation_deg=(0.0, 0.0, 5.0), scale=(1.05, 0.95, 1.0),
                        translation_mm=(150.0, -40.0, 20.0), field_amplitude_mm: float = 6.0,
                        control_points: int = 4, seed: int = 0, fill: float = -1024.0) -> SyntheticPair:
    """Applies a known affine and a smooth random deformation to ``fixed``.

    The moving grid is the fixed grid carried by the inverse of the affine's rigid part (so it is
    oblique and displaced in physical space, like a scan from another session), and ``v`` is a random field with
    ``control_points``^3 values, smoothly upsampled and scaled so its largest vector is
    ``field_amplitude_mm``.

    Args:
        rotation_deg, scale, translation_mm: the affine part ``B`` (rotation and scale about the
            fixed image centre, then translation), mapping moving space to fixed space.
    """
    centre = fixed.grid.centre_world()
    linear = rotation_matrix(rotation_deg) @ np.diag(scale)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre + np.asarray(translation_mm) - linear @ centre
    rigid = np.eye(4)
    rigid[:3, :3] = rotation_matrix(rotation_deg)
    rigid[:3, 3] = centre + np.asarray(translation_mm) - rigid[:3, :3] @ centre
    index_to_moving = np.linalg.inv(rigid) @ fixed.grid.index_to_world()
    moving_grid = Grid.from_index_to_world_lps(fixed.grid.shape, index_to_moving)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, control_points, control_points, control_points), generator=generator)
    field = F.interpolate(coarse, size=moving_grid.shape, mode="trilinear", align_corners=True)[0]
    field = field * (field_amplitude_mm / field.norm(dim=0).max())
    psi = SpatialTransform(affine, field.float(), moving_grid)
    moving = resample_image(fixed, moving_grid, psi, fill=fill)
    return SyntheticPair(fixed, moving, psi)


def with_contrast_change(image: Image, gain: float = 1.1, offset_hu: float = 30.0, noise_hu: float = 20.0,
                         seed: int = 0) -> Image:
    """``gain * I + offset_hu`` plus Gaussian noise of ``noise_hu`` (a contrast-phase-like change)."""
    noise = torch.randn(image.data.shape, generator=torch.Generator().manual_seed(seed))
    return Image(image.data * gain + offset_hu + noise_hu * noise, image.grid)
