"""The LDDMM smoothness energy of velocity fields, computed in the Fourier domain.

``L = (-alpha * Laplacian + gamma) ** beta`` acts on each component of a velocity ``v`` (mm); the
energy is the mean of ``|L v|^2`` over the voxels (and the 3 components). Derivatives are in
physical units: ``alpha`` is in mm^2, ``gamma`` is dimensionless, so ``L v`` is in mm. In the
Fourier domain ``-Laplacian`` is multiplication by ``|omega|^2 = sum_d (2 pi f_d)^2`` (``f_d`` in
cycles per mm), so ``L`` is multiplication by ``(alpha |omega|^2 + gamma) ** beta`` (any real
``beta``; the spectral symbol is exact for band-limited fields, unlike a finite-difference stencil).

Boundary: each field is extended by mirroring about its outer voxel faces (even, DCT-II symmetry)
before the FFT, so a field that differs between opposite faces is not treated as having a jump
there (periodic extension would penalise that jump heavily); ``L v`` is read back on the original
voxels. A cosine ``cos(pi m (k + 1/2) / n)`` along an axis of ``n`` voxels is an exact
eigenfunction of this discretisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_DIMS = (4, 3, 2)  # array dim of x, y, z (spacing order)


def lddmm_operator(velocity: Tensor, spacing: Sequence[float], alpha: float = 0.01, gamma: float = 0.001,
                   beta: float = 2.0) -> Tensor:
    """``L v`` with ``L = (-alpha Laplacian + gamma)^beta`` applied to each component.

    Args:
        velocity: ``(N, C, D, H, W)`` field in mm (C = 3 for a velocity, channels x, y, z).
        spacing: voxel size in mm as (x, y, z): along (W, H, D).
        alpha: weight of the Laplacian, mm^2 (> 0).
        gamma: weight of the identity (> 0 keeps ``L`` invertible).
        beta: power of the operator (> 0; 2 in the TransMorph-TVF paper).

    Returns:
        ``(N, C, D, H, W)`` in mm.

    Raises:
        ValueError: a non-5-D field, a bad spacing, or non-positive ``alpha``, ``gamma``, ``beta``.
    """
    if velocity.dim() != 5:
        raise ValueError(f"lddmm_operator(): 'velocity' must be (N, C, D, H, W), got {tuple(velocity.shape)}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"lddmm_operator(): 'spacing' must be 3 positive sizes in mm, got {tuple(spacing)}")
    if min(alpha, gamma, beta) <= 0:
        raise ValueError(f"lddmm_operator(): alpha, gamma and beta must be positive, got {alpha}, {gamma}, {beta}")
    shape = velocity.shape[2:]
    mirrored = velocity
    for dim in _DIMS:
        mirrored = torch.cat([mirrored, mirrored.flip(dim)], dim=dim)
    spectrum = torch.fft.rfftn(mirrored, dim=(2, 3, 4))
    symbol = _symbol(mirrored.shape[2:], spacing, alpha, gamma, beta, velocity.device)
    filtered = torch.fft.irfftn(spectrum * symbol.to(spectrum.real.dtype), s=mirrored.shape[2:], dim=(2, 3, 4))
    return filtered[:, :, :shape[0], :shape[1], :shape[2]]


def lddmm_energy(velocity: Tensor, spacing: Sequence[float], weight: Tensor | None = None, alpha: float = 0.01,
                 gamma: float = 0.001, beta: float = 2.0) -> Tensor:
    """``mean |L v|^2`` (mm^2) over the batch, the components and the voxels.

    Args:
        velocity: ``(N, 3, D, H, W)`` in mm; a batch of ``T`` time steps of ``M`` samples is passed
            time-major (``N = T * M``), which makes the result the mean over t of ``||L v_t||^2``.
        spacing: voxel size in mm as (x, y, z).
        weight: optional voxel weights ``(M, 1, D, H, W)`` (or ``(1, ...)``) with ``M`` dividing
            ``N``; they are tiled over the time steps of a time-major batch.
        alpha, gamma, beta: the operator (see :func:`lddmm_operator`).

    Returns:
        0-dim tensor in mm^2.
    """
    squared = lddmm_operator(velocity, spacing, alpha, gamma, beta).square()
    if weight is None:
        return squared.mean()
    if velocity.shape[0] % weight.shape[0]:
        raise ValueError(f"lddmm_energy(): 'weight' batch {weight.shape[0]} does not divide the field batch "
                         f"{velocity.shape[0]}")
    tiled = weight.repeat(velocity.shape[0] // weight.shape[0], 1, 1, 1, 1).expand_as(squared)
    return (squared * tiled).sum() / tiled.sum().clamp_min(1e-12)


def _symbol(shape: Sequence[int], spacing: Sequence[float], alpha: float, gamma: float, beta: float,
            device: torch.device) -> Tensor:
    """``(alpha |omega|^2 + gamma)^beta`` on the ``rfftn`` frequency grid of ``shape`` (D, H, W)."""
    step_z, step_y, step_x = (float(spacing[2]), float(spacing[1]), float(spacing[0]))
    fz = torch.fft.fftfreq(shape[0], d=step_z, dtype=torch.float64, device=device)
    fy = torch.fft.fftfreq(shape[1], d=step_y, dtype=torch.float64, device=device)
    fx = torch.fft.rfftfreq(shape[2], d=step_x, dtype=torch.float64, device=device)
    omega2 = (2 * math.pi) ** 2 * (fz[:, None, None] ** 2 + fy[None, :, None] ** 2 + fx[None, None, :] ** 2)
    return (alpha * omega2 + gamma) ** beta
