"""Multi-resolution deformable instance optimisation on intensities (local NCC + diffusion).

At each level the moving image is first resampled through the incoming transform onto the fixed
working grid; a residual displacement ``u`` (LPS mm, on that grid) is then optimised with Adam so
that ``moving(phi(x + u(x)))`` matches the fixed image. ``u`` is the box-smoothed version of a free
parameter field, which damps high frequencies the way B-spline control grids do. The result is
upsampled to the next level (values in mm need no rescaling) and finally composed with the incoming
transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..image import Image
from ..losses import diffusion, local_ncc
from ..pipeline.problem import RegistrationProblem, WorkingLevel
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points
from ..spatial.transform import SpatialTransform


class IntensityDeformable(Stage):
    """Dense deformable refinement of the incoming transform, coarse to fine.

    Args:
        learning_rate_voxels: Adam step size as a fraction of the level's voxel size.
        smoothing_passes: number of 3x3x3 box filters applied to the parameter field.
    """

    name = "intensity-deformable"

    def __init__(self, learning_rate_voxels: float = 0.1, smoothing_passes: int = 2) -> None:
        self.learning_rate_voxels = learning_rate_voxels
        self.smoothing_passes = smoothing_passes

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        options = problem.options
        levels = [(options.spacing * factor, iterations)
                  for factor, iterations in zip(options.deformable_level_factors, options.deformable_iterations)]
        total = sum(iterations for _, iterations in levels)
        done = 0
        parameters: torch.Tensor | None = None
        grid: Grid | None = None
        final_losses = []
        for spacing, iterations in levels:
            level = problem.level(spacing)
            new_grid = level.fixed.grid
            parameters = _initial_parameters(parameters, grid, new_grid, problem.device)
            grid = new_grid
            warped, valid = _prewarp(level, transform)
            weight = (level.fixed_weight * valid)[None, None]
            points = grid.world_points(device=problem.device)
            fixed = level.fixed.data[None, None]
            window = options.lncc_window(spacing)
            parameters.requires_grad_(True)
            optimiser = torch.optim.Adam([parameters], lr=self.learning_rate_voxels * spacing)
            for iteration in range(iterations):
                optimiser.zero_grad()
                displacement = self._smooth(parameters)
                moved = points + torch.movedim(displacement[0], 0, -1)
                values = sample_at_points(warped.data, grid, moved, padding="border")
                similarity = local_ncc(fixed, values[None, None], window, weight)
                smoothness = diffusion(displacement, grid.spacing)
                loss = similarity + options.smoothness_weight * smoothness
                loss.backward()
                optimiser.step()
                done += 1
                progress.update(done / total, f"{spacing:g} mm level, iteration {iteration + 1}, "
                                              f"similarity {float(similarity):.4f}, smoothness {float(smoothness):.4f}")
            parameters = parameters.detach()
            final_losses.append(round(float(similarity), 4))
        progress.record("similarity_loss_per_level", final_losses)
        with torch.no_grad():
            residual = self._smooth(parameters)[0]
        return transform.then_residual(residual, grid)

    def _smooth(self, parameters: torch.Tensor) -> torch.Tensor:
        field = parameters
        for _ in range(self.smoothing_passes):
            field = F.avg_pool3d(F.pad(field, (1,) * 6, mode="replicate"), 3, stride=1)
        return field


def _initial_parameters(previous: torch.Tensor | None, previous_grid: Grid | None, grid: Grid,
                        device: torch.device) -> torch.Tensor:
    """Zero field on the first level; afterwards the previous level's parameters upsampled (mm)."""
    if previous is None:
        return torch.zeros((1, 3, *grid.shape), device=device)
    points = grid.world_points(device=device)
    upsampled = sample_at_points(previous[0], previous_grid, points, padding="border")
    return upsampled[None].contiguous()


def _prewarp(level: WorkingLevel, transform: SpatialTransform) -> tuple[Image, torch.Tensor]:
    """The moving channel and its validity resampled through ``transform`` onto the fixed working grid."""
    with torch.no_grad():
        points = transform.map_points(level.fixed.grid.world_points(device=level.fixed.data.device))
        values, valid = level.sample_moving(points)
    return Image(values, level.fixed.grid), valid
