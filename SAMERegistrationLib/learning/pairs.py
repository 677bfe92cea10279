"""Image pairs as tensors on one shared grid: what a registration network and its losses consume.

The moving image is already resampled onto the fixed grid through the transform found so far (in
a pipeline: the affine/coarse stages; in training: nothing, or a pre-alignment), so a learned stage
only predicts a residual displacement ``u`` on that grid: the warped moving image is
``moving(x + u(x))``. At test time a pair can instead sample the moving image itself through the
incoming transform composed with ``u`` (:class:`MovingThroughTransform`): one interpolation
instead of two, so an optimiser is not drawn to ``u = 0``, where the resampled image is sharpest.
Every tensor of a :class:`PairBatch` is ``(N, C, D, H, W)`` on ``grid``
(canonical: isotropic, identity direction, so channel ``(x, y, z)`` of a field runs along
``(W, H, D)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..pipeline.problem import RegistrationProblem, WorkingLevel
from ..preprocess import CT_AIR_HU, to_working_grid
from ..spatial.fields import warp_batch
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
        moving_sampler: the moving image under a residual displacement ``(N, 3, D, H, W)`` ->
            ``(N, 1, D, H, W)``, or None: ``moving`` warped by it (see :meth:`warp_moving`).
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
    moving_sampler: Callable[[torch.Tensor], torch.Tensor] | None = None

    def warp_moving(self, displacement: torch.Tensor) -> torch.Tensor:
        """The moving registration channel at ``x + u(x)`` for every voxel ``x`` of ``grid``:
        ``displacement`` ``(N, 3, D, H, W)`` LPS mm -> ``(N, 1, D, H, W)``, differentiable in it."""
        if self.moving_sampler is not None:
            return self.moving_sampler(displacement)
        return warp_batch(self.moving, self.grid, displacement)

    def to(self, device: torch.device | str) -> PairBatch:
        """The same pair with every tensor on ``device`` (features included).

        Raises:
            ValueError: the pair has a ``moving_sampler`` (it holds tensors of its own device).
        """
        if self.moving_sampler is not None:
            raise ValueError("PairBatch.to(): a pair with a moving_sampler cannot move; build it on the device")
        def moved(value):
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return PairBatch(**{name: moved(getattr(self, name)) for name in
                            ("fixed", "moving", "weight", "grid", "fixed_hu", "moving_hu", "fixed_labels", "moving_labels")},
                         features={name: FeaturePair(f.fixed.to(device), f.moving.to(device), f.grid)
                                   for name, f in self.features.items()})


class MovingThroughTransform:
    """``moving(phi(x + u(x)))`` at the voxels ``x`` of a fixed working grid: the moving working
    image sampled once through the incoming transform ``phi`` composed after a residual ``u``, as
    ``phi.then_residual(u)`` maps points.

    Warping the moving image already resampled through ``phi`` interpolates twice; the second
    interpolation blurs the image wherever ``u`` is not a whole number of voxels, so the local NCC
    of a refinement is highest near ``u = 0`` and holds the result back by a fraction of a voxel (on
    a known chest deformation at 2 mm: median error 0.69 mm after 100 Adam steps from SAM-coarse,
    0.63 mm with this sampler after 60). SAM-VoxelMorph's precision step uses it; its
    half-resolution refinement does not: there it lowered the chest error only from 0.85 to 0.83 mm
    and cost Dice on two of the eight cross-patient pairs (tsC -> tsA 0.222 -> 0.210).

    Args:
        level: the problem's working images of the grid's spacing.
        transform: ``phi`` (fixed -> moving LPS mm).
        grid: the fixed working grid of the residuals.
        device: where the residuals are.
    """

    def __init__(self, level: WorkingLevel, transform: SpatialTransform, grid: Grid, device: torch.device) -> None:
        self.level = level
        self.transform = transform.to(device)
        self.centres = grid.world_points(device=device)                          # (D, H, W, 3) LPS mm

    def __call__(self, displacement: torch.Tensor) -> torch.Tensor:
        """``(N, 3, D, H, W)`` LPS mm residual -> ``(N, 1, D, H, W)`` moving registration channel."""
        warped = []
        for residual in displacement:
            moved = self.centres + torch.movedim(residual, 0, -1)
            values, _ = self.level.sample_moving(self.transform.map_points(moved, field_padding="border"))
            warped.append(values[None])
        return torch.stack(warped)


def pair_from_problem(problem: RegistrationProblem, transform: SpatialTransform, spacing: float,
                      sample_through_transform: bool = False) -> PairBatch:
    """The problem's images at working ``spacing`` mm, the moving one resampled through
    ``transform`` onto the fixed working grid (a batch of one, on the problem's device).

    HU channels are included when both images look like CT. With ``sample_through_transform`` the
    pair's residual warps sample the moving image through ``transform`` itself
    (:class:`MovingThroughTransform`) instead of re-interpolating the resampled one.
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
    if sample_through_transform:
        pair.moving_sampler = MovingThroughTransform(level, transform, grid, device)
    return pair

