"""Initial alignment: a translation found from body centroids and an exhaustive coarse search.

Scans of different patients or scanners often do not overlap in physical space at all (origins
hundreds of mm apart) and may cover different lengths of the body (a 4 cm slab against a torso).
This stage first moves the moving body centroid onto the fixed one, then tries translations on a
coarse grid: every superior-inferior offset at which the scans still overlap, and a few
in-plane offsets, scoring each by masked local NCC and keeping the best well-overlapping one.
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
        candidates = []
        with torch.no_grad():
            for n, dz in enumerate(z_offsets):
                progress.update(n / len(z_offsets), f"searching offset {dz:+.0f} mm along S")
                for dx in xy_offsets:
                    for dy in xy_offsets:
                        shift = centroid_shift + np.array([dx, dy, dz])
                        values, valid = level.sample_moving(points + torch.as_tensor(shift, dtype=points.dtype, device=points.device))
                        weight = level.fixed_weight * valid
                        overlap = float(weight.sum() / total_weight)
                        if overlap == 0.0:
                            continue
                        loss = float(local_ncc(fixed, values[None, None], window, weight[None, None]))
                        candidates.append((overlap, loss, shift))
        if not candidates:
            progress.record("note", "no overlapping position found; centroids aligned")
            return SpatialTransform.from_affine(_translation(centroid_shift))
        best_overlap = max(c[0] for c in candidates)
        eligible = [c for c in candidates if c[0] >= self.min_relative_overlap * best_overlap]
        overlap, loss, shift = min(eligible, key=lambda c: c[1])
        progress.record("translation_mm", [round(float(v), 2) for v in shift])
        progress.record("overlap_fraction", round(overlap, 3))
        progress.record("lncc_loss", round(loss, 4))
        progress.record("candidates", len(candidates))
        return SpatialTransform.from_affine(_translation(shift))


def _centroid(mask: Image) -> np.ndarray:
    """LPS mm centre of mass of a binary mask."""
    weights = mask.data.double().reshape(-1)
    points = mask.grid.world_points(dtype=torch.float64).reshape(-1, 3)
    return (points * weights[:, None]).sum(0).numpy() / max(float(weights.sum()), 1.0)


def _translation(shift: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    return matrix
