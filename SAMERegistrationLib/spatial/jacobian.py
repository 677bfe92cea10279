"""Jacobian determinant of a displacement field in physical units, and its summary numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .grid import Grid
from .sampling import chunk_ranges


def jacobian_determinant(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """det(d phi / d x) for ``phi(x) = x + u(x)``, with derivatives in physical (mm/mm) units.

    Honours the grid's direction and anisotropic spacing (unlike
    ``sitk.DisplacementFieldJacobianDeterminant``, which ignores the direction). Derivatives are
    central differences, one-sided at the grid border.

    Args:
        displacement: ``(3, D, H, W)`` LPS mm vectors on ``grid``.
        grid: the grid of ``displacement``.

    Returns:
        ``(D, H, W)`` float32 determinants (1 = volume kept, <1 shrink, <=0 folding).
    """
    if tuple(displacement.shape) != (3, *grid.shape):
        raise ValueError(f"jacobian_determinant(): displacement shape {tuple(displacement.shape)} "
                         f"does not match (3, *{grid.shape})")
    index_to_world = torch.as_tensor(grid.index_to_world()[:3, :3], dtype=torch.float64)
    world_from_index_inv = torch.linalg.inv(index_to_world).to(displacement.device)
    out = torch.empty(grid.shape, dtype=torch.float32, device=displacement.device)
    depth = grid.shape[0]
    for k0, k1 in chunk_ranges(grid):
        lo, hi = max(k0 - 1, 0), min(k1 + 1, depth)
        slab = displacement[:, lo:hi].double()
        # derivative[c, a] = d u_c / d index_a, index order a = (i, j, k) = array dims (2, 1, 0)
        derivative = torch.empty((*slab.shape[1:], 3, 3), dtype=torch.float64, device=slab.device)
        for a, dim in enumerate((3, 2, 1)):
            if slab.shape[dim] > 1:
                derivative[..., :, a] = torch.movedim(torch.gradient(slab, dim=dim)[0], 0, -1)
            else:
                derivative[..., :, a] = 0.0
        gradient = derivative @ world_from_index_inv + torch.eye(3, dtype=torch.float64, device=slab.device)
        out[k0:k1] = torch.linalg.det(gradient)[k0 - lo:k0 - lo + (k1 - k0)].float()
    return out


@dataclass(frozen=True)
class JacobianStatistics:
    """Summary of a Jacobian-determinant map over a region.

    ``std_log_jacobian`` is the plain standard deviation of log(J) over voxels with J > 0 (not the
    Learn2Reg variant log(J + 3), which is about four times smaller).
    """

    percent_nonpositive: float
    std_jacobian: float
    std_log_jacobian: float
    min_jacobian: float
    max_jacobian: float
    voxels: int

    def as_dict(self) -> dict:
        return asdict(self)


def jacobian_statistics(jacobian: torch.Tensor, mask: torch.Tensor | None = None) -> JacobianStatistics:
    """Percentage of J <= 0, std(J), std(log J) (J > 0 only), min and max inside ``mask``."""
    values = jacobian[mask.bool()] if mask is not None else jacobian.reshape(-1)
    if values.numel() == 0:
        raise ValueError("jacobian_statistics(): the region is empty")
    values = values.double()
    positive = values[values > 0]
    return JacobianStatistics(
        percent_nonpositive=float((values <= 0).double().mean() * 100.0),
        std_jacobian=float(values.std(unbiased=False)),
        std_log_jacobian=float(positive.log().std(unbiased=False)) if positive.numel() > 1 else float("nan"),
        min_jacobian=float(values.min()),
        max_jacobian=float(values.max()),
        voxels=int(values.numel()),
    )
