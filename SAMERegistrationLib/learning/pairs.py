"""Image pairs as tensors on one shared grid: what a registration network and its losses consume.

The moving image is already resampled onto the fixed grid through the transform found so far (in
a pipeline: the affine/coarse stages; in training: nothing, or a pre-alignment), so a learned stage
only predicts a residual displacement ``u`` on that grid: the warped moving image is
``moving(x + u(x))``. Every tensor of a :class:`PairBatch` is ``(N, C, D, H, W)`` on ``grid``
(canonical: isotropic, identity direction, so channel ``(x, y, z)`` of a field runs along
``(W, H, D)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pipeline.problem import RegistrationProblem
from ..preprocess import CT_AIR_HU, to_working_grid
from ..spatial.grid import Grid
from ..spatial.transform import SpatialTransform
from ..spatial.warp import resample_image


@dataclass(frozen=True)
class FeaturePair:
    """Frozen per-voxel features of both images (e.g. SAM embeddings), computed once per pair.

    Attributes:
        fixed, moving: ``(N, C, d, h, w)`` unit vectors on ``grid`` (the moving image's features
            are those of the moving image as it lies on the fixed grid, before ``u``).
        grid: the grid of the features (usually a coarser version of the pair's grid).
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    grid: Grid


@dataclass
class PairBatch:
    """Fixed and moving images on one grid.

    Attributes:
        fixed, moving: ``(N, 1, D, H, W)`` registration channels in [-1, 1].
        weight: ``(N, 1, D, H, W)`` similarity weight: the fixed mask (user's, or the body) times
            where the moving image has data.
        grid: the grid of every tensor here.
        fixed_hu, moving_hu: ``(N, 1, D, H, W)`` Hounsfield units, or None when the images are not
            CT (feature extractors trained on CT, like SAM, need HU).
        fixed_labels, moving_labels: ``(N, 1, D, H, W)`` int64 label maps, or None.
        features: frozen features by name (see :class:`FeaturePair`), filled by whoever builds the
            pair (the SAM similarity and SAM correlation read ``features["sam"]``).
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    weight: torch.Tensor
    grid: Grid
    fixed_hu: torch.Tensor | None = None
    moving_hu: torch.Tensor | None = None
    fixed_labels: torch.Tensor | None = None
    moving_labels: torch.Tensor | None = None
    features: dict[str, FeaturePair] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> PairBatch:
        """The same pair with every tensor on ``device`` (features included)."""
        def moved(value):
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return PairBatch(**{name: moved(getattr(self, name)) for name in
                            ("fixed", "moving", "weight", "grid", "fixed_hu", "moving_hu", "fixed_labels", "moving_labels")},
                         features={name: FeaturePair(f.fixed.to(device), f.moving.to(device), f.grid)
                                   for name, f in self.features.items()})


def pair_from_problem(problem: RegistrationProblem, transform: SpatialTransform, spacing: float) -> PairBatch:
    """The problem's images at working ``spacing`` mm, the moving one resampled through
    ``transform`` onto the fixed working grid (a batch of one, on the problem's device).

    HU channels are included when both images look like CT.
    """
    level = problem.level(spacing)
    grid = level.fixed.grid
    device = problem.device
    with torch.no_grad():
        points = transform.map_points(grid.world_points(device=device))
        moving, valid = level.sample_moving(points)
    pair = PairBatch(fixed=level.fixed.data[None, None], moving=moving[None, None],
                     weight=(level.fixed_weight * valid)[None, None], grid=grid)
    if problem.fixed_is_ct and problem.moving_is_ct:
        fixed_hu = to_working_grid(problem.fixed, spacing, is_ct=True)
        moving_hu = resample_image(problem.moving, grid, transform, fill=CT_AIR_HU)
        pair.fixed_hu = fixed_hu.data[None, None].to(device)
        pair.moving_hu = moving_hu.data[None, None].to(device)
    return pair

