"""The LDDMM smoothness energy of velocity fields, computed in the Fourier domain.

``L = (-alpha * Laplacian + gamma) ** beta`` acts on each component of a velocity ``v`` (mm); the
energy is the mean of ``|L v|^2`` over the voxels (and the 3 components). Derivatives are in
physical units: ``alpha`` is in mm^2, ``gamma`` is dimensionless, so ``L v`` is in mm. In the
Fourier domain ``-Laplacian`` is multiplication by ``|omega|^2 = sum_d (2 pi f_d)^2`` (``f_d`` in
cycles per mm), so ``L`` is multiplication by ``(alpha |omega|^2 + gamma) ** beta`` (any real
``beta``; the spectral symbol is exact for band-limited fields, unlike a finite-difference stencil).

Boundary: the field is treated as mirrored about its outer voxel faces (even symmetry), so a field
that differs between opposite faces is not treated as having a jump there (a periodic FFT would
penalise that jump heavily). The mirrored field's Fourier basis is the DCT-II basis: a cosine
``cos(pi m (k + 1/2) / n)`` along an axis of ``n`` voxels is an exact eigenfunction, with
``|omega| = pi m / (n h)``. ``L`` is therefore applied as ``C^T diag(symbol) C`` with the orthonormal
DCT-II matrices ``C`` of the three axes (three small matrix products each way, on the field's own
size instead of an FFT of the 8x larger mirror-extended field), and, by Parseval, the unweighted energy
is the mean of ``(symbol * C v)^2`` without transforming back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor



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
    return _dct(_filtered_coefficients(velocity, spacing, alpha, gamma, beta), inverse=True)


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
    if weight is None:  # Parseval: the orthonormal DCT keeps sums of squares
        return _filtered_coefficients(velocity, spacing, alpha, gamma, beta).square().mean()
    squared = lddmm_operator(velocity, spacing, alpha, gamma, beta).square()
    if velocity.shape[0] % weight.shape[0]:
        raise ValueError(f"lddmm_energy(): 'weight' batch {weight.shape[0]} does not divide the field batch "
                         f"{velocity.shape[0]}")
    tiled = weight.repeat(velocity.shape[0] // weight.shape[0], 1, 1, 1, 1).expand_as(squared)
    return (squared * tiled).sum() / tiled.sum().clamp_min(1e-12)


def _filtered_coefficients(velocity: Tensor, spacing: Sequence[float], alpha: float, gamma: float,
                           beta: float) -> Tensor:
    """The DCT-II coefficients of ``L v``: ``symbol * C v`` (``(N, C, D, H, W)``), after checking the inputs."""
    _check(velocity, spacing, alpha, gamma, beta)
    symbol = _symbol(velocity.shape[2:], spacing, alpha, gamma, beta, velocity.device).to(velocity.dtype)
    return symbol * _dct(velocity)


def _check(velocity: Tensor, spacing: Sequence[float], alpha: float, gamma: float, beta: float) -> None:
    if velocity.dim() != 5:
        raise ValueError(f"lddmm: 'velocity' must be (N, C, D, H, W), got {tuple(velocity.shape)}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"lddmm: 'spacing' must be 3 positive sizes in mm, got {tuple(spacing)}")
    if min(alpha, gamma, beta) <= 0:
        raise ValueError(f"lddmm: alpha, gamma and beta must be positive, got {alpha}, {gamma}, {beta}")


def _symbol(shape: Sequence[int], spacing: Sequence[float], alpha: float, gamma: float, beta: float,
            device: torch.device) -> Tensor:
    """``(alpha |omega|^2 + gamma)^beta`` for the DCT-II frequencies of ``shape`` (D, H, W):
    ``|omega|^2 = sum_d (pi m_d / (n_d h_d))^2`` (float64)."""
    squared = [(math.pi * torch.arange(n, dtype=torch.float64, device=device) / (n * float(h))) ** 2
               for n, h in zip(shape, (spacing[2], spacing[1], spacing[0]))]
    omega2 = squared[0][:, None, None] + squared[1][None, :, None] + squared[2][None, None, :]
    return (alpha * omega2 + gamma) ** beta


def _dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The orthonormal DCT-II matrix ``(n, n)``: row ``m`` samples ``cos(pi m (k + 1/2) / n)``."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    matrix = torch.cos(math.pi * k[:, None] * (k[None, :] + 0.5) / n) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype)


def _dct(field: Tensor, inverse: bool = False) -> Tensor:
    """Orthonormal 3-D DCT-II of ``(N, C, D, H, W)`` over its last three axes (``inverse``: DCT-III,
    its inverse, i.e. the transposed matrices)."""
    depth, height, width = field.shape[2:]
    cz, cy, cx = (_dct_matrix(n, field.dtype, field.device) for n in (depth, height, width))
    if inverse:
        cz, cy, cx = cz.T, cy.T, cx.T
    return torch.einsum("ncdhw,zd,yh,xw->nczyx", field, cz, cy, cx)
