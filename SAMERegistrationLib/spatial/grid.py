"""The one home of SAMERegistration's coordinate conventions.

Frames
------
* **World (physical) frame**: LPS millimetres, as in ITK/DICOM. x grows to the patient's Left,
  y to Posterior, z to Superior. Every point, displacement and affine in this library is LPS
  unless a name says ``ras``. Slicer shows RAS; the only LPS<->RAS conversion is
  :data:`LPS_TO_RAS` below.
* **Index frame**: continuous voxel index ``(i, j, k)`` in ITK order, i.e. ``i`` runs along the
  fastest array axis. ``world = origin + direction @ diag(spacing) @ (i, j, k)``.
* **Array order**: tensors and numpy arrays are indexed ``[k, j, i]`` = ``(D, H, W)``, exactly like
  ``SimpleITK.GetArrayFromImage`` and PyTorch's ``(N, C, D, H, W)``. ``Grid.shape`` is in array
  order; ``spacing``, ``origin`` and ``direction`` are in ITK (i, j, k) / (x, y, z) order.
* **Sampling frame**: ``torch.nn.functional.grid_sample`` coordinates, ``(i, j, k)`` order in the
  last dimension, normalised to [-1, 1] with ``align_corners=True``. Only
  :meth:`Grid.index_to_sampling` produces them, and only ``spatial/sampling.py`` uses them.

Displacement fields are tensors ``(3, D, H, W)`` holding LPS millimetre vectors (x, y, z).

This module imports torch only inside the methods that return tensors, so Slicer's own process
(:mod:`SAMERegistrationLib.mrml`) uses the geometry without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
"""Multiplies an LPS point or vector into RAS (and back: the matrix is its own inverse)."""

_GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Grid:
    """An immutable voxel grid in physical space.

    Attributes:
        shape: ``(D, H, W)`` voxel counts in array order (k, j, i).
        spacing: ``(sx, sy, sz)`` voxel size in mm along the index axes (i, j, k).
        origin: LPS position in mm of the centre of voxel index (0, 0, 0).
        direction: 3x3 matrix; column ``c`` is the LPS unit vector of index axis ``c``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"Grid: 'shape' must be three positive voxel counts, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"Grid: 'spacing' must be three positive sizes in mm, got {self.spacing}")
        direction = np.asarray(self.direction, dtype=float)
        error = float(np.abs(direction.T @ direction - np.eye(3)).max()) if direction.shape == (3, 3) else np.inf
        if error > 1e-4:
            raise ValueError(f"Grid: 'direction' must be an orthonormal 3x3 matrix, got {self.direction}")

    @staticmethod
    def create(shape, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> Grid:
        """Builds a grid from any sequences; ``direction`` is a 3x3 matrix or 9 row-major numbers."""
        matrix = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
        return Grid(
            shape=tuple(int(n) for n in shape),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in origin),
            direction=tuple(tuple(float(v) for v in row) for row in matrix),
        )

    # ----------------------------------------------------------------------------- matrices
    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 float64 direction matrix (columns = LPS directions of i, j, k)."""
        return np.asarray(self.direction, dtype=float)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Voxel counts in ITK (i, j, k) order, i.e. ``SimpleITK.Image.GetSize()``."""
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def num_voxels(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    def index_to_world(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def world_to_index(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping LPS mm to continuous (i, j, k, 1)."""
        return np.linalg.inv(self.index_to_world())

    def index_to_world_ras(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS mm: Slicer's IJKToRAS matrix."""
        lps_to_ras = np.eye(4)
        lps_to_ras[:3, :3] = LPS_TO_RAS
        return lps_to_ras @ self.index_to_world()

    @staticmethod
    def from_index_to_world_lps(shape, index_to_world: np.ndarray) -> Grid:
        """The grid of array ``shape`` whose 4x4 (i, j, k, 1) -> LPS matrix is ``index_to_world``.

        The matrix's columns must be orthogonal (a rigid motion of a voxel grid, possibly scaled).
        """
        matrix = np.asarray(index_to_world, dtype=float)
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        return Grid.create(shape, spacing, matrix[:3, 3], matrix[:3, :3] / spacing)

    @staticmethod
    def from_index_to_world_ras(shape, ijk_to_ras: np.ndarray) -> Grid:
        """Inverse of :meth:`index_to_world_ras`: the grid of a Slicer volume of array ``shape``."""
        lps_to_ras = np.eye(4)
        lps_to_ras[:3, :3] = LPS_TO_RAS
        return Grid.from_index_to_world_lps(shape, lps_to_ras @ np.asarray(ijk_to_ras, dtype=float))

    # ----------------------------------------------------------------------------- points
    def world_points(self, dtype: torch.dtype | None = None, device=None, k_range: tuple[int, int] | None = None
                     ) -> torch.Tensor:
        """LPS mm coordinates of voxel centres, shape ``(D, H, W, 3)`` (or ``(k1-k0, H, W, 3)``),
        ``dtype`` default float32.

        ``k_range=(k0, k1)`` restricts to array slices ``k0 <= k < k1`` (for chunked processing).
        """
        import torch

        k0, k1 = k_range if k_range is not None else (0, self.shape[0])
        k = torch.arange(k0, k1, dtype=torch.float64, device=device)
        j = torch.arange(self.shape[1], dtype=torch.float64, device=device)
        i = torch.arange(self.shape[2], dtype=torch.float64, device=device)
        kk, jj, ii = torch.meshgrid(k, j, i, indexing="ij")
        ijk = torch.stack((ii, jj, kk), dim=-1)
        matrix = torch.as_tensor(self.index_to_world(), dtype=torch.float64, device=device)
        points = ijk @ matrix[:3, :3].T + matrix[:3, 3]
        return points.to(dtype or torch.float32)

    def world_to_index_points(self, points: torch.Tensor) -> torch.Tensor:
        """Maps LPS mm points ``(..., 3)`` to continuous voxel indices ``(..., 3)`` in (i, j, k) order."""
        import torch

        matrix = torch.as_tensor(self.world_to_index(), dtype=points.dtype, device=points.device)
        return points @ matrix[:3, :3].T + matrix[:3, 3]

    def index_to_sampling(self, index: torch.Tensor) -> torch.Tensor:
        """Maps continuous (i, j, k) indices ``(..., 3)`` to ``grid_sample`` coordinates.

        The result keeps (i, j, k) order (grid_sample's x, y, z), normalised so that voxel centre 0
        is -1 and voxel centre ``n-1`` is +1 (``align_corners=True``). Axes with one voxel map to 0.
        """
        import torch

        size = torch.tensor(self.size_ijk, dtype=index.dtype, device=index.device)
        scale = torch.where(size > 1, 2.0 / (size - 1).clamp(min=1), torch.zeros_like(size))
        return index * scale - (size > 1).to(index.dtype)

    # ----------------------------------------------------------------------------- relations
    def corners_world(self) -> np.ndarray:
        """LPS mm positions of the 8 corner voxel centres, shape (8, 3)."""
        size = np.array(self.size_ijk) - 1
        corners = np.array([[a, b, c] for a in (0, size[0]) for b in (0, size[1]) for c in (0, size[2])])
        matrix = self.index_to_world()
        return corners @ matrix[:3, :3].T + matrix[:3, 3]

    def centre_world(self) -> np.ndarray:
        """LPS mm position of the grid's centre."""
        return self.corners_world().mean(axis=0)

    def same_as(self, other: Grid, tolerance_mm: float = _GEOMETRY_TOLERANCE_MM) -> bool:
        """True when both grids have the same shape and their voxel centres coincide."""
        if self.shape != other.shape:
            return False
        return bool(np.abs(self.corners_world() - other.corners_world()).max() <= tolerance_mm)

    def same_voxels_as(self, other: Grid, tolerance_mm: float = _GEOMETRY_TOLERANCE_MM) -> bool:
        """True when ``other`` holds exactly this grid's voxel centres, perhaps with axes flipped or
        permuted (so nearest-neighbour resampling between them is exact).

        ``other``'s index steps must map to signed unit steps of this grid's index and its corner
        voxels onto integer voxel indices of this grid, with matching voxel counts per axis.
        """
        other_to_mine = self.world_to_index() @ other.index_to_world()
        steps = other_to_mine[:3, :3]
        permutation = np.round(steps)
        index_tolerance = tolerance_mm / min(self.spacing)
        if np.abs(steps - permutation).max() > index_tolerance:
            return False
        if not np.array_equal(np.abs(permutation) @ np.ones(3), np.ones(3)) or abs(abs(np.linalg.det(permutation)) - 1) > 0.5:
            return False
        counts_mapped = np.abs(permutation) @ np.array(other.size_ijk)
        if not np.array_equal(counts_mapped, np.array(self.size_ijk)):
            return False
        corners = other.corners_world()
        index = corners @ self.world_to_index()[:3, :3].T + self.world_to_index()[:3, 3]
        inside = (index > -index_tolerance).all() and (index < np.array(self.size_ijk) - 1 + index_tolerance).all()
        return bool(inside and np.abs(index - np.round(index)).max() <= index_tolerance)

    def with_spacing(self, spacing: float) -> Grid:
        """An LPS-axis-aligned isotropic grid of voxel size ``spacing`` mm covering this grid.

        This is the *working grid* of the registration: identity direction (so array axes W, H, D
        run along L, P, S), centred on this grid's bounding box, large enough to contain every
        voxel centre of this grid.
        """
        corners = self.corners_world()
        low, high = corners.min(axis=0), corners.max(axis=0)
        counts = np.maximum(1, np.ceil((high - low) / spacing - 1e-6).astype(int) + 1)
        centre = (low + high) / 2.0
        origin = centre - (counts - 1) * spacing / 2.0
        return Grid.create(counts[::-1], (spacing,) * 3, origin, np.eye(3))

    def describe(self) -> str:
        """One-line human description (size in ITK order, spacing, origin)."""
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        origin = ", ".join(f"{o:.1f}" for o in self.origin)
        return f"{'x'.join(map(str, self.size_ijk))} voxels, spacing ({spacing}) mm, origin ({origin}) mm LPS"
