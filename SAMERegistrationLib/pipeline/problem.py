"""What a registration works on: the two images, optional masks, options, and cached working levels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from ..errors import InputError
from ..image import Image
from ..preprocess import body_mask, looks_like_ct, normalise_intensity, to_working_grid
from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points
from ..spatial.warp import resample_image


T = TypeVar("T")


@dataclass(frozen=True)
class RegistrationOptions:
    """Settings shared by the stages. Lengths are in mm.

    Attributes:
        spacing: finest working voxel size (isotropic) of the registration.
        affine_levels: working spacings of the affine stage, coarse to fine.
        affine_iterations: optimiser iterations per affine level.
        deformable_level_factors: deformable levels as multiples of ``spacing``, coarse to fine.
        deformable_iterations: optimiser iterations per deformable level.
        lncc_window_mm: local NCC window edge length (converted to an odd voxel count per level).
        smoothness_weight: weight of the diffusion regulariser of the deformable stage.
        threads: CPU threads for PyTorch (None: PyTorch's default).
    """

    spacing: float = 2.0
    affine_levels: tuple[float, ...] = (8.0, 4.0)
    affine_iterations: tuple[int, ...] = (150, 100)
    deformable_level_factors: tuple[int, ...] = (4, 2, 1)
    deformable_iterations: tuple[int, ...] = (100, 80, 40)
    lncc_window_mm: float = 18.0
    smoothness_weight: float = 1.0
    threads: int | None = None

    def lncc_window(self, spacing: float) -> int:
        """Odd voxel count of the local NCC window at working ``spacing``."""
        voxels = max(3, int(round(self.lncc_window_mm / spacing)))
        return voxels if voxels % 2 == 1 else voxels + 1


@dataclass(frozen=True)
class WorkingLevel:
    """Both images prepared on canonical isotropic grids of one spacing (see ``Grid.with_spacing``).

    Attributes:
        fixed: registration channel of the fixed image in [-1, 1] on its working grid.
        fixed_weight: ``(D, H, W)`` float weights of the similarity on the fixed working grid: the
            fixed mask (user's, or the body mask) times where the fixed image has data.
        moving: registration channel of the moving image in [-1, 1] on the moving working grid.
        moving_valid: ``(D, H, W)`` float, 1 where the moving image has data (and, with a moving
            mask, lies inside it).
    """

    fixed: Image
    fixed_weight: torch.Tensor
    moving: Image
    moving_valid: torch.Tensor

    def sample_moving(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Moving registration channel and validity at moving-space LPS points ``(..., 3)``.

        Returns ``(values, valid)``, both shaped like ``points[..., 0]``; ``values`` is
        differentiable in ``points``, ``valid`` is detached (so an optimiser cannot gain by moving
        the image out of the overlap).
        """
        values = sample_at_points(self.moving.data, self.moving.grid, points)
        valid = sample_at_points(self.moving_valid, self.moving.grid, points.detach(), "nearest")
        return values, valid


@dataclass
class RegistrationProblem:
    """The inputs of one registration (never modified) and per-spacing working images.

    Attributes:
        fixed, moving: intensity images (HU for CT) on their own grids, on the CPU.
        fixed_mask: optional binary mask on the fixed grid restricting the similarity.
        options: stage settings.
        device: where the stages compute.
        moving_mask: optional binary mask on the moving grid: moving voxels outside it count as
            having no data (``WorkingLevel.moving_valid`` is 0 there), so they take no part in the
            similarity of the intensity stages and of the learned stages' refinement.
    """

    fixed: Image
    moving: Image
    fixed_mask: Image | None = None
    options: RegistrationOptions = field(default_factory=RegistrationOptions)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    moving_mask: Image | None = None
    _levels: dict[float, WorkingLevel] = field(default_factory=dict, init=False, repr=False)
    _body: dict[str, Image] = field(default_factory=dict, init=False, repr=False)
    _memo: dict[str, object] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.fixed_is_ct = looks_like_ct(self.fixed)
        self.moving_is_ct = looks_like_ct(self.moving)

    def level(self, spacing: float) -> WorkingLevel:
        """The working images at ``spacing`` mm, built on first use and cached."""
        if spacing not in self._levels:
            self._levels[spacing] = self._build_level(spacing)
        return self._levels[spacing]

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per problem and ``key`` (e.g. the fixed image's SAM embeddings, shared
        by several stages)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def fixed_body_mask(self) -> Image:
        """Body mask of the fixed image on its finest working grid (uint8)."""
        return self._body_mask("fixed", self.fixed, self.fixed_is_ct)

    def moving_body_mask(self) -> Image:
        """Body mask of the moving image on its finest working grid (uint8)."""
        return self._body_mask("moving", self.moving, self.moving_is_ct)

    def _body_mask(self, key: str, image: Image, is_ct: bool) -> Image:
        if key not in self._body:
            working = to_working_grid(image, self.options.spacing, is_ct)
            self._body[key] = body_mask(working, is_ct)
        return self._body[key]

    def _build_level(self, spacing: float) -> WorkingLevel:
        fixed_grid = self.fixed.grid.with_spacing(spacing)
        fixed_hu = to_working_grid(self.fixed, spacing, self.fixed_is_ct)
        fixed_valid = _valid_region(self.fixed.grid, fixed_grid)
        if self.fixed_mask is not None:
            mask = resample_image(self.fixed_mask, fixed_grid, interpolation="nearest").data
        else:
            mask = resample_image(self.fixed_body_mask(), fixed_grid, interpolation="nearest").data
        moving_hu = to_working_grid(self.moving, spacing, self.moving_is_ct)
        moving_valid = _valid_region(self.moving.grid, moving_hu.grid)
        if self.moving_mask is not None:
            moving_valid = moving_valid * resample_image(self.moving_mask, moving_hu.grid, interpolation="nearest").data
        return WorkingLevel(
            fixed=normalise_intensity(fixed_hu, self.fixed_is_ct).to(self.device),
            fixed_weight=(mask * fixed_valid).to(self.device),
            moving=normalise_intensity(moving_hu, self.moving_is_ct).to(self.device),
            moving_valid=moving_valid.to(self.device),
        )


def _valid_region(source: Grid, target: Grid) -> torch.Tensor:
    """``(D, H, W)`` float on ``target``: 1 where ``source`` has voxels, 0 elsewhere."""
    ones = Image(torch.ones(source.shape), source)
    return resample_image(ones, target, interpolation="nearest").data


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda' -> torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is available to PyTorch here: use --device cpu or auto")
        return torch.device("cuda")
    raise InputError(f"--device {name}: unknown device: use auto, cpu or cuda")
