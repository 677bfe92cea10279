"""Box filters of volumes: means over centred windows, separable, by cumulative sums.

One home for the windowed averages of the package (local NCC statistics, MIND-SSC patch
distances, the smoothing of optimised fields and of decision maps). A window mean is computed one
axis at a time: prepend a zero, take the cumulative sum along the axis, and subtract it from itself
shifted by the window width. That costs three passes over the tensor per axis whatever the window
size, where a convolution costs one multiply-add per window voxel (PyTorch's depthwise ``conv3d``
and ``avg_pool3d`` on a CPU were 2-5x slower for the windows used here; README, "Where the time of
the learned modes goes"). Autograd differentiates it through ``cumsum`` (a reversed cumulative sum).

Volumes are tensors whose last three dimensions are the (D, H, W) voxel axes, with any leading
(batch, channel) dimensions. Windows are counted in voxels.
"""

from __future__ import annotations

from typing import Literal

import torch

Border = Literal["truncate", "replicate"]
"""What a window that reaches past the volume averages: ``truncate`` only the voxels inside the
volume (the mean over fewer voxels), ``replicate`` the edge voxel repeated."""


def window_mean(volume: torch.Tensor, window: int | tuple[int, int, int], border: Border = "truncate",
                stride: int = 1) -> torch.Tensor:
    """Mean of ``volume`` over the odd ``window`` centred on every ``stride``-th voxel.

    Args:
        volume: ``(..., D, H, W)`` float tensor.
        window: odd window edge in voxels, one for all axes or a (D, H, W) tuple.
        border: see :data:`Border`.
        stride: keep the means centred on voxels ``0, stride, 2 * stride, ...`` of each axis.

    Returns:
        ``(..., ceil(D / stride), ceil(H / stride), ceil(W / stride))``, same dtype and device.

    Raises:
        ValueError: a window size is not a positive odd int, ``stride`` < 1, ``border`` unknown, or
            ``volume`` has fewer than three dimensions.
    """
    sizes = (window,) * 3 if isinstance(window, int) else tuple(window)
    if len(sizes) != 3 or not all(isinstance(k, int) and k > 0 and k % 2 == 1 for k in sizes):
        raise ValueError(f"window_mean(): 'window' must be a positive odd int or a (D, H, W) 3-tuple of them, "
                         f"got {window}")
    if stride < 1:
        raise ValueError(f"window_mean(): 'stride' must be >= 1, got {stride}")
    if border not in ("truncate", "replicate"):
        raise ValueError(f"window_mean(): 'border' must be 'truncate' or 'replicate', got {border!r}")
    if volume.dim() < 3:
        raise ValueError(f"window_mean(): expected a (..., D, H, W) volume, got shape {tuple(volume.shape)}")
    for axis, size in enumerate(sizes):
        volume = _axis_mean(volume, volume.dim() - 3 + axis, size, border, stride)
    return volume


def _axis_mean(x: torch.Tensor, dim: int, size: int, border: Border, stride: int) -> torch.Tensor:
    """The window mean along one axis ``dim`` (see :func:`window_mean`)."""
    radius, length = size // 2, x.shape[dim]
    if border == "replicate":
        before, after = x.narrow(dim, 0, 1), x.narrow(dim, length - 1, 1)
        repeat = [-1] * x.dim()
        repeat[dim] = radius
        pieces = [torch.zeros_like(before), before.expand(repeat), x, after.expand(repeat)]
    else:
        zero_shape = list(x.shape)
        zero_shape[dim] = radius + 1
        pieces = [x.new_zeros(zero_shape), x, x.new_zeros(zero_shape[:dim] + [radius] + zero_shape[dim + 1:])]
    # cumulative[k] = sum of the padded axis' first k voxels; window i covers padded voxels i .. i + size - 1
    cumulative = torch.cat(pieces, dim=dim).cumsum(dim)
    if stride == 1:
        sums = cumulative.narrow(dim, size, length) - cumulative.narrow(dim, 0, length)
        centres = torch.arange(length, device=x.device)
    else:
        centres = torch.arange(0, length, stride, device=x.device)
        sums = cumulative.index_select(dim, centres + size) - cumulative.index_select(dim, centres)
    if border == "replicate":
        return sums / size
    counts = (centres + radius).clamp(max=length - 1) - (centres - radius).clamp(min=0) + 1
    shape = [1] * x.dim()
    shape[dim] = -1
    return sums / counts.to(x.dtype).reshape(shape)
