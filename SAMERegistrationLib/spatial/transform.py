"""The registration result type: an affine after a dense displacement field.

A :class:`SpatialTransform` maps *fixed* LPS points to *moving* LPS points (the resampling
direction used by ITK, Slicer's "FromParent" and every file this library writes):

    phi(x) = A @ (x + w(x))

``A`` is a 4x4 LPS affine and ``w`` a displacement field ``(3, D, H, W)`` of LPS mm vectors on
``field_grid``. Like ITK's DisplacementFieldTransform, the field is zero beyond half a voxel outside
its grid, so a written transform file maps every point exactly as :meth:`map_points` does.

An :class:`InverseTransform` is the moving -> fixed inverse of an invertible result (TVF modes):
``psi(y) = z + w_inv(z)`` with ``z = A^-1 y``, an affine first and then a field on the fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .grid import Grid
from .sampling import Padding, chunk_ranges, sample_at_points


def apply_affine(matrix: np.ndarray | torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Applies a 4x4 homogeneous matrix to points ``(..., 3)`` (differentiable in both)."""
    matrix = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True)
class SpatialTransform:
    """``phi(x) = affine @ (x + field(x))``, fixed LPS mm -> moving LPS mm.

    Attributes:
        affine: 4x4 float64 numpy matrix (LPS, fixed -> moving).
        field: ``(3, D, H, W)`` float32 LPS mm displacement on ``field_grid``, or None.
        field_grid: the grid of ``field``, or None.
    """

    affine: np.ndarray
    field: torch.Tensor | None = None
    field_grid: Grid | None = None

    def __post_init__(self) -> None:
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError(f"SpatialTransform: 'affine' must be 4x4, got {np.asarray(self.affine).shape}")
        if (self.field is None) != (self.field_grid is None):
            raise ValueError("SpatialTransform: 'field' and 'field_grid' must be given together")
        if self.field is not None and tuple(self.field.shape) != (3, *self.field_grid.shape):
            raise ValueError(f"SpatialTransform: field shape {tuple(self.field.shape)} does not match "
                             f"(3, *{self.field_grid.shape})")

    @staticmethod
    def identity() -> SpatialTransform:
        return SpatialTransform(np.eye(4))

    @staticmethod
    def from_affine(matrix: np.ndarray) -> SpatialTransform:
        return SpatialTransform(np.asarray(matrix, dtype=float).copy())

    @property
    def has_field(self) -> bool:
        return self.field is not None

    def inverse(self) -> SpatialTransform:
        """The moving -> fixed transform of an affine-only result (exact matrix inverse).

        Raises:
            ValueError: the transform has a displacement field (dense fields are inverted by the
                modes that produce invertible transforms, e.g. TVF, as an :class:`InverseTransform`).
        """
        if self.field is not None:
            raise ValueError("SpatialTransform.inverse(): only affine-only transforms have an exact inverse here")
        return SpatialTransform(np.linalg.inv(self.affine))

    def with_affine(self, matrix: np.ndarray) -> SpatialTransform:
        """The same field with another affine."""
        return SpatialTransform(np.asarray(matrix, dtype=float).copy(), self.field, self.field_grid)

    def to(self, device: torch.device | str) -> SpatialTransform:
        field = None if self.field is None else self.field.to(device)
        return SpatialTransform(self.affine, field, self.field_grid)

    def map_points(self, points: torch.Tensor, field_padding: Padding = "zeros") -> torch.Tensor:
        """phi(points): fixed LPS mm ``(..., 3)`` -> moving LPS mm ``(..., 3)`` (differentiable in
        ``points``).

        Args:
            field_padding: the field beyond half a voxel outside its grid: "zeros" (as a written
                transform file maps points) or "border" (its edge value, as :meth:`then_residual`
                composes: ``then_residual(u).map_points(x)`` equals
                ``map_points(x + u(x), "border")`` at the voxel centres ``x`` of ``u``'s grid).
        """
        if self.field is not None:
            field = self.field.to(points.device, points.dtype)
            displacement = sample_at_points(field, self.field_grid, points, padding=field_padding)
            points = points + torch.movedim(displacement, 0, -1)
        return apply_affine(self.affine, points)

    def then_residual(self, residual: torch.Tensor, grid: Grid) -> SpatialTransform:
        """Composes a residual field ``u`` applied first: ``phi_new(x) = phi(x + u(x))``.

        Points that ``u`` moves just beyond the previous field's grid (e.g. through the faces of a
        thin slab) take the previous field's edge value rather than zero, so the composed field
        stays continuous there (a jump to zero would fold the result at the faces).

        Args:
            residual: ``(3, D, H, W)`` LPS mm displacement on ``grid`` (fixed space).
            grid: the grid of ``residual``; it becomes the new field grid.
        """
        residual = residual.detach().float()
        if self.field is None:
            return SpatialTransform(self.affine, residual.clone(), grid)
        moved = grid.world_points(device=residual.device) + torch.movedim(residual, 0, -1)
        previous = sample_at_points(self.field.to(residual.device), self.field_grid, moved, padding="border")
        return SpatialTransform(self.affine, residual + previous, grid)

    def displacement_on(self, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
        """``phi(x) - x`` for every voxel centre of ``grid``: ``(3, D, H, W)`` float32 LPS mm."""
        return mapping_displacement(self.map_points, grid, device)


@dataclass(frozen=True)
class InverseTransform:
    """``psi(y) = z + field(z)`` with ``z = affine @ y``: an affine first, then a displacement field.

    The moving -> fixed inverse of a :class:`SpatialTransform` ``phi(x) = A (x + u(x))`` whose
    field ``u`` is invertible: ``affine = A^-1`` and ``field`` is the displacement of
    ``(Id + u)^-1`` on the forward field's (fixed-space) grid. Like a :class:`SpatialTransform`,
    the field is zero beyond half a voxel outside its grid.

    Attributes:
        affine: 4x4 float64 numpy matrix (LPS, moving -> fixed-space).
        field: ``(3, D, H, W)`` float32 LPS mm displacement on ``field_grid``.
        field_grid: the grid of ``field``.
    """

    affine: np.ndarray
    field: torch.Tensor
    field_grid: Grid

    def __post_init__(self) -> None:
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError(f"InverseTransform: 'affine' must be 4x4, got {np.asarray(self.affine).shape}")
        if tuple(self.field.shape) != (3, *self.field_grid.shape):
            raise ValueError(f"InverseTransform: field shape {tuple(self.field.shape)} does not match "
                             f"(3, *{self.field_grid.shape})")

    def to(self, device: torch.device | str) -> InverseTransform:
        return InverseTransform(self.affine, self.field.to(device), self.field_grid)

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """psi(points): moving LPS mm ``(..., 3)`` -> fixed LPS mm ``(..., 3)``."""
        points = apply_affine(self.affine, points)
        displacement = sample_at_points(self.field.to(points.device, points.dtype), self.field_grid, points)
        return points + torch.movedim(displacement, 0, -1)

    def displacement_on(self, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
        """``psi(y) - y`` for every voxel centre of ``grid``: ``(3, D, H, W)`` float32 LPS mm."""
        return mapping_displacement(self.map_points, grid, device)


def mapping_displacement(map_points, grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """``f(x) - x`` for every voxel centre ``x`` of ``grid`` (no gradient, in slabs of
    :func:`chunk_ranges`), for a point map ``f`` ``(..., 3) -> (..., 3)`` in LPS mm.

    Returns:
        ``(3, D, H, W)`` float32 LPS mm.
    """
    out = torch.empty((3, *grid.shape), dtype=torch.float32, device=device)
    with torch.no_grad():
        for k0, k1 in chunk_ranges(grid):
            points = grid.world_points(device=device, k_range=(k0, k1))
            out[:, k0:k1] = torch.movedim(map_points(points) - points, -1, 0)
    return out
