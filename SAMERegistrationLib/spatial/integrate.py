"""Integrating velocity fields into displacements: stationary (scaling and squaring) and
time-dependent (Euler flow of ``v_0 .. v_{T-1}`` and its inverse)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grid import Grid
from .sampling import DisplacedVoxelSampler, sample_at_points


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
    compose = DisplacedVoxelSampler(grid, velocity.dtype, velocity.device)
    displacement = velocity / 2**steps
    for _ in range(steps):
        displacement = displacement + compose(displacement, displacement)
    return displacement


def flow_step(displacement: torch.Tensor, velocity: torch.Tensor, grid: Grid) -> torch.Tensor:
    """One Euler step of a time-dependent flow: ``phi_{t+1} = phi_t + v_t o phi_t``.

    In displacement form ``u_{t+1}(x) = u_t(x) + v_t(x + u_t(x))``: the velocity is read where the
    flow has carried ``x`` so far (a composition, not ``v_t(x + v_t(x))``).

    Args:
        displacement: ``(N, 3, D, H, W)`` ``u_t``, LPS mm on ``grid``.
        velocity: ``(N, 3, D, H, W)`` ``v_t``, LPS mm on ``grid`` (edge values beyond the grid).
        grid: the grid of both.

    Returns:
        ``(N, 3, D, H, W)`` ``u_{t+1}`` in LPS mm (differentiable in both inputs).
    """
    at_flow = DisplacedVoxelSampler(grid, displacement.dtype, displacement.device)
    return torch.stack([displacement[n] + at_flow(velocity[n], displacement[n]) for n in range(displacement.shape[0])])


def integrate_velocities(velocities: Sequence[torch.Tensor], grid: Grid) -> torch.Tensor:
    """``phi_T - Id`` of the flow of time-dependent velocities ``v_0 .. v_{T-1}`` from the identity
    (:func:`flow_step` applied in time order).

    Args:
        velocities: ``T`` tensors ``(N, 3, D, H, W)``, LPS mm on ``grid``.
        grid: their grid.

    Returns:
        ``(N, 3, D, H, W)`` displacement ``u_T`` in LPS mm: ``phi_T(x) = x + u_T(x)``.
    """
    displacement = torch.zeros_like(velocities[0])
    for velocity in velocities:
        displacement = flow_step(displacement, velocity, grid)
    return displacement


def invert_velocities(velocities: Sequence[torch.Tensor], grid: Grid, iterations: int = 3,
                      at: Grid | None = None) -> torch.Tensor:
    """``phi_T^{-1} - Id`` for the flow of :func:`integrate_velocities`: the negated velocities
    integrated in reverse time order.

    ``phi_T = S_{T-1} o ... o S_0`` with Euler steps ``S_t(x) = x + v_t(x)``, so
    ``phi_T^{-1} = S_0^{-1} o ... o S_{T-1}^{-1}``. Each inverse step starts with the negated
    velocity, ``z = p - v_t(p)`` (what the plain backward integration does; it inverts ``S_t`` only
    up to ``|grad v_t| |v_t|``), then solves ``z + v_t(z) = p`` by the fixed-point iteration
    ``z <- p - v_t(z)`` (a contraction while ``|grad v_t| < 1``, i.e. while ``S_t`` is invertible).

    Args:
        velocities: ``T`` tensors ``(N, 3, D, H, W)``, LPS mm on ``grid``.
        grid: their grid.
        iterations: fixed-point corrections per step (0: plain negated-velocity Euler steps).
        at: the grid of the result (default ``grid``); e.g. a larger one, since ``phi_T`` may carry
            points of ``grid`` beyond it (velocities take their edge values there).

    Returns:
        ``(N, 3, ...)`` displacement ``w`` in LPS mm on ``at``: ``phi_T^{-1}(y) = y + w(y)``.
    """
    if iterations < 0:
        raise ValueError(f"invert_velocities(): 'iterations' must be >= 0, got {iterations}")
    start = (at or grid).world_points(dtype=velocities[0].dtype, device=velocities[0].device)
    inverse = []
    for n in range(velocities[0].shape[0]):
        points = start
        for velocity in reversed(velocities):
            field = velocity[n]
            moved = points - torch.movedim(sample_at_points(field, grid, points, padding="border"), 0, -1)
            for _ in range(iterations):
                moved = points - torch.movedim(sample_at_points(field, grid, moved, padding="border"), 0, -1)
            points = moved
        inverse.append(torch.movedim(points - start, -1, 0))
    return torch.stack(inverse)
