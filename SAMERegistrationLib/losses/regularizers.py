"""Smoothness regularisers for dense displacement fields.

A displacement field ``disp`` has shape (N, 3, D, H, W), in millimetres.
Channel 0 is the displacement along x (the W axis, array dim 4), channel 1
along y (H, dim 3), channel 2 along z (D, dim 2): ITK index order (i, j, k).

``spacing`` is the voxel size in mm in the SAME (x, y, z) order:
``spacing[0]`` is the step along W (dim 4), ``spacing[1]`` along H (dim 3),
``spacing[2]`` along D (dim 2). Derivatives are in physical units (per mm).

Every function returns a 0-dim, differentiable loss (lower = smoother); each
derivative term is averaged over the batch, the 3 components and its own
valid region (the voxels where the finite difference is defined), and the
terms are summed. An optional ``weight`` (N or 1, 1, D, H, W) turns each average
into a weighted one (a difference at voxel ``v`` takes the weight of ``v``), e.g.
to regularise more inside the body than in the air around it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_DIMS = (4, 3, 2)  # array dim of x, y, z == dim that spacing[0], [1], [2] refers to


def _check(fn: str, disp: Tensor, spacing: Sequence[float], min_size: int) -> tuple[float, float, float]:
    """Validate ``disp`` and ``spacing``; return spacing as floats in (x, y, z) order."""
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise ValueError(f"{fn}(): 'disp' must have shape (N, 3, D, H, W), got {tuple(disp.shape)}")
    if min(disp.shape[2:]) < min_size:
        raise ValueError(
            f"{fn}(): 'disp' needs at least {min_size} voxels along D, H and W, got {tuple(disp.shape[2:])}"
        )
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ValueError(
            f"{fn}(): 'spacing' must be 3 positive voxel sizes (x, y, z) in mm, got {tuple(spacing)}"
        )
    return tuple(float(s) for s in spacing)


def _mean(term: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of ``term`` (N, 3, d, h, w), weighted by the matching corner of ``weight`` if given."""
    if weight is None:
        return term.mean()
    w = weight[..., :term.shape[2], :term.shape[3], :term.shape[4]].expand_as(term)
    return (term * w).sum() / w.sum().clamp_min(1e-12)


def _first_derivatives(fn: str, disp: Tensor, spacing: Sequence[float]) -> list[Tensor]:
    """Forward differences / spacing along x, y, z (each over its own valid region)."""
    spacing = _check(fn, disp, spacing, min_size=2)
    return [torch.diff(disp, dim=dim) / step for dim, step in zip(_DIMS, spacing)]


def diffusion(disp: Tensor, spacing: Sequence[float], weight: Tensor | None = None) -> Tensor:
    """Diffusion (squared-gradient) regulariser.

    ``mean((du/dx)**2) + mean((du/dy)**2) + mean((du/dz)**2)``, each mean over
    batch, the 3 components u and the voxels where the forward difference is
    defined, with e.g. ``du/dx = (u[..., i+1] - u[..., i]) / spacing[0]``.
    Example: u_x = a * x (mm), other components 0, gives a**2 / 3.

    Args:
        disp: Displacement field (N, 3, D, H, W) in mm; channels (x, y, z) =
            displacement along (W, H, D).
        spacing: Voxel size in mm as (x, y, z): spacing[0] along W (dim 4),
            spacing[1] along H (dim 3), spacing[2] along D (dim 2).
        weight: Optional voxel weights (N or 1, 1, D, H, W) of the averages.

    Returns:
        0-dim tensor in (mm/mm)**2 (dimensionless); 0 for a constant field.

    Raises:
        ValueError: if ``disp`` is not (N, 3, D, H, W) with D, H, W >= 2, or
            ``spacing`` is not 3 positive numbers.
    """
    return sum(_mean(d.square(), weight) for d in _first_derivatives("diffusion", disp, spacing))


def total_variation(disp: Tensor, spacing: Sequence[float], weight: Tensor | None = None) -> Tensor:
    """Anisotropic total variation (L1 of the gradient) regulariser.

    ``mean(|du/dx|) + mean(|du/dy|) + mean(|du/dz|)`` with the same forward
    differences and averaging as :func:`diffusion`.
    Example: u_x = a * x (mm), other components 0, gives |a| / 3.

    Args:
        disp: Displacement field (N, 3, D, H, W) in mm; channels (x, y, z) =
            displacement along (W, H, D).
        spacing: Voxel size in mm as (x, y, z): spacing[0] along W (dim 4),
            spacing[1] along H (dim 3), spacing[2] along D (dim 2).
        weight: Optional voxel weights (N or 1, 1, D, H, W) of the averages.

    Returns:
        0-dim tensor (dimensionless); 0 for a constant field.

    Raises:
        ValueError: if ``disp`` is not (N, 3, D, H, W) with D, H, W >= 2, or
            ``spacing`` is not 3 positive numbers.
    """
    return sum(_mean(d.abs(), weight) for d in _first_derivatives("total_variation", disp, spacing))


def bending_energy(disp: Tensor, spacing: Sequence[float], weight: Tensor | None = None) -> Tensor:
    """Bending energy (squared second derivatives) regulariser.

    ``mean(u_xx**2) + mean(u_yy**2) + mean(u_zz**2)
    + 2 * (mean(u_xy**2) + mean(u_xz**2) + mean(u_yz**2))``, each mean over
    batch, the 3 components and the term's valid region. Pure terms are
    central second differences on the interior,
    ``u_xx = (u[i+1] - 2 u[i] + u[i-1]) / spacing[0]**2``; mixed terms are
    compact (cell-centred) differences of forward differences,
    ``u_xy = (u[j+1, i+1] - u[j+1, i] - u[j, i+1] + u[j, i]) / (spacing[0] * spacing[1])``.
    Examples: 0 for any linear field; u_x = c * x**2 gives (2c)**2 / 3;
    u_x = c * x * y gives 2 * c**2 / 3.

    Args:
        disp: Displacement field (N, 3, D, H, W) in mm; channels (x, y, z) =
            displacement along (W, H, D).
        spacing: Voxel size in mm as (x, y, z): spacing[0] along W (dim 4),
            spacing[1] along H (dim 3), spacing[2] along D (dim 2).
        weight: Optional voxel weights (N or 1, 1, D, H, W) of the averages.

    Returns:
        0-dim tensor in mm**-2.

    Raises:
        ValueError: if ``disp`` is not (N, 3, D, H, W) with D, H, W >= 3, or
            ``spacing`` is not 3 positive numbers.
    """
    spacing = _check("bending_energy", disp, spacing, min_size=3)
    energy = 0
    for a in range(3):
        for b in range(a, 3):
            second = torch.diff(torch.diff(disp, dim=_DIMS[a]), dim=_DIMS[b]) / (spacing[a] * spacing[b])
            energy = energy + (1 if a == b else 2) * _mean(second.square(), weight)
    return energy
