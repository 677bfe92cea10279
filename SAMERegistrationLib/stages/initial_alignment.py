"""Initial alignment: a translation found from body centroids and an exhaustive coarse search.

Scans of different patients or scanners often do not overlap in physical space at all (origins
hundreds of mm apart) and may cover different lengths of the body (a 4 cm slab against a torso).
This stage first moves the moving body centroid onto the fixed one, then scores translations by
masked local NCC on a coarse grid: every superior-inferior offset at which the scans still
overlap, and around the best of those a few in-plane offsets. The best well-overlapping
candidate wins.
"""

from __future__ import annotations

import numpy as np
import torch

from ..image import Image
from ..losses import local_ncc
from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..spatial.transform import SpatialTransform


class InitialAlignment(Stage):
    """Translation-only start for the affine stage (ignores the incoming transform).

    Args:
        spacing: working spacing of the search in mm.
        in_plane_steps: in-plane (x, y) offsets tried on each side, in units of ``spacing``.
        min_relative_overlap: a candidate must overlap the fixed mask at least this fraction of
            the best overlap any candidate reaches.
    """

    name = "initial-alignment"

    def __init__(self, spacing: float = 8.0, in_plane_steps: int = 2, min_relative_overlap: float = 0.6) -> None:
        self.spacing = spacing
        self.in_plane_steps = in_plane_steps
        self.min_relative_overlap = min_relative_overlap

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        level = problem.level(self.spacing)
        centroid_shift = _centroid(problem.moving_body_mask()) - _centroid(problem.fixed_body_mask())
        fixed_extent = np.ptp(problem.fixed.grid.corners_world()[:, 2])
        moving_extent = np.ptp(problem.moving.grid.corners_world()[:, 2])
        reach = (fixed_extent + moving_extent) / 2.0
        z_offsets = np.arange(-reach, reach + 1e-6, self.spacing)
        xy_offsets = np.arange(-self.in_plane_steps, self.in_plane_steps + 1) * self.spacing

        points = level.fixed.grid.world_points(device=problem.device)
        fixed = level.fixed.data[None, None]
        total_weight = level.fixed_weight.sum()
        window = problem.options.lncc_window(self.spacing)

        def score(shift: np.ndarray) -> tuple[float, float, np.ndarray] | None:
            offset = torch.as_tensor(shift, dtype=points.dtype, device=points.device)
            values, valid = level.sample_moving(points + offset)
            weight = level.fixed_weight * valid
            overlap = float(weight.sum() / total_weight)
            if overlap == 0.0:
                return None
            return overlap, float(local_ncc(fixed, values[None, None], window, weight[None, None])), shift

        with torch.no_grad():
            along_z = []
            for n, dz in enumerate(z_offsets):
                progress.update(0.7 * n / len(z_offsets), f"searching offset {dz:+.0f} mm along S")
                along_z.append(score(centroid_shift + np.array([0.0, 0.0, dz])))
            candidates = [c for c in along_z if c is not None]
            if candidates:
                best_z = _best(candidates, self.min_relative_overlap)[2]
                local = [best_z + np.array([dx, dy, dz]) for dz in (-self.spacing / 2, 0.0, self.spacing / 2)
                         for dx in xy_offsets for dy in xy_offsets]
                for n, shift in enumerate(local):
                    progress.update(0.7 + 0.3 * n / len(local), "refining in-plane offset")
                    candidates.append(score(shift))
                candidates = [c for c in candidates if c is not None]
        if not candidates:
            progress.record("note", "no overlapping position found; centroids aligned")
            return SpatialTransform.from_affine(_translation(centroid_shift))
        overlap, loss, shift = _best(candidates, self.min_relative_overlap)
        progress.record("translation_mm", [round(float(v), 2) for v in shift])
        progress.record("overlap_fraction", round(overlap, 3))
        progress.record("lncc_loss", round(loss, 4))
        progress.record("candidates", len(candidates))
        return SpatialTransform.from_affine(_translation(shift))


def _best(candidates: list[tuple[float, float, np.ndarray]], min_relative_overlap: float
          ) -> tuple[float, float, np.ndarray]:
    """The lowest-loss (overlap, loss, shift) among those overlapping enough."""
    best_overlap = max(c[0] for c in candidates)
    eligible = [c for c in candidates if c[0] >= min_relative_overlap * best_overlap]
    return min(eligible, key=lambda c: c[1])


def _centroid(mask: Image) -> np.ndarray:
    """LPS mm centre of mass of a binary mask."""
    weights = mask.data.double().reshape(-1)
    points = mask.grid.world_points(dtype=torch.float64).reshape(-1, 3)
    return (points * weights[:, None]).sum(0).numpy() / max(float(weights.sum()), 1.0)


def _translation(shift: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    return matrix
