"""SAM-affine: an affine fitted to anatomical point matches found by SAM, kept only when it
aligns the images at least as well as the intensity affine.

1. Grid points every ``stride`` working voxels inside the fixed body mask are matched into the
   moving image by *stable sampling* (:func:`stable_matches`: forward and back, iterated, keeping
   mutual best matches; coarse to fine over the whole moving scan, so no initial overlap is
   needed); matches below ``score_threshold`` or outside the moving body are dropped.
2. An affine is fitted by RANSAC + least squares on the inliers, and tested against anatomical
   ranges (:class:`AnatomicalAffineRange`: inlier count and share, inlier RMS, determinant and
   per-axis scales).
3. The intensity affine (initial alignment + :class:`IntensityAffine`) is computed too, and the two
   are compared by one score computed the same way for both (:func:`alignment_score`, local
   correlation over the fixed body). The better one is the stage's result.

Whenever SAM's affine is not used (too few matches, an implausible fit, a lower score, images that
are not CT in HU) the stage warns with the reason, so the command line and the Slicer log show it,
and ``summary.json`` records both scores. A SAM failure never fails the run.
"""

from __future__ import annotations

import numpy as np
import torch

from ..image import Image
from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..sam.embedding import Embeddings, embed
from ..sam.matching import stable_matches
from ..sam.network import SAMNet
from ..spatial.affine_fit import AnatomicalAffineRange, ransac_affine
from ..spatial.sampling import sample_at_points
from ..spatial.transform import SpatialTransform
from .alignment_score import alignment_score, best_candidate
from .initial_alignment import InitialAlignment
from .intensity_affine import IntensityAffine


def fixed_embeddings(problem: RegistrationProblem, model: SAMNet) -> Embeddings:
    """SAM embeddings of the fixed image by ``model``, computed once per problem and shared by the
    SAM stages (SAM-affine, SAM-coarse, and the SAM features of the learned stages)."""
    return problem.memo(f"sam-fixed-{id(model)}", lambda: embed(problem.fixed, model, problem.device))


def fixed_grid_points(problem: RegistrationProblem, stride: int, max_points: int) -> torch.Tensor:
    """World points ``(N, 3)`` every ``stride`` voxels of the fixed working grid inside the body
    mask, at most ``max_points`` of them (an even random subset, fixed seed)."""
    mask = problem.fixed_body_mask()
    points = mask.grid.world_points()[::stride, ::stride, ::stride]
    points = points[mask.data[::stride, ::stride, ::stride].bool()]
    if len(points) > max_points:
        points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:max_points]]
    return points


def inside(mask: Image, points: torch.Tensor) -> torch.Tensor:
    """``(N,)`` booleans: which LPS points ``(N, 3)`` fall inside a binary ``mask`` (nearest voxel;
    outside its grid counts as outside)."""
    return sample_at_points(mask.data.float().to(points.device), mask.grid, points, "nearest") > 0.5


class SAMAffine(Stage):
    """Affine from SAM point matches, or the intensity affine when that aligns better (replaces the
    incoming affine).

    Args:
        model: the SAM network.
        stride: grid point spacing in working voxels (8 voxels = 16 mm at 2 mm).
        score_threshold: minimum combined cosine similarity of a match.
        stable_iterations: forward-backward rounds of the stable sampling.
        inlier_threshold_mm: RANSAC inlier distance.
        max_points: at most this many grid points are matched (plenty for 12 parameters).
        plausible: the anatomical ranges a SAM fit must meet.
    """

    name = "sam-affine"

    def __init__(self, model: SAMNet, stride: int = 8, score_threshold: float = 0.7, stable_iterations: int = 3,
                 inlier_threshold_mm: float = 10.0, max_points: int = 2000,
                 plausible: AnatomicalAffineRange = AnatomicalAffineRange()) -> None:
        self.model = model
        self.stride = stride
        self.score_threshold = score_threshold
        self.stable_iterations = stable_iterations
        self.inlier_threshold_mm = inlier_threshold_mm
        self.max_points = max_points
        self.plausible = plausible

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        if not (problem.fixed_is_ct and problem.moving_is_ct):
            reason = "the images do not look like CT in HU, which SAM needs"
            sam_affine = None
        else:
            sam_affine, reason = self._sam_affine(problem, progress)
        progress.update(0.6, "intensity affine (the candidate SAM's affine is compared with)")
        intensity_progress = progress.child()
        intensity = IntensityAffine().run(problem, InitialAlignment().run(problem, transform, intensity_progress),
                                          intensity_progress)
        progress.record("intensity_affine", intensity_progress.details)
        if sam_affine is None:
            progress.record("score_intensity_affine", round(alignment_score(problem, intensity), 4))
            return self._use_intensity(progress, intensity, reason)
        candidate = transform.with_affine(sam_affine)
        chosen, scores = best_candidate(problem, {"sam": candidate, "intensity": intensity})
        progress.record("score_sam_affine", round(scores["sam"], 4))
        progress.record("score_intensity_affine", round(scores["intensity"], 4))
        if chosen == "intensity":
            return self._use_intensity(progress, intensity, f"the intensity affine aligns the bodies better (score "
                                                            f"{scores['intensity']:.3f} against SAM's {scores['sam']:.3f})")
        progress.record("chosen", "sam")
        return candidate

    def _sam_affine(self, problem: RegistrationProblem, progress: Progress) -> tuple[np.ndarray | None, str]:
        """SAM's affine (4x4, fixed -> moving) and "" or None and why there is none."""
        progress.update(0.05, "embedding the fixed image")
        source = fixed_embeddings(problem, self.model)
        progress.update(0.2, "embedding the moving image")
        target = embed(problem.moving, self.model, problem.device)
        points = fixed_grid_points(problem, self.stride, self.max_points).to(problem.device)
        progress.update(0.3, f"stable matching of {len(points)} grid points")
        matches = stable_matches(source, target, points, iterations=self.stable_iterations)
        keep = ((matches.score >= self.score_threshold) & inside(problem.fixed_body_mask(), matches.source_points)
                & inside(problem.moving_body_mask(), matches.target_points))
        progress.record("grid_points", len(points))
        progress.record("stable_matches", len(matches.score))
        progress.record("confident_matches", int(keep.sum()))
        fixed_points = matches.source_points[keep].double().cpu().numpy()
        moving_points = matches.target_points[keep].double().cpu().numpy()
        if len(fixed_points) < self.plausible.min_inliers:
            return None, (f"only {len(fixed_points)} confident stable SAM matches "
                          f"(need {self.plausible.min_inliers})")
        progress.update(0.5, "fitting the affine")
        try:
            fit = ransac_affine(fixed_points, moving_points, self.inlier_threshold_mm)
        except ValueError as error:
            return None, f"no affine fits the SAM matches ({error})"
        progress.record("inliers", int(fit.inliers.sum()))
        progress.record("inlier_rms_mm", round(fit.rms_mm, 2))
        progress.record("determinant", round(float(np.linalg.det(fit.matrix[:3, :3])), 4))
        progress.record("axis_scales", [round(float(s), 3) for s in np.linalg.svd(fit.matrix[:3, :3], compute_uv=False)])
        problems = self.plausible.problems(fit)
        if problems:
            return None, "implausible SAM affine: " + "; ".join(problems)
        return fit.matrix, ""

    @staticmethod
    def _use_intensity(progress: Progress, intensity: SpatialTransform, reason: str) -> SpatialTransform:
        progress.record("chosen", "intensity")
        progress.warn("fallback", f"{reason}: using the intensity affine")
        return intensity
