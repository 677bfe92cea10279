"""Multi-resolution deformable instance optimisation on intensities (local NCC + diffusion).

At each level the moving image is first resampled through the incoming transform onto the fixed
working grid. A stationary velocity field ``v`` (LPS mm) on a control grid twice as coarse as the
level is optimised with Adam; it is box-smoothed, integrated by scaling and squaring into a
diffeomorphic residual ``u`` and upsampled to the level grid, so that ``moving(phi(x + u(x)))``
matches the fixed image. The loss is masked local NCC plus a diffusion penalty on ``v``. The
parameters are carried to the next, finer level (values in mm need no rescaling), and the final
residual is composed with the incoming transform.
"""

from __future__ import annotations

import torch

from ..filters import window_mean
from ..image import Image
from ..losses import diffusion, local_ncc
from ..pipeline.problem import RegistrationProblem, WorkingLevel
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..spatial.grid import Grid
from ..spatial.integrate import scaling_and_squaring
from ..spatial.sampling import sample_at_points
from ..spatial.transform import SpatialTransform


class IntensityDeformable(Stage):
    """Dense deformable refinement of the incoming transform, coarse to fine.

    Args:
        learning_rate_voxels: Adam step size as a fraction of the level's voxel size.
        smoothing_passes: number of 3x3x3 box filters applied to the parameter field.
        integration_steps: when > 0 the smoothed parameters are a stationary velocity field
            integrated by scaling and squaring with this many steps (diffeomorphic); 0 uses them as
            the displacement directly.
        control_spacing_factor: the parameters live on a grid this many times coarser than each
            level's image grid (fewer unknowns, cheaper integration, smoother fields).
    """

    name = "intensity-deformable"

    def __init__(self, learning_rate_voxels: float = 0.1, smoothing_passes: int = 2, integration_steps: int = 7,
                 control_spacing_factor: int = 2) -> None:
        self.learning_rate_voxels = learning_rate_voxels
        self.control_spacing_factor = control_spacing_factor
        self.smoothing_passes = smoothing_passes
        self.integration_steps = integration_steps

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        options = problem.options
        levels = [(options.spacing * factor, iterations)
                  for factor, iterations in zip(options.deformable_level_factors, options.deformable_iterations)]
        total = sum(iterations for _, iterations in levels)
        done = 0
        parameters: torch.Tensor | None = None
        control: Grid | None = None
        final_losses = []
        for spacing, iterations in levels:
            level = problem.level(spacing)
            grid = level.fixed.grid
            new_control = problem.fixed.grid.with_spacing(spacing * self.control_spacing_factor)
            parameters = _initial_parameters(parameters, control, new_control, problem.device)
            control = new_control
            warped, valid = _prewarp(level, transform)
            weight = (level.fixed_weight * valid)[None, None]
            points = grid.world_points(device=problem.device)
            fixed = level.fixed.data[None, None]
            window = options.lncc_window(spacing)
            parameters.requires_grad_(True)
            optimiser = torch.optim.Adam([parameters], lr=self.learning_rate_voxels * spacing)
            for iteration in range(iterations):
                optimiser.zero_grad()
                velocity = self._smooth(parameters)
                displacement = self._displacement(velocity, control, points)
                values = sample_at_points(warped.data, grid, points + torch.movedim(displacement, 0, -1), padding="border")
                similarity = local_ncc(fixed, values[None, None], window, weight)
                smoothness = diffusion(velocity, control.spacing)
                loss = similarity + options.smoothness_weight * smoothness
                loss.backward()
                optimiser.step()
                done += 1
                progress.update(done / total, f"{spacing:g} mm level, iteration {iteration + 1}, "
                                              f"similarity {similarity.item():.4f}, smoothness {smoothness.item():.4f}")
            parameters = parameters.detach()
            final_losses.append(round(similarity.item(), 4))
        progress.record("similarity_loss_per_level", final_losses)
        with torch.no_grad():
            residual = self._displacement(self._smooth(parameters), control, points)
        return transform.then_residual(residual, grid)

    def _displacement(self, velocity: torch.Tensor, control: Grid, points: torch.Tensor) -> torch.Tensor:
        """The displacement ``(3, D, H, W)`` at ``points`` (the level grid) from control-grid parameters."""
        field = velocity[0]
        if self.integration_steps > 0:
            field = scaling_and_squaring(field, control, self.integration_steps)
        return sample_at_points(field, control, points, padding="border")

    def _smooth(self, parameters: torch.Tensor) -> torch.Tensor:
        field = parameters
        for _ in range(self.smoothing_passes):
            field = window_mean(field, 3, border="replicate")
        return field


def _initial_parameters(previous: torch.Tensor | None, previous_grid: Grid | None, grid: Grid,
                        device: torch.device) -> torch.Tensor:
    """``(1, 3, D, H, W)`` parameters on ``grid``: zero on the first level, afterwards the previous
    level's parameters upsampled (values in mm need no rescaling)."""
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
