"""Batched dense fields on one grid: warping tensors, resampling displacements between grids,
integrating velocities.

Learned stages work on batches ``(N, C, D, H, W)`` whose samples share one grid (shape, spacing,
direction; training crops all use one crop grid). Displacements and velocities are
``(N, 3, D, H, W)`` LPS mm vectors, like every field in this library: because they are in mm and
not in voxels, moving a field to a grid of another resolution needs no rescaling of its values.
"""

from __future__ import annotations

import torch

from .grid import Grid
from .integrate import scaling_and_squaring
from .sampling import DisplacedVoxelSampler, Interpolation, Padding, sample_at_points


def warp_batch(volume: torch.Tensor, grid: Grid, displacement: torch.Tensor, interpolation: Interpolation = "linear",
               padding: Padding = "border") -> torch.Tensor:
    """``volume(x + u(x))`` at every voxel ``x`` of ``grid`` (differentiable in both).

    Args:
        volume: ``(N, C, D, H, W)`` on ``grid``.
        grid: the grid of ``volume`` and ``displacement``.
        displacement: ``(N, 3, D, H, W)`` LPS mm.

    Returns:
        ``(N, C, D, H, W)``.
    """
    if padding == "border":
        warp = DisplacedVoxelSampler(grid, displacement.dtype, displacement.device)
        return torch.stack([warp(volume[n], displacement[n], interpolation) for n in range(volume.shape[0])])
    points = grid.world_points(dtype=displacement.dtype, device=displacement.device)
    return torch.stack([
        sample_at_points(volume[n], grid, points + torch.movedim(displacement[n], 0, -1), interpolation, padding)
        for n in range(volume.shape[0])])


def resample_batch(field: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A batch of fields ``(N, C, ...)`` on ``source`` trilinearly resampled onto ``target``
    (border values beyond the edge); mm-valued fields keep their values."""
    points = target.world_points(dtype=field.dtype, device=field.device)
    return torch.stack([sample_at_points(field[n], source, points, padding="border") for n in range(field.shape[0])])


def integrate_batch(velocity: torch.Tensor, grid: Grid, steps: int) -> torch.Tensor:
    """Scaling and squaring of each stationary velocity ``(N, 3, D, H, W)`` (LPS mm) on ``grid``;
    ``steps = 0`` returns the velocity itself as the displacement."""
    if steps == 0:
        return velocity
    return torch.stack([scaling_and_squaring(velocity[n], grid, steps) for n in range(velocity.shape[0])])
