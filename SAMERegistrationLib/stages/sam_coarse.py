"""SAM-coarse: a smooth, invertible coarse deformation from SAM matches after the affine, kept
only where it improves the alignment.

1. The moving image is resampled through the incoming transform onto the fixed working grid and
   re-embedded, so corresponding anatomy is now close by; the fixed grid points are re-matched
   by stable sampling with local search windows around their own position
   (:func:`stable_matches`), and confident matches inside both bodies give sparse displacements.
2. A stationary velocity field on a coarse control grid is fitted to them (robust Charbonnier
   point distance plus a bending-energy penalty, Adam), integrated by scaling and squaring on the
   control grid (so the coarse map cannot fold) and densified trilinearly.
3. The field is kept only where it improves the alignment score (:mod:`alignment_score`): the
   local gain of the fixed/moving local correlation is smoothed over ``gate_width_mm``, regions
   that gain keep the field, the others fade to no deformation, and if the gated field does not
   raise the score over the whole body the stage adds nothing.

When the stage adds nothing (too few confident matches, no gain) it warns, so the command line and
the Slicer log show it; ``summary.json`` records the scores before, fitted and kept.
"""

from __future__ import annotations

import torch

from ..losses import bending_energy
from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..preprocess import CT_AIR_HU
from ..sam.embedding import embed
from ..sam.matching import stable_matches
from ..sam.network import SAMNet
from ..spatial.grid import Grid
from ..spatial.integrate import scaling_and_squaring
from ..spatial.jacobian import jacobian_determinant
from ..spatial.sampling import sample_at_points
from ..spatial.transform import SpatialTransform
from ..spatial.warp import resample_image
from .alignment_score import improvement_gate, similarity_map
from .sam_affine import fixed_embeddings, fixed_grid_points, inside


class SAMCoarse(Stage):
    """Coarse dense deformation fitted to SAM re-matches (composed after the incoming transform).

    Args:
        model: the SAM network.
        stride: grid point spacing in working voxels.
        score_threshold: minimum combined cosine similarity of a match.
        stable_iterations: forward-backward rounds of the stable sampling.
        window_mm: local search half-width around each point's own position.
        control_spacing_mm: spacing of the fitted velocity grid.
        smoothness_weight: weight of the bending energy (per mm^2 of the control grid).
        iterations: Adam iterations of the fit.
        max_points: at most this many grid points are re-matched.
        min_confident_fraction: below this share of confident matches no deformation is added.
        gate_width_mm: scale over which the local gain in alignment is averaged to decide where
            the field is kept.
    """

    name = "sam-coarse"

    def __init__(self, model: SAMNet, stride: int = 5, score_threshold: float = 0.7, stable_iterations: int = 2,
                 window_mm: float = 12.0, control_spacing_mm: float = 16.0, smoothness_weight: float = 2000.0,
                 iterations: int = 200, max_points: int = 10000, min_confident_fraction: float = 0.1,
                 gate_width_mm: float = 32.0) -> None:
        self.model = model
        self.stride = stride
        self.score_threshold = score_threshold
        self.stable_iterations = stable_iterations
        self.window_mm = window_mm
        self.control_spacing_mm = control_spacing_mm
        self.smoothness_weight = smoothness_weight
        self.iterations = iterations
        self.max_points = max_points
        self.min_confident_fraction = min_confident_fraction
        self.gate_width_mm = gate_width_mm

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        if not (problem.fixed_is_ct and problem.moving_is_ct):
            return self._unchanged(progress, transform, "the images do not look like CT in HU, which SAM needs")
        progress.update(0.05, "embedding the fixed image")
        source = fixed_embeddings(problem, self.model)
        grid = problem.fixed.grid.with_spacing(problem.options.spacing)
        progress.update(0.2, "re-embedding the aligned moving image")
        aligned = resample_image(problem.moving, grid, transform, fill=CT_AIR_HU)
        target = embed(aligned, self.model, problem.device)
        points = fixed_grid_points(problem, self.stride, self.max_points).to(problem.device)
        progress.update(0.4, f"stable re-matching of {len(points)} grid points")
        matches = stable_matches(source, target, points, iterations=self.stable_iterations,
                                 window_mm=self.window_mm, local_search=True)
        moving_body = problem.moving_body_mask()
        keep = ((matches.score >= self.score_threshold) & inside(problem.fixed_body_mask(), matches.source_points)
                & inside(moving_body, transform.map_points(matches.target_points)))
        progress.record("grid_points", len(points))
        progress.record("confident_matches", int(keep.sum()))
        if int(keep.sum()) < max(10, self.min_confident_fraction * len(points)):
            return self._unchanged(progress, transform, f"too few confident SAM matches ({int(keep.sum())} of "
                                                        f"{len(points)}; are the images affinely aligned?)")
        fitted = self._fit(matches.source_points[keep], (matches.target_points - matches.source_points)[keep],
                           grid, progress)
        progress.update(0.9, "keeping the field where it improves the alignment")
        before = similarity_map(problem, transform)
        after = similarity_map(problem, transform.then_residual(fitted, grid))
        gated = fitted * improvement_gate(before, after, grid, self.gate_width_mm)
        result = transform.then_residual(gated, grid)
        kept_score = similarity_map(problem, result).mean()
        progress.record("score_before", round(before.mean(), 4))
        progress.record("score_fitted", round(after.mean(), 4))
        progress.record("score_kept", round(kept_score, 4))
        if kept_score <= before.mean():
            return self._unchanged(progress, transform, f"the fitted field does not improve the alignment (score "
                                                        f"{before.mean():.3f} -> {kept_score:.3f})")
        body = resample_image(problem.fixed_body_mask(), grid, interpolation="nearest").data.bool()
        determinant = jacobian_determinant(gated, grid)[body]
        progress.record("percent_nonpositive_jacobian", round(100.0 * float((determinant <= 0).float().mean()), 4))
        return result

    def _fit(self, points: torch.Tensor, targets: torch.Tensor, grid: Grid, progress: Progress) -> torch.Tensor:
        """Dense ``(3, D, H, W)`` displacement on ``grid``: exp of a stationary velocity on the control
        grid fitted to sparse ``targets`` ``(N, 3)`` (mm) at ``points`` ``(N, 3)``."""
        control = grid.with_spacing(self.control_spacing_mm)
        velocity = torch.zeros((3, *control.shape), device=points.device, requires_grad=True)
        optimiser = torch.optim.Adam([velocity], lr=0.5)
        for iteration in range(self.iterations):
            optimiser.zero_grad()
            displacement = scaling_and_squaring(velocity, control)
            predicted = sample_at_points(displacement, control, points, padding="border").T
            distance = ((predicted - targets).square().sum(-1) + 1.0).sqrt().mean()
            loss = distance + self.smoothness_weight * bending_energy(velocity[None], control.spacing)
            loss.backward()
            optimiser.step()
            if iteration % 20 == 0:
                progress.update(0.5 + 0.4 * iteration / self.iterations,
                                f"fitting the coarse field, iteration {iteration}, point distance {distance.item():.2f} mm")
        with torch.no_grad():
            displacement = scaling_and_squaring(velocity, control)
            residual = (sample_at_points(displacement, control, points, padding="border").T - targets).norm(dim=-1)
            progress.record("fit_median_residual_mm", round(float(residual.median()), 2))
            return sample_at_points(displacement, control, grid.world_points(device=points.device), padding="border")

    @staticmethod
    def _unchanged(progress: Progress, transform: SpatialTransform, reason: str) -> SpatialTransform:
        progress.warn("note", f"{reason}: no coarse deformation added")
        return transform
