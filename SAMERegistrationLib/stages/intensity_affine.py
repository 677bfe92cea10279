"""Multi-resolution affine registration on image intensities (masked local NCC, Adam)."""

from __future__ import annotations

import numpy as np
import torch

from ..losses import local_ncc
from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..spatial.transform import SpatialTransform

_TRANSLATION_UNIT_MM = 100.0
"""Translation parameters are in units of 100 mm, so one Adam step changes rotations (rad),
log-scales, shears and translations (x 100 mm) by comparable amounts."""


class AffineParameters(torch.nn.Module):
    """A 12-parameter affine *update* ``D(x) = c + R S U (x - c) + t`` (fixed LPS mm -> fixed LPS mm).

    ``R = exp([w]x)`` is a rotation (w in radians), ``S = diag(exp(s))`` the scales, ``U`` an upper
    unit-triangular shear and ``t`` a translation in units of 100 mm; all start at zero (identity).
    ``c`` is the fixed image centre, so rotations and scalings pivot about the anatomy.
    """

    def __init__(self, centre: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centre", centre, persistent=False)
        self.rotation = torch.nn.Parameter(torch.zeros(3, device=centre.device))
        self.log_scale = torch.nn.Parameter(torch.zeros(3, device=centre.device))
        self.shear = torch.nn.Parameter(torch.zeros(3, device=centre.device))
        self.translation = torch.nn.Parameter(torch.zeros(3, device=centre.device))

    def linear(self) -> torch.Tensor:
        wx, wy, wz = self.rotation
        zero = torch.zeros((), device=self.rotation.device)
        skew = torch.stack([torch.stack([zero, -wz, wy]), torch.stack([wz, zero, -wx]), torch.stack([-wy, wx, zero])])
        shear = torch.eye(3, device=self.shear.device).index_put(
            (torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])), self.shear)
        return torch.linalg.matrix_exp(skew) @ torch.diag(self.log_scale.exp()) @ shear

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Applies the update to LPS points ``(..., 3)``."""
        return (points - self.centre) @ self.linear().T + self.centre + self.translation * _TRANSLATION_UNIT_MM

    def prior(self) -> torch.Tensor:
        """Penalty on anisotropic or extreme scaling and shear (0 at identity)."""
        return self.log_scale.square().sum() + self.shear.square().sum()

    def matrix(self) -> np.ndarray:
        """The update as a 4x4 float64 matrix."""
        with torch.no_grad():
            linear = self.linear().double().cpu().numpy()
            centre = self.centre.double().cpu().numpy()
            translation = self.translation.double().cpu().numpy() * _TRANSLATION_UNIT_MM
        matrix = np.eye(4)
        matrix[:3, :3] = linear
        matrix[:3, 3] = centre + translation - linear @ centre
        return matrix


class IntensityAffine(Stage):
    """Refines the affine part of the incoming transform, coarse to fine.

    The result is ``phi(x) = A0 D (x + w(x))`` where ``A0`` and ``w`` are the incoming affine and
    field and ``D`` the optimised :class:`AffineParameters` update. Loss: local NCC over the fixed
    mask times the overlap, plus ``prior_weight`` times the scale/shear prior, which keeps thin
    slabs (whose superior-inferior scale the images barely constrain) from collapsing.

    Args:
        learning_rate: Adam step size at the coarsest level (halved at each finer level).
        prior_weight: weight of the scale/shear prior.
        patience: a level stops early when the loss has not improved by ``tolerance`` for this
            many iterations.
    """

    name = "intensity-affine"

    def __init__(self, learning_rate: float = 0.01, prior_weight: float = 0.1, patience: int = 25,
                 tolerance: float = 1e-4) -> None:
        self.learning_rate = learning_rate
        self.prior_weight = prior_weight
        self.patience = patience
        self.tolerance = tolerance

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        options = problem.options
        device = problem.device
        update = AffineParameters(torch.as_tensor(problem.fixed.grid.centre_world(), dtype=torch.float32, device=device))
        incoming = torch.as_tensor(transform.affine, dtype=torch.float32, device=device)
        levels = list(zip(options.affine_levels, options.affine_iterations))
        total = sum(iterations for _, iterations in levels)
        losses = []
        for level_index, (spacing, iterations) in enumerate(levels):
            level = problem.level(spacing)
            with torch.no_grad():
                points = transform.with_affine(np.eye(4)).map_points(level.fixed.grid.world_points(device=device))
            fixed = level.fixed.data[None, None]
            window = options.lncc_window(spacing)
            optimiser = torch.optim.Adam(update.parameters(), lr=self.learning_rate / 2**level_index)
            best, since_best = float("inf"), 0
            done_before = sum(n for _, n in levels[:level_index])
            for iteration in range(iterations):
                optimiser.zero_grad()
                moved = update(points) @ incoming[:3, :3].T + incoming[:3, 3]
                values, valid = level.sample_moving(moved)
                similarity = local_ncc(fixed, values[None, None], window, (level.fixed_weight * valid)[None, None])
                loss = similarity + self.prior_weight * update.prior()
                loss.backward()
                optimiser.step()
                value = loss.item()
                progress.update((done_before + iteration + 1) / total,
                                f"{spacing:g} mm level, iteration {iteration + 1}, loss {value:.4f}")
                if value < best - self.tolerance:
                    best, since_best = value, 0
                else:
                    since_best += 1
                    if since_best >= self.patience:
                        break
            losses.append(round(best, 4))
        affine = transform.affine @ update.matrix()
        progress.record("loss_per_level", losses)
        progress.record("scales", [round(float(v), 3) for v in update.log_scale.detach().exp().cpu()])
        progress.record("determinant", round(float(np.linalg.det(affine[:3, :3])), 4))
        return transform.with_affine(affine)
