"""SAM-coarse: a smooth coarse deformation from SAM matches after the affine.

The moving image is resampled through the incoming transform onto the fixed working grid and
re-embedded, so corresponding anatomy is now close by; the fixed grid points are re-matched
(local search windows around their own position), confident and cycle-consistent matches give
sparse displacements, and a displacement field on a coarse control grid is fitted to them by
minimising a robust (Charbonnier) point distance plus a bending-energy penalty, then densified
trilinearly. The paper fitted a similar grid with a small diffusion weight and got its least smooth
result (std J 0.40); here the smoothness weight is larger and the point term is robust. When
fewer than ``min_confident_fraction`` of the points match confidently (the images are not yet
aligned, e.g. SAM-coarse without an affine start), the stage adds no deformation.
"""

from __future__ import annotations

import torch

from ..image import Image
from ..losses import bending_energy
from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..preprocess import CT_AIR_HU
from ..sam.embedding import embed
from ..sam.matching import match_points
from ..sam.network import SAMNet
from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points
from ..spatial.transform import SpatialTransform
from ..spatial.warp import resample_image
from .sam_affine import fixed_embeddings, fixed_grid_points


class SAMCoarse(Stage):
    """Coarse dense deformation fitted to SAM re-matches (composed after the incoming transform).

    Args:
        model: the SAM network.
        stride: grid point spacing in working voxels.
        score_threshold, cycle_tolerance_mm: match filters as in SAM-affine.
        window_mm: local search half-width around each point's own position.
        control_spacing_mm: spacing of the fitted displacement grid.
        smoothness_weight: weight of the bending energy (per mm^2 of the control grid).
        iterations: Adam iterations of the fit.
        max_points: at most this many grid points are re-matched.
        min_confident_fraction: below this share of confident matches no deformation is added.
    """

    name = "sam-coarse"

    def __init__(self, model: SAMNet, stride: int = 5, score_threshold: float = 0.7, cycle_tolerance_mm: float = 6.0,
                 window_mm: float = 12.0, control_spacing_mm: float = 16.0, smoothness_weight: float = 2000.0,
                 iterations: int = 200, max_points: int = 10000, min_confident_fraction: float = 0.2) -> None:
        self.model = model
        self.stride = stride
        self.score_threshold = score_threshold
        self.cycle_tolerance_mm = cycle_tolerance_mm
        self.window_mm = window_mm
        self.control_spacing_mm = control_spacing_mm
        self.smoothness_weight = smoothness_weight
        self.iterations = iterations
        self.max_points = max_points
        self.min_confident_fraction = min_confident_fraction

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        progress.update(0.05, "embedding the fixed image")
        source = fixed_embeddings(problem, self.model)
        grid = problem.fixed.grid.with_spacing(problem.options.spacing)
        progress.update(0.2, "re-embedding the aligned moving image")
        aligned = resample_image(problem.moving, grid, transform, fill=CT_AIR_HU)
        target = embed(aligned, self.model, problem.device)
        points = fixed_grid_points(problem, self.stride, self.max_points).to(problem.device)
        progress.update(0.5, f"re-matching {len(points)} grid points")
        matches = match_points(source, target, points, window_mm=self.window_mm, search_centres=points,
                               cycle_tolerance_mm=self.cycle_tolerance_mm)
        keep = (matches.score >= self.score_threshold) & matches.consistent
        progress.record("grid_points", len(points))
        progress.record("confident_matches", int(keep.sum()))
        if int(keep.sum()) < max(10, self.min_confident_fraction * len(points)):
            progress.record("note", f"too few confident matches ({int(keep.sum())} of {len(points)}): "
                                    "no coarse deformation (are the images affinely aligned?)")
            return transform
        displacement = self._fit(points[keep], (matches.points - points)[keep], grid, progress)
        return transform.then_residual(displacement, grid)

    def _fit(self, points: torch.Tensor, targets: torch.Tensor, grid: Grid, progress: Progress) -> torch.Tensor:
        """Dense ``(3, D, H, W)`` displacement on ``grid`` fitted to sparse ``targets`` at ``points``."""
        control = grid.with_spacing(self.control_spacing_mm)
        parameters = torch.zeros((3, *control.shape), device=points.device, requires_grad=True)
        optimiser = torch.optim.Adam([parameters], lr=0.5)
        for iteration in range(self.iterations):
            optimiser.zero_grad()
            predicted = sample_at_points(parameters, control, points, padding="border").T
            distance = ((predicted - targets).square().sum(-1) + 1.0).sqrt().mean()
            smoothness = bending_energy(parameters[None], control.spacing)
            loss = distance + self.smoothness_weight * smoothness
            loss.backward()
            optimiser.step()
            if iteration % 20 == 0:
                progress.update(0.6 + 0.4 * iteration / self.iterations,
                                f"fitting the coarse field, iteration {iteration}, point distance {distance.item():.2f} mm")
        with torch.no_grad():
            residual = (sample_at_points(parameters, control, points, padding="border").T - targets).norm(dim=-1)
            progress.record("fit_median_residual_mm", round(float(residual.median()), 2))
            return sample_at_points(parameters, control, grid.world_points(device=points.device), padding="border")
