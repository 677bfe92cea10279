"""Image similarity losses for registration.

All functions take images of shape (N, C, D, H, W) (float32 or float64, any
device) and return a 0-dim, differentiable LOSS to minimise: lower is better.

The optional ``mask`` holds non-negative voxel weights (0/1 or soft) and must
be broadcastable to (N, 1, D, H, W); it is shared by all channels. Masked
reductions are weighted means ``sum(w * x) / sum(w)`` (denominator clamped to
a small epsilon, so an all-zero mask gives 0 rather than NaN); without a mask
plain means are used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..filters import window_mean

_EPS = 1e-8


def _check_pair(fn: str, fixed: Tensor, warped: Tensor, names: tuple[str, str] = ("fixed", "warped")) -> None:
    """Raise ValueError unless both images are 5-D with identical shapes."""
    for name, image in zip(names, (fixed, warped)):
        if image.dim() != 5:
            raise ValueError(
                f"{fn}(): '{name}' must be 5-D (N, C, D, H, W), got shape {tuple(image.shape)}"
            )
    if fixed.shape != warped.shape:
        raise ValueError(
            f"{fn}(): '{names[0]}' and '{names[1]}' must have the same shape, "
            f"got {tuple(fixed.shape)} and {tuple(warped.shape)}"
        )


def _check_mask(fn: str, mask: Tensor | None, ref: Tensor) -> Tensor | None:
    """Check ``mask`` fits ``ref`` (N, C, D, H, W); return it as (N, 1, D, H, W) in ref's dtype and device."""
    if mask is None:
        return None
    target = (ref.shape[0], 1, *ref.shape[2:])
    try:
        ok = torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}(): 'mask' must be broadcastable to (N, 1, D, H, W) = {target}, "
            f"got shape {tuple(mask.shape)}"
        )
    return mask.to(device=ref.device, dtype=ref.dtype).expand(target)


def _weighted_mean(x: Tensor, weights: Tensor | None, dim: tuple[int, ...] | None = None) -> Tensor:
    """Plain mean of ``x`` over ``dim`` (all dims if None), or weighted mean when ``weights`` is given."""
    dim = tuple(range(x.dim())) if dim is None else dim
    if weights is None:
        return x.mean(dim)
    weights = weights.expand_as(x)
    return (weights * x).sum(dim) / weights.sum(dim).clamp_min(_EPS)


