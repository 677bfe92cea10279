"""Resampling whole images through a :class:`SpatialTransform` onto a target grid.

``warped(x) = moving(phi(x))`` for every voxel centre ``x`` of the target (fixed) grid. Work is done
in slabs along the D axis so memory stays bounded for large grids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

from ..image import Image
from .grid import Grid
from .sampling import Interpolation, chunk_ranges, nearest_at_points, sample_at_points
from .transform import SpatialTransform

LabelMethod = Literal["nearest", "onehot"]


def resample_image(image: Image, target: Grid, transform: SpatialTransform | None = None,
                   interpolation: Interpolation = "linear", fill: float = 0.0) -> Image:
    """Values of ``image`` at ``transform(x)`` for each voxel ``x`` of ``target``.

    Args:
        image: the (moving) image; its ``data`` may be on any device.
        target: output grid (usually the fixed grid or a working grid).
        transform: fixed -> moving mapping; None means identity (plain physical-space resampling).
        interpolation: "linear" or "nearest".
        fill: value for points outside ``image``.

    Returns:
        an :class:`Image` on ``target`` (float32, on ``image.data``'s device).
    """
    transform = transform or SpatialTransform.identity()
    device = image.data.device
    volume = image.data.float()
    out = torch.empty(target.shape, dtype=torch.float32, device=device)
    with torch.no_grad():
        for k0, k1, points in _mapped_slabs(target, transform, device):
            out[k0:k1] = sample_at_points(volume - fill, image.grid, points, interpolation) + fill
    return Image(out, target)


def _mapped_slabs(target: Grid, transform: SpatialTransform, device: torch.device
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(k0, k1, transform(x))`` for the slabs ``k0 <= k < k1`` of ``target``'s voxel centres ``x``
    (``(k1 - k0, H, W, 3)`` LPS mm), so that memory stays bounded on large grids."""
    for k0, k1 in chunk_ranges(target):
        yield k0, k1, transform.map_points(target.world_points(device=device, k_range=(k0, k1)))


def resample_labels(labels: Image, target: Grid, transform: SpatialTransform | None = None,
                    method: LabelMethod = "nearest") -> Image:
    """Warps an integer label map onto ``target``.

    ``method="nearest"`` takes the nearest voxel's label (the standard for evaluation), copied
    exactly whatever its value.
    ``method="onehot"`` interpolates each label's indicator trilinearly and keeps, per voxel, the
    label with the largest interpolated value (outside the label map counts as background), which
    gives smoother boundaries at the cost of one interpolation per label.

    Returns:
        an int64 :class:`Image` on ``target``; points outside ``labels`` get 0.
    """
    transform = transform or SpatialTransform.identity()
    if method == "nearest":
        device = labels.data.device
        values = labels.data.long()
        out = torch.empty(target.shape, dtype=torch.int64, device=device)
        with torch.no_grad():
            for k0, k1, points in _mapped_slabs(target, transform, device):
                out[k0:k1] = nearest_at_points(values, labels.grid, points)
        return Image(out, target)
    if method != "onehot":
        raise ValueError(f"resample_labels(): 'method' must be 'nearest' or 'onehot', got {method!r}")
    device = labels.data.device
    values = torch.unique(torch.cat([labels.data.reshape(-1), labels.data.new_zeros(1)]))
    best_label = torch.zeros(target.shape, dtype=torch.int64, device=device)
    with torch.no_grad():
        for k0, k1, points in _mapped_slabs(target, transform, device):
            best_score = torch.full(points.shape[:-1], -1.0, device=device)
            for value in values.tolist():
                indicator = (labels.data == value).float()
                score = sample_at_points(indicator, labels.grid, points, "linear")
                if value == 0:
                    # Outside the label map counts as background.
                    score = score + (1.0 - sample_at_points(torch.ones_like(indicator), labels.grid, points))
                better = score > best_score
                best_score = torch.where(better, score, best_score)
                best_label[k0:k1] = torch.where(better, torch.tensor(value, device=device), best_label[k0:k1])
    return Image(best_label, target)
