"""Box filters of volumes: means over centred windows, separable, by cumulative sums.

One home for the windowed averages of the package (local NCC statistics, MIND-SSC's context
pooling, the smoothing of optimised fields and of decision maps; MIND-SSC's own patch distances sum
a few slices of a pre-padded array at the output voxels only, ``descriptors.mind``). A window mean is computed one
axis at a time: small windows as a sum of shifted copies, larger ones by prepending a zero, taking
the cumulative sum along the axis and subtracting it from itself shifted by the window width
(three passes over the tensor per axis whatever the window size), where a convolution costs one
multiply-add per window voxel (PyTorch's depthwise ``conv3d``
and ``avg_pool3d`` on a CPU were 2-5x slower for the windows used here; README, "Where the time of
the learned modes goes"). Its gradient is the same window sum of the incoming gradient (the
zero-padded window sum is symmetric), computed by a custom autograd function.

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
    sums = _WindowSum.apply(x, dim, size)
    along_axis = [1] * x.dim()
    along_axis[dim] = -1
    centres = torch.arange(length, device=x.device).reshape(along_axis)
    if border == "replicate":
        # the windows' voxels beyond each end are copies of the edge voxel
        below = (radius - centres).clamp(min=0).to(x.dtype)
        above = (centres + radius - (length - 1)).clamp(min=0).to(x.dtype)
        means = (sums + below * x.narrow(dim, 0, 1) + above * x.narrow(dim, length - 1, 1)) / size
    else:
        counts = (centres + radius).clamp(max=length - 1) - (centres - radius).clamp(min=0) + 1
        means = sums / counts.to(x.dtype)
    if stride > 1:
        means = means.index_select(dim, torch.arange(0, length, stride, device=x.device))
    return means


_SHIFTED_SUM_MAX_WINDOW = 7
"""Windows up to this size are summed as shifted copies (``size`` passes over the tensor, no
temporaries); larger ones by a cumulative sum (a constant three passes). On this 2-core CPU the
shifted sums were 1.3-4x faster for windows 3-7 and as fast at 9 (README, "Where the time of the
learned modes goes")."""


def _window_sum(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Sum over the ``size`` voxels centred on each voxel along ``dim``, zero beyond the ends."""
    radius, length = size // 2, x.shape[dim]
    if size <= _SHIFTED_SUM_MAX_WINDOW:
        sums = x.clone()
        for shift in range(1, min(radius, length - 1) + 1):
            sums.narrow(dim, shift, length - shift).add_(x.narrow(dim, 0, length - shift))
            sums.narrow(dim, 0, length - shift).add_(x.narrow(dim, shift, length - shift))
        return sums
    shape = list(x.shape)
    shape[dim] = radius + 1
    before = x.new_zeros(shape)
    shape[dim] = radius
    # cumulative[k] = sum of the zero-padded axis' first k voxels; window i covers padded voxels i .. i + size - 1
    cumulative = torch.cat([before, x, x.new_zeros(shape)], dim=dim).cumsum(dim)
    return cumulative.narrow(dim, size, length) - cumulative.narrow(dim, 0, length)


class _WindowSum(torch.autograd.Function):
    """:func:`_window_sum` with its own backward: the zero-padded window sum is a symmetric linear
    map, so its gradient is the window sum of the incoming gradient (autograd's own backward of
    ``cumsum`` flips the tensor twice per axis, which cost as much as the forward pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        ctx.dim, ctx.size = dim, size
        return _window_sum(x, dim, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _WindowSum.apply(grad, ctx.dim, ctx.size), None, None
