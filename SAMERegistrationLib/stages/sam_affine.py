"""SAM-affine: an affine fitted to anatomical point matches found by SAM.

Grid points every ``stride`` working voxels inside the fixed body mask are matched into the moving
image (:func:`match_points`, coarse to fine over the whole moving scan, so no initial overlap is
needed). Matches below ``score_threshold`` or failing the forward-backward check are dropped, and
the affine is fitted by RANSAC + least squares on the inliers (the paper used plain least squares;
a few wrong matches then pull the whole transform). With too few confident matches, or an
implausible fit, the stage warns and falls back to the intensity initial alignment and affine.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..sam.embedding import Embeddings, embed
from ..sam.matching import match_points
from ..sam.network import SAMNet
from ..spatial.affine_fit import ransac_affine
from ..spatial.transform import SpatialTransform
from .initial_alignment import InitialAlignment
from .intensity_affine import IntensityAffine


def fixed_embeddings(problem: RegistrationProblem, model: SAMNet) -> Embeddings:
    """SAM embeddings of the fixed image, computed once per problem and shared by the SAM stages."""
    return problem.memo("sam-fixed", lambda: embed(problem.fixed, model, problem.device))


def fixed_grid_points(problem: RegistrationProblem, stride: int, max_points: int) -> torch.Tensor:
    """World points ``(N, 3)`` every ``stride`` voxels of the fixed working grid inside the body
    mask, at most ``max_points`` of them (an even random subset, fixed seed)."""
    mask = problem.fixed_body_mask()
    points = mask.grid.world_points()[::stride, ::stride, ::stride]
    points = points[mask.data[::stride, ::stride, ::stride].bool()]
    if len(points) > max_points:
        points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:max_points]]
    return points


class SAMAffine(Stage):
    """Affine from SAM point matches (replaces the incoming affine).

    Args:
        model: the SAM network.
        stride: grid point spacing in working voxels (8 voxels = 16 mm at 2 mm).
        score_threshold: minimum combined cosine similarity of a match.
        cycle_tolerance_mm: forward-backward check: a match must return within this distance.
        inlier_threshold_mm: RANSAC inlier distance.
        min_matches: fewer confident matches than this trigger the fallback.
        max_points: at most this many grid points are matched (plenty for 12 parameters).
    """

    name = "sam-affine"

    def __init__(self, model: SAMNet, stride: int = 8, score_threshold: float = 0.7, cycle_tolerance_mm: float = 8.0,
                 inlier_threshold_mm: float = 10.0, min_matches: int = 20, max_points: int = 2000) -> None:
        self.model = model
        self.stride = stride
        self.score_threshold = score_threshold
        self.cycle_tolerance_mm = cycle_tolerance_mm
        self.inlier_threshold_mm = inlier_threshold_mm
        self.min_matches = min_matches
        self.max_points = max_points

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        progress.update(0.05, "embedding the fixed image")
        source = fixed_embeddings(problem, self.model)
        progress.update(0.35, "embedding the moving image")
        target = embed(problem.moving, self.model, problem.device)
        points = fixed_grid_points(problem, self.stride, self.max_points).to(problem.device)
        progress.update(0.65, f"matching {len(points)} grid points")
        matches = match_points(source, target, points, cycle_tolerance_mm=self.cycle_tolerance_mm)
        keep = (matches.score >= self.score_threshold) & matches.consistent
        progress.record("grid_points", len(points))
        progress.record("confident_matches", int(keep.sum()))
        fixed_points = points[keep].double().cpu().numpy()
        moving_points = matches.points[keep].double().cpu().numpy()
        if len(fixed_points) < self.min_matches:
            return self._fall_back(problem, transform, progress,
                                   f"only {len(fixed_points)} confident SAM matches (need {self.min_matches})")
        progress.update(0.9, "fitting the affine")
        fit = ransac_affine(fixed_points, moving_points, self.inlier_threshold_mm)
        progress.record("inliers", int(fit.inliers.sum()))
        progress.record("inlier_rms_mm", round(fit.rms_mm, 2))
        determinant = float(np.linalg.det(fit.matrix[:3, :3]))
        progress.record("determinant", round(determinant, 4))
        if not 0.5 < determinant < 2.0 or fit.inliers.sum() < self.min_matches:
            return self._fall_back(problem, transform, progress,
                                   f"implausible SAM affine (determinant {determinant:.2f}, {int(fit.inliers.sum())} inliers)")
        return transform.with_affine(fit.matrix)

    def _fall_back(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress,
                   reason: str) -> SpatialTransform:
        warnings.warn(f"SAM-affine: {reason}: falling back to the intensity initial alignment and affine", stacklevel=2)
        progress.record("fallback", reason)
        fallback = progress.child()
        result = IntensityAffine().run(problem, InitialAlignment().run(problem, transform, fallback), fallback)
        progress.record("fallback_details", fallback.details)
        return result