def ssd(fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared intensity difference.

    Args:
        fixed: Fixed image, (N, C, D, H, W).
        warped: Warped moving image, same shape as ``fixed``.
        mask: Optional voxel weights broadcastable to (N, 1, D, H, W).

    Returns:
        0-dim tensor: (weighted) mean over all voxels, channels and batch items of
        ``(fixed - warped)**2``, in squared intensity units. 0 for identical images.

    Raises:
        ValueError: if the images are not 5-D with equal shapes, or ``mask`` does
            not broadcast to (N, 1, D, H, W).
    """
    _check_pair("ssd", fixed, warped)
    weights = _check_mask("ssd", mask, fixed)
    return _weighted_mean((fixed - warped).square(), weights)


def ncc(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Global normalised cross-correlation loss.

    For each batch item and channel, with (weighted) means over the voxels,
    ``NCC = cov(f, w) / sqrt(var(f) * var(w) + eps**2)`` (population
    variances): ``eps`` acts as a floor on ``std(f) * std(w)``, so it is
    negligible when ``std(f) * std(w) >> eps`` (e.g. images in [0, 1]).

    Args:
        fixed: Fixed image, (N, C, D, H, W).
        warped: Warped moving image, same shape as ``fixed``.
        mask: Optional voxel weights broadcastable to (N, 1, D, H, W); they weight
            the means, variances and covariance.
        eps: Stabiliser, in covariance units (intensity**2).

    Returns:
        0-dim tensor ``1 - mean(NCC)`` (mean over batch items and channels), in
        [0, 2]: 0 for images related by a positive affine intensity map, 2 for a
        negative one.

    Raises:
        ValueError: if the images are not 5-D with equal shapes, or ``mask`` does
            not broadcast to (N, 1, D, H, W).
    """
    _check_pair("ncc", fixed, warped)
    weights = _check_mask("ncc", mask, fixed)
    spatial = (2, 3, 4)
    f = fixed - _weighted_mean(fixed, weights, spatial)[..., None, None, None]
    w = warped - _weighted_mean(warped, weights, spatial)[..., None, None, None]
    cov = _weighted_mean(f * w, weights, spatial)
    var_f = _weighted_mean(f.square(), weights, spatial)
    var_w = _weighted_mean(w.square(), weights, spatial)
    return 1 - (cov / torch.sqrt(var_f * var_w + eps**2)).mean()


def local_ncc(
    fixed: Tensor,
    warped: Tensor,
    window: int | tuple[int, int, int] = 9,
    mask: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Local (windowed) normalised cross-correlation loss, VoxelMorph style.

    Around every voxel, local means, population variances and covariance of the
    two images are taken over the window voxels that lie INSIDE the volume
    (windows are truncated at the border, so any window size works, including
    windows larger than the volume). They are computed with separable box
    filters (:func:`..filters.window_mean`, cumulative sums). Per voxel and
    channel, ``cc = cov**2 / (var_f * var_w + eps)`` (squared local correlation,
    in [0, 1)).

    Args:
        fixed: Fixed image, (N, C, D, H, W).
        warped: Warped moving image, same shape as ``fixed``.
        window: Odd window size in voxels: an int, or a (D, H, W) tuple.
        mask: Optional voxel weights broadcastable to (N, 1, D, H, W); they weight
            only the final average of ``cc`` (local statistics use all voxels).
        eps: Stabiliser added to ``var_f * var_w`` (intensity**4 units).

    Returns:
        0-dim tensor ``1 - (weighted) mean of cc`` over voxels, channels and batch
        items: ~0 for images related by any local affine intensity map
        (including inversion), up to 1 for uncorrelated images.

    Raises:
        ValueError: if the images are not 5-D with equal shapes, ``window`` is not
            a positive odd int or a 3-tuple of them, or ``mask`` does not
            broadcast to (N, 1, D, H, W).
    """
    _check_pair("local_ncc", fixed, warped)
    sizes = (window,) * 3 if isinstance(window, int) else tuple(window)
    if len(sizes) != 3 or not all(isinstance(k, int) and k > 0 for k in sizes):
        raise ValueError(
            f"local_ncc(): 'window' must be a positive odd int or a (D, H, W) 3-tuple, got {window}"
        )
    if any(k % 2 == 0 for k in sizes):
        raise ValueError(f"local_ncc(): 'window' must be odd, got {window}")
    weights = _check_mask("local_ncc", mask, fixed)
    return 1 - _weighted_mean(local_correlation_map(fixed, warped, sizes, eps), weights)


def local_correlation_map(fixed: Tensor, warped: Tensor, window: tuple[int, int, int], eps: float = 1e-5) -> Tensor:
    """Squared local correlation ``cc`` in [0, 1) at every voxel, (N, C, D, H, W): the quantity whose
    weighted mean :func:`local_ncc` turns into a loss (same truncated windows, same ``eps``).

    Args:
        fixed, warped: (N, C, D, H, W) images of equal shape.
        window: odd (D, H, W) window sizes in voxels (checked by :func:`local_ncc`).
    """
    channels = fixed.shape[1]
    # Local statistics are shift invariant: centring each image first limits
    # cancellation in E[x^2] - E[x]^2 for intensities with a large offset.
    f = fixed - fixed.detach().mean((2, 3, 4), keepdim=True)
    w = warped - warped.detach().mean((2, 3, 4), keepdim=True)
    sums = window_mean(torch.cat([f, w, f * f, w * w, f * w], dim=1), window)
    mean_f, mean_w, mean_ff, mean_ww, mean_fw = sums.split(channels, dim=1)
    var_f = (mean_ff - mean_f.square()).clamp_min(0)
    var_w = (mean_ww - mean_w.square()).clamp_min(0)
    cov = mean_fw - mean_f * mean_w
    return cov.square() / (var_f * var_w + eps)


def mutual_information(
    fixed: Tensor,
    warped: Tensor,
    mask: Tensor | None = None,
    bins: int = 32,
    sigma: float | None = None,
    value_range: tuple[float, float] | None = None,
    max_samples: int = 100_000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Negative mutual information with Gaussian Parzen windows (differentiable).

    Per batch item and channel: intensities are mapped to [0, 1], with
    ``(x - lo) / (hi - lo)`` using ``value_range = (lo, hi)`` for both images if
    given (values outside are clamped, so they get no gradient), else each
    image's own min/max (detached). Bin centres are ``linspace(0, 1, bins)``
    (bin width ``1 / (bins - 1)``). Each voxel's bin weights are
    ``exp(-(x - centre)**2 / (2 sigma**2))`` normalised to sum to 1 over the
    bins. The joint histogram is the (mask-weighted) sum of the outer products
    of the fixed and warped bin weights, computed as a (bins x V) @ (V x bins)
    matrix product and normalised to sum to 1; the marginals are its row/column
    sums. ``MI = sum p(a,b) log(p(a,b) / (p(a) p(b)))`` in nats.

    Args:
        fixed: Fixed image, (N, C, D, H, W).
        warped: Warped moving image, same shape as ``fixed``.
        mask: Optional voxel weights broadcastable to (N, 1, D, H, W); they weight
            each voxel's contribution to the joint histogram (min/max for the
            intensity mapping still use all voxels).
        bins: Number of bins (>= 2).
        sigma: Parzen window standard deviation in normalised [0, 1] intensity
            units; default ``0.5 / (bins - 1)`` (half a bin width).
        value_range: Optional (lo, hi) intensity range, hi > lo, in image units.
        max_samples: If D*H*W exceeds it, the histogram uses ``max_samples``
            voxels drawn uniformly WITH replacement (the same voxels for every
            batch item and channel); otherwise all voxels are used.
        generator: Optional ``torch.Generator`` for the voxel subsample (on the
            CPU or on the images' device), for reproducibility.

    Returns:
        0-dim tensor ``-MI`` (nats), averaged over batch items and channels.
        Identical images give ``-H(fixed)`` (the binned entropy), independent
        images ~0.

    Raises:
        ValueError: if the images are not 5-D with equal shapes, ``mask`` does not
            broadcast to (N, 1, D, H, W), ``bins < 2``, ``sigma <= 0``,
            ``value_range`` is not (lo, hi) with hi > lo, or ``max_samples < 1``.
    """
    _check_pair("mutual_information", fixed, warped)
    weights = _check_mask("mutual_information", mask, fixed)
    if bins < 2:
        raise ValueError(f"mutual_information(): 'bins' must be >= 2, got {bins}")
    sigma = 0.5 / (bins - 1) if sigma is None else sigma
    if sigma <= 0:
        raise ValueError(f"mutual_information(): 'sigma' must be > 0, got {sigma}")
    if value_range is not None and (len(value_range) != 2 or not value_range[1] > value_range[0]):
        raise ValueError(
            f"mutual_information(): 'value_range' must be (lo, hi) with hi > lo, got {value_range}"
        )
    if max_samples < 1:
        raise ValueError(f"mutual_information(): 'max_samples' must be >= 1, got {max_samples}")

    f, w = fixed.flatten(2), warped.flatten(2)  # (N, C, V)
    if value_range is None:
        ranges = [(x.detach().amin(-1, keepdim=True), x.detach().amax(-1, keepdim=True)) for x in (f, w)]
    else:
        ranges = [tuple(f.new_tensor(float(v)) for v in value_range)] * 2
    if weights is not None:
        weights = weights.flatten(2)  # (N, 1, V)
    num_voxels = f.shape[-1]
    if num_voxels > max_samples:
        index_device = generator.device if generator is not None else f.device
        index = torch.randint(num_voxels, (max_samples,), generator=generator, device=index_device)
        index = index.to(f.device)
        f, w = f[..., index], w[..., index]
        weights = None if weights is None else weights[..., index]

    centres = torch.linspace(0, 1, bins, device=f.device, dtype=f.dtype)

    def parzen(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        unit = ((x - lo) / (hi - lo).clamp_min(_EPS)).clamp(0, 1)
        logits = -(unit[..., None] - centres).square() / (2 * sigma**2)
        return torch.softmax(logits, dim=-1)  # normalised Gaussian bin weights, (N, C, S, bins)

    p_f, p_w = parzen(f, *ranges[0]), parzen(w, *ranges[1])
    if weights is not None:
        p_f = p_f * weights[..., None]
    joint = p_f.transpose(-1, -2) @ p_w  # (N, C, bins, bins)
    joint = joint / joint.sum((-2, -1), keepdim=True).clamp_min(_EPS)

    def neg_entropy(p: Tensor, dim: tuple[int, ...]) -> Tensor:
        return (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim)

    mi = neg_entropy(joint, (-2, -1)) - neg_entropy(joint.sum(-1), (-1,)) - neg_entropy(joint.sum(-2), (-1,))
    return -mi.mean()


def soft_dice(
    fixed_probs: Tensor,
    warped_probs: Tensor,
    mask: Tensor | None = None,
    exclude_background: bool = True,
    eps: float = 1e-5,
) -> Tensor:
    """Soft Dice loss between label maps (one-hot or per-label probabilities).

    Per batch item n and label l, with sums over (weighted) voxels:
    ``Dice = 2 sum(a * b) / (sum(a) + sum(b))``. A (n, l) pair with
    ``sum(a) + sum(b) <= eps`` (label absent from both) is left out of the mean.

    Args:
        fixed_probs: Fixed label map, (N, L, D, H, W), channel l = label l.
        warped_probs: Warped moving label map, same shape.
        mask: Optional voxel weights broadcastable to (N, 1, D, H, W).
        exclude_background: Skip label channel 0.
        eps: Presence threshold on ``sum(a) + sum(b)`` (in voxels).

    Returns:
        0-dim tensor ``1 - mean Dice`` over present (n, l) pairs, in [0, 1];
        0 when no label is present at all.

    Raises:
        ValueError: if the maps are not 5-D with equal shapes, ``mask`` does not
            broadcast to (N, 1, D, H, W), or no label channel is left after
            excluding the background.
    """
    _check_pair("soft_dice", fixed_probs, warped_probs, ("fixed_probs", "warped_probs"))
    weights = _check_mask("soft_dice", mask, fixed_probs)
    first = 1 if exclude_background else 0
    if fixed_probs.shape[1] <= first:
        raise ValueError(
            f"soft_dice(): 'fixed_probs' needs at least {first + 1} label channel(s) "
            f"with exclude_background={exclude_background}, got {fixed_probs.shape[1]}"
        )
    a, b = fixed_probs[:, first:], warped_probs[:, first:]
    voxel_weights = 1 if weights is None else weights
    spatial = (2, 3, 4)
    intersection = (voxel_weights * a * b).sum(spatial)
    total = (voxel_weights * (a + b)).sum(spatial)
    present = total > eps
    dice = 2 * intersection / total.clamp_min(eps)
    return ((1 - dice) * present).sum() / present.sum().clamp_min(1)
