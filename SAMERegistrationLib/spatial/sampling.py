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
