"""Integrating velocity fields into displacements."""

from __future__ import annotations

import torch

from .grid import Grid
from .sampling import sample_at_points


def scaling_and_squaring(velocity: torch.Tensor, grid: Grid, steps: int = 7) -> torch.Tensor:
    """exp(v): the displacement of the flow of a stationary velocity field after unit time.

    ``u_0 = v / 2**steps``, then ``steps`` times ``u <- u + u o (Id + u)``. With small enough
    ``u_0`` the result is a diffeomorphism (no folding) up to interpolation error.

    Args:
        velocity: ``(3, D, H, W)`` LPS mm on ``grid`` (differentiable).
        grid: the grid of ``velocity``.
        steps: number of squarings (7 as in VoxelMorph).

    Returns:
        ``(3, D, H, W)`` displacement in LPS mm on ``grid``.
    """
    if steps < 0:
        raise ValueError(f"scaling_and_squaring(): 'steps' must be >= 0, got {steps}")
    points = grid.world_points(dtype=velocity.dtype, device=velocity.device)
    displacement = velocity / 2**steps
    for _ in range(steps):
        moved = points + torch.movedim(displacement, 0, -1)
        displacement = displacement + sample_at_points(displacement, grid, moved, padding="border")
    return displacement
