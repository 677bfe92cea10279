"""Reading image values at physical points: the single place that calls ``grid_sample``.

All functions take points in LPS millimetres and convert them with
:meth:`Grid.world_to_index_points` and :meth:`Grid.index_to_sampling`; nothing else in the library handles grid_sample's axis order.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .grid import Grid

Interpolation = Literal["linear", "nearest"]
Padding = Literal["zeros", "border"]

_MAX_POINTS_PER_CHUNK = 4_000_000


def sample_at_points(volume: torch.Tensor, grid: Grid, points: torch.Tensor,
                     interpolation: Interpolation = "linear", padding: Padding = "zeros") -> torch.Tensor:
    """Samples ``volume`` at LPS points (differentiable in both ``volume`` and ``points``).

    Like ITK, a voxel fills the box of half a voxel around its centre: points between the outermost
    voxel centres and the image edge take the edge value.

    Args:
        volume: ``(C, D, H, W)`` or ``(D, H, W)`` values on ``grid``.
        grid: the voxel grid of ``volume``.
        points: ``(..., 3)`` LPS mm positions.
        interpolation: "linear" (trilinear) or "nearest".
        padding: value beyond the image edge: "zeros" or "border" (nearest edge value).

    Returns:
        ``(C, ...)`` values (or ``(...)`` when ``volume`` had no channel axis).
    """
    squeeze = volume.dim() == 3
    channels = volume[None] if squeeze else volume
    if tuple(channels.shape[1:]) != grid.shape:
        raise ValueError(f"sample_at_points(): volume shape {tuple(channels.shape[1:])} does not match grid {grid.shape}")
    index = grid.world_to_index_points(points.to(channels.dtype))
    last = torch.tensor(grid.size_ijk, dtype=index.dtype, device=index.device) - 1
    clamped = torch.minimum(torch.maximum(index, torch.zeros_like(last)), last)
    coords = grid.index_to_sampling(clamped).reshape(1, -1, 1, 1, 3)
    mode = "bilinear" if interpolation == "linear" else "nearest"
    values = F.grid_sample(channels[None], coords, mode=mode, padding_mode="border", align_corners=True)
    values = values.reshape(channels.shape[0], *points.shape[:-1])
    if padding == "zeros":
        inside = ((index >= -0.5) & (index <= last + 0.5)).all(dim=-1)
        values = values * inside.to(values.dtype)
    return values[0] if squeeze else values


class DisplacedVoxelSampler:
    """Samples fields of one grid at its own voxel centres moved by a displacement, ``f(x + u(x))``:
    the operation behind warping by a field and composing fields (scaling and squaring, flow steps).

    The same values and gradients as ``sample_at_points(field, grid, grid.world_points() + u,
    padding="border")`` (``grid_sample``'s border padding clamps exactly as that function's index
    clamp does), in about half the time for a 3-channel field: the voxel centres are kept in
    ``grid_sample``'s coordinates and a displacement in LPS mm is mapped to them by one
    multiplication per component (for directions that permute no axes) or a 3x3 product, instead of
    moving world points through the world-to-index matrix, clamping and normalising at every call.

    Args:
        grid: the grid of the fields and of the displacement.
        dtype, device: of the displacements that will be passed.
    """

    def __init__(self, grid: Grid, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.grid = grid
        kk, jj, ii = torch.meshgrid(*(torch.arange(n, dtype=torch.float64, device=device) for n in grid.shape),
                                    indexing="ij")
        ijk = torch.stack((ii, jj, kk), dim=-1)                                  # (D, H, W, 3)
        self.centres = grid.index_to_sampling(ijk).to(dtype)                     # (D, H, W, 3) grid_sample x, y, z
        unit = grid.index_to_sampling(torch.eye(3, dtype=torch.float64)) - grid.index_to_sampling(
            torch.zeros(3, dtype=torch.float64))                                 # sampling units per index step
        mm_to_sampling = torch.as_tensor(grid.world_to_index()[:3, :3]).T * unit.diagonal()   # (3 LPS, 3 x y z)
        diagonal = bool((mm_to_sampling - torch.diag(mm_to_sampling.diagonal())).abs().max() == 0)
        self.scale = mm_to_sampling.diagonal().to(dtype=dtype, device=device) if diagonal else None
        self.matrix = mm_to_sampling.to(dtype=dtype, device=device)

    def __call__(self, field: torch.Tensor, displacement: torch.Tensor, interpolation: Interpolation = "linear"
                 ) -> torch.Tensor:
        """``field(x + displacement(x))`` at every voxel ``x``.

        Args:
            field: ``(C, D, H, W)`` on the grid.
            displacement: ``(3, D, H, W)`` LPS mm on the grid.

        Returns:
            ``(C, D, H, W)``.
        """
        shift = torch.movedim(displacement, 0, -1)
        coords = self.centres + (shift * self.scale if self.scale is not None else shift @ self.matrix)
        mode = "bilinear" if interpolation == "linear" else "nearest"
        return F.grid_sample(field[None], coords[None].to(field.dtype), mode=mode, padding_mode="border",
                             align_corners=True)[0]


def nearest_at_points(volume: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """The value of the nearest voxel of ``volume`` at LPS points, copied exactly (any dtype, e.g.
    int64 labels beyond float32's 2^24), 0 farther than half a voxel outside the image.

    Args:
        volume: ``(D, H, W)`` values on ``grid``.
        grid: the voxel grid of ``volume``.
        points: ``(..., 3)`` LPS mm positions.

    Returns:
        ``(...)`` values of ``volume``'s dtype.
    """
    if tuple(volume.shape) != grid.shape:
        raise ValueError(f"nearest_at_points(): volume shape {tuple(volume.shape)} does not match grid {grid.shape}")
    index = grid.world_to_index_points(points.to(torch.float32))
    last = torch.tensor(grid.size_ijk, dtype=index.dtype, device=index.device) - 1
    inside = ((index >= -0.5) & (index <= last + 0.5)).all(dim=-1)
    nearest = torch.minimum(torch.maximum(torch.round(index), torch.zeros_like(last)), last).long()
    values = volume[nearest[..., 2], nearest[..., 1], nearest[..., 0]]
    return torch.where(inside, values, torch.zeros((), dtype=volume.dtype, device=volume.device))


def chunk_ranges(grid: Grid, max_points: int = _MAX_POINTS_PER_CHUNK) -> list[tuple[int, int]]:
    """Splits the D axis of ``grid`` into ``[k0, k1)`` slabs of at most ``max_points`` voxels."""
    slab = max(1, max_points // (grid.shape[1] * grid.shape[2]))
    return [(k0, min(k0 + slab, grid.shape[0])) for k0 in range(0, grid.shape[0], slab)]
