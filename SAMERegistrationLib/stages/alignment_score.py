"""How well a transform aligns the two images, measured one way for every candidate transform.

The SAM stages decide between candidates with this score (SAM-affine against the intensity affine;
SAM-coarse's field against no field, region by region), so no SAM stage keeps a result that
aligns the images worse than what it could have had without SAM. The score is the squared local
correlation ``cc`` of local NCC (window ``options.lncc_window_mm``) between the fixed registration
channel and the moving one warped by the candidate, on the ``SCORE_SPACING_MM`` working level,
averaged over the fixed body mask (or the user's fixed mask). Fixed-body voxels that the warped
moving image does not cover count as 0, so a candidate cannot win by sliding the moving image out
of the overlap. The score lies in [0, 1): higher is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..filters import window_mean
from ..losses.similarity import local_correlation_map
from ..pipeline.problem import RegistrationProblem
from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points
from ..spatial.transform import SpatialTransform

SCORE_SPACING_MM = 4.0
"""Working spacing of the score (the intensity affine's finest level, so both see the same images)."""


@dataclass(frozen=True)
class SimilarityMap:
    """Per-voxel alignment on the fixed working grid of the score.

    Attributes:
        values: ``(D, H, W)`` squared local correlation in [0, 1), 0 where the warped moving image
            has no data.
        weight: ``(D, H, W)`` the fixed mask (body or user's) times where the fixed image has data.
        grid: the fixed working grid at ``SCORE_SPACING_MM``.
    """

    values: torch.Tensor
    weight: torch.Tensor
    grid: Grid

    def mean(self) -> float:
        """The alignment score: weighted mean of ``values`` (0 for an empty mask)."""
        total = float(self.weight.sum())
        return float((self.values * self.weight).sum()) / total if total > 0 else 0.0


def similarity_map(problem: RegistrationProblem, transform: SpatialTransform,
                   spacing: float = SCORE_SPACING_MM) -> SimilarityMap:
    """The local correlation of the fixed image and the moving image warped by ``transform``."""
    level = problem.level(spacing)
    window = problem.options.lncc_window(spacing)
    with torch.no_grad():
        points = transform.to(problem.device).map_points(level.fixed.grid.world_points(device=problem.device))
        values, valid = level.sample_moving(points)
        cc = local_correlation_map(level.fixed.data[None, None], values[None, None], (window,) * 3)[0, 0]
    return SimilarityMap(cc * valid, level.fixed_weight, level.fixed.grid)


def alignment_score(problem: RegistrationProblem, transform: SpatialTransform) -> float:
    """The score of ``transform`` (see the module docstring): higher is better."""
    return similarity_map(problem, transform).mean()


def smooth(volume: torch.Tensor, width_voxels: int, passes: int = 2) -> torch.Tensor:
    """``volume`` ``(D, H, W)`` averaged ``passes`` times over a cube of ``width_voxels`` (odd,
    edge-replicated), e.g. to turn a voxel-wise decision into a smooth weight."""
    width = max(1, width_voxels) | 1
    for _ in range(passes):
        volume = window_mean(volume, width, border="replicate")
    return volume


def best_candidate(problem: RegistrationProblem, candidates: dict[str, SpatialTransform]
                   ) -> tuple[str, dict[str, float]]:
    """The name of the best-scoring candidate and every candidate's score (ties go to the first)."""
    scores = {name: alignment_score(problem, transform) for name, transform in candidates.items()}
    return max(scores, key=lambda name: scores[name]), scores


def improvement_gate(before: SimilarityMap, after: SimilarityMap, grid: Grid, width_mm: float) -> torch.Tensor:
    """Where a change of transform improved the alignment, as weights for its displacement.

    The local gain ``after - before`` is averaged over cubes of ``width_mm`` within the fixed mask;
    regions that gained get 1, regions that lost 0, and the decision is smoothed over the same
    width so the weighted field stays smooth.

    Returns:
        ``(D, H, W)`` weights in [0, 1] on ``grid`` (any grid in the same fixed space).
    """
    width = int(round(width_mm / before.grid.spacing[0]))
    weight = before.weight
    gain = smooth((after.values - before.values) * weight, width) / smooth(weight, width).clamp_min(1e-6)
    keep = smooth((gain > 0).float(), width)
    dense = sample_at_points(keep[None], before.grid, grid.world_points(device=keep.device), padding="border")
    return dense[0].clamp(0.0, 1.0)
