"""TVF-diffeomorphic stage: time-dependent velocity fields, test-time refinement, forward and inverse.

The incoming transform is an affine ``A`` (SAM-affine), possibly followed by a dense field ``c``
(SAM-coarse: ``x -> A (x + c(x))``). A dense field need not be invertible, so it is first turned
into *guidance velocities*: ``K`` equal velocity steps ``g`` on the half-resolution grid whose flow
approximates ``c`` (:func:`guidance_velocities`; each step is a small, invertible Euler step). The
moving image is resampled through ``A`` and that flow onto the fixed working grid of the network's
spacing (2 mm); the TVF network predicts ``T`` velocity fields on the half-resolution grid
(:mod:`..tvf.network`), applied before the guidance steps. All ``T + K`` fields are then refined on
this one pair (Adam on the mode's loss, TM-TVF or TM-TVF-LDDMM, with the images at half resolution:
:func:`..learning.instance_optimisation.refine`), integrated by ``phi_{t+1} = phi_t + v_t o phi_t``
into the residual ``u`` composed after ``A``: ``phi(x) = A (x + u(x))``. The inverse integrates the
negated velocities in reverse time order (:func:`..spatial.integrate.invert_velocities`) into
``w``: ``phi^-1(y) = z + w(z)``, ``z = A^-1 y`` (:class:`..spatial.transform.InverseTransform`), kept
in :attr:`TimeDependentVelocityFields.inverse` for the outputs. ``w`` lives on the working grid
grown by the largest displacement, because ``x + u(x)`` leaves the fixed grid near its edges (a
thin slab's top and bottom slices).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import numpy as np
import torch

from ..filters import window_mean
from ..learning.instance_optimisation import refine
from ..learning.pairs import pair_from_problem
from ..networks.unet import half_grid
from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..sam.features import add_sam_features
from ..sam.network import SAMNet
from ..spatial.grid import Grid
from ..spatial.integrate import integrate_velocities, invert_velocities
from ..spatial.jacobian import jacobian_determinant
from ..spatial.sampling import sample_at_points
from ..spatial.transform import InverseTransform, SpatialTransform
from ..tvf.network import TVFNet, prediction_of
from ..tvf.objective import TVFLossSettings, TVFObjective
from .sam_affine import fixed_embeddings

DEFAULT_REFINE_ITERATIONS = 50
DEFAULT_REFINE_SIMILARITY = "lncc+0.1*sam"
DEFAULT_REFINE_LDDMM_WEIGHT = 1e11
DEFAULT_GUIDANCE_STEPS = 4
GUIDANCE_TOLERANCE_MM = 0.5
"""Mean mismatch between an incoming dense field and its guidance flow above which the stage warns
(e.g. a folding initial field given by the user); SAM-coarse fields give under 0.1 mm."""


class TimeDependentVelocityFields(Stage):
    """Network prediction of ``T`` velocity fields + instance optimisation; forward and inverse.

    Args:
        network: TVF weights.
        loss: "tvf" or "tvf-lddmm": the refinement's loss (the mode).
        sam: the SAM network, needed only when ``refine_similarity`` has a "sam" term.
        refine_iterations: Adam iterations of the test-time refinement (0: network output only).
        refine_similarity: similarity spec of the refinement.
        refine_learning_rate_mm: Adam step size on each velocity field, in mm.
        refine_lddmm_weight: weight of ``sum_t ||L v_t||^2`` in the ``tvf-lddmm`` refinement: 50 times
            the training default, because the refinement otherwise roughens the fields at
            wavelengths of a few centimetres, where the mm-unit operator is weakest (measured on
            the tsA -> tsC pair with 2e10: std(log J) 0.71 against 0.34 for ``tvf``).
        inverse_iterations: fixed-point corrections per inverse step (see ``invert_velocities``).
        guidance_steps: velocity steps ``K`` that replace an incoming dense field (e.g. SAM-coarse).
    """

    name = "tvf"

    def __init__(self, network: TVFNet, loss: str = "tvf", sam: SAMNet | None = None,
                 refine_iterations: int = DEFAULT_REFINE_ITERATIONS,
                 refine_similarity: str = DEFAULT_REFINE_SIMILARITY, refine_learning_rate_mm: float = 0.05,
                 refine_lddmm_weight: float = DEFAULT_REFINE_LDDMM_WEIGHT, inverse_iterations: int = 3,
                 guidance_steps: int = DEFAULT_GUIDANCE_STEPS) -> None:
        if refine_iterations < 0:
            raise ValueError(f"TimeDependentVelocityFields: 'refine_iterations' must be >= 0, got {refine_iterations}")
        self.network = network.eval()
        self.objective = TVFObjective(TVFLossSettings(loss=loss, similarity=refine_similarity,
                                                      lddmm_weight=refine_lddmm_weight))
        if self.objective.needs_sam and sam is None:
            raise ValueError("TimeDependentVelocityFields: a 'sam' similarity needs the SAM network")
        self.sam = sam
        self.refine_iterations = refine_iterations
        self.refine_learning_rate_mm = refine_learning_rate_mm
        self.inverse_iterations = inverse_iterations
        if guidance_steps < 1:
            raise ValueError(f"TimeDependentVelocityFields: 'guidance_steps' must be >= 1, got {guidance_steps}")
        self.guidance_steps = guidance_steps
        self.inverse: InverseTransform | None = None
        """After :meth:`run`: the moving -> fixed inverse of the result."""

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        device = problem.device
        spacing = self.network.config.spacing_mm
        affine = SpatialTransform.from_affine(transform.affine)
        velocity_grid = half_grid(problem.level(spacing).fixed.grid)
        guidance: list[torch.Tensor] = []
        start_transform = affine
        if transform.has_field:
            progress.update(0.01, f"turning the incoming dense field into {self.guidance_steps} velocity steps")
            guidance, flow = guidance_velocities(transform, velocity_grid, self.guidance_steps, progress, device)
            start_transform = affine.then_residual(flow[0], velocity_grid)
        progress.update(0.02, f"resampling the moving image onto the {spacing:g} mm grid")
        pair = pair_from_problem(problem, start_transform, spacing)
        start = time.perf_counter()
        with torch.no_grad():
            velocities = self.network.to(device)(pair.fixed, pair.moving, pair.grid) + guidance
        progress.record("network_seconds", round(time.perf_counter() - start, 2))
        progress.record("velocity_fields", len(velocities))
        if self.refine_iterations > 0:
            velocities = self._refine(problem, affine, velocities, velocity_grid, progress)
        progress.update(0.95, "integrating the forward and the inverse transform")
        with torch.no_grad():
            forward = prediction_of(velocities, velocity_grid, pair.grid).displacement[0]
            margin = int(math.ceil(float(forward.norm(dim=0).max()) / pair.grid.spacing[0])) + 1
            inverse_grid = padded(pair.grid, margin)
            inverse = invert_velocities(velocities, velocity_grid, self.inverse_iterations, at=inverse_grid)[0]
        self.inverse = InverseTransform(np.linalg.inv(transform.affine), inverse, inverse_grid)
        return affine.then_residual(forward, pair.grid)

    def _refine(self, problem: RegistrationProblem, transform: SpatialTransform, velocities: list[torch.Tensor],
                velocity_grid: Grid, progress: Progress) -> list[torch.Tensor]:
        """The velocity fields after test-time optimisation on the half-resolution images: the network's
        ``v_t`` (and guidance steps) plus smoothed residuals that Adam optimises from zero."""
        coarse = pair_from_problem(problem, transform, velocity_grid.spacing[0])
        objective = self.objective
        if objective.needs_sam:
            embedded = pair_from_problem(problem, transform, self.sam.config.spacing_mm)
            if embedded.fixed_hu is None:
                progress.warn("note", "images are not CT in HU: no SAM features; the refinement uses local NCC only")
                objective = TVFObjective(replace(objective.settings, similarity="lncc"))
            else:
                coarse.features = add_sam_features(embedded, self.sam.to(problem.device),
                                                   fixed_embeddings(problem, self.sam)).features
        parameters = [torch.zeros_like(v, requires_grad=True) for v in velocities]

        def refined() -> list[torch.Tensor]:
            return [v + _smooth(r) for v, r in zip(velocities, parameters)]

        def loss():
            return objective(coarse, prediction_of(refined(), velocity_grid, coarse.grid))

        report = refine(parameters, loss, self.refine_iterations, self.refine_learning_rate_mm, progress,
                        (0.1, 0.9), "test-time refinement of the velocity fields")
        progress.record("refinement", {"loss": objective.settings.loss, "similarity": objective.settings.similarity,
                                       **report.summary()})
        with torch.no_grad():
            return refined()


def guidance_velocities(transform: SpatialTransform, velocity_grid: Grid, steps: int, progress: Progress,
                        device: torch.device | str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``steps`` equal velocities ``g`` (``(1, 3, d, h, w)`` LPS mm on ``velocity_grid``) whose flow
    ``(Id + g)^steps`` approximates the transform's dense field ``c`` (``x -> A (x + c(x))``), and
    that flow's displacement ``(1, 3, d, h, w)`` (LPS mm on ``velocity_grid``).

    Starts from ``g = c / steps`` and corrects ``g <- g + (c - flow(g)) / steps`` a few times (the
    flow of a smooth field differs from ``steps`` times its value by second-order terms). Records
    the remaining mismatch (mean / max over the grid, mm) and the smallest ``det(Id + grad g)``: above
    0 every step, hence the flow, is invertible.
    """
    field = transform.field.to(device)
    target = sample_at_points(field, transform.field_grid, velocity_grid.world_points(device=device),
                              padding="border")[None]
    step = target / steps
    with torch.no_grad():
        for _ in range(4):
            step = step + (target - integrate_velocities([step] * steps, velocity_grid)) / steps
        flow = integrate_velocities([step] * steps, velocity_grid)
        mismatch = (flow - target).norm(dim=1)
        smallest = float(jacobian_determinant(step[0], velocity_grid).min())
    progress.record("guidance", {"steps": steps, "mismatch_mean_mm": round(float(mismatch.mean()), 3),
                                 "mismatch_max_mm": round(float(mismatch.max()), 3),
                                 "smallest_step_jacobian": round(smallest, 3)})
    if float(mismatch.mean()) > GUIDANCE_TOLERANCE_MM or smallest <= 0:
        warnings.warn(f"TVF: the incoming dense field is not the flow of {steps} invertible velocity steps "
                      f"(mean mismatch {float(mismatch.mean()):.2f} mm, smallest step Jacobian {smallest:.2f}): "
                      "the TVF transform starts from an invertible approximation of it", stacklevel=2)
    return [step] * steps, flow


def _smooth(field: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """``passes`` 3x3x3 box filters (edges replicated) of a ``(N, 3, D, H, W)`` field: Adam moves every
    voxel by about the step size, so the refined residuals are smoothed before they are added."""
    for _ in range(passes):
        field = window_mean(field, 3, border="replicate")
    return field


def padded(grid: Grid, margin: int) -> Grid:
    """``grid`` grown by ``margin`` voxels on every side (same spacing and direction)."""
    origin = grid.index_to_world() @ np.array([-margin, -margin, -margin, 1.0])
    return Grid.create([n + 2 * margin for n in grid.shape], grid.spacing, origin[:3], grid.direction_matrix)
