"""The SAM-VoxelMorph network and how its output becomes a displacement.

Input: the fixed and the (already affinely/coarsely aligned) moving registration channels
``(N, 1, D, H, W)`` on a canonical working grid of ``spacing_mm`` (2 mm), plus optionally the 27
SAM correlation channels ``(N, 27, ceil(D/2), ...)`` (:func:`..sam.features.sam_correlation`), which
are concatenated with the half-resolution stem features, as in SAME (there at 1/2 resolution too).
Output: a stationary velocity field ``(N, 3, ceil(D/2), ...)`` in LPS mm on the half grid
(:func:`..networks.unet.half_grid`), integrated by scaling and squaring there and resampled to the
working grid (a field in mm needs no rescaling when its resolution changes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..learning.pairs import PairBatch
from ..learning.weights import MODELS, build_checked, load_checked
from ..networks.unet import HalfResolutionStem, UNet3D, flow_head, half_grid
from ..sam.features import sam_correlation
from ..spatial.fields import integrate_batch, resample_batch
from ..spatial.grid import Grid

DEFAULT_WEIGHTS = MODELS / "sam_vm.pt"
CORRELATION_CHANNELS = 27


@dataclass(frozen=True)
class SAMVMConfig:
    """Architecture; stored in every checkpoint.

    Attributes:
        correlation: whether the network takes the SAM correlation channels.
        full_resolution_channels, stem_width: the stem's widths (full and half resolution).
        encoder, decoder: U-Net widths at 1/4, 1/8, 1/16 (and back) of the working resolution.
        integration_steps: scaling-and-squaring steps (0: the output is the displacement).
        spacing_mm: working spacing of the input (SAM's).
    """

    correlation: bool = True
    full_resolution_channels: int = 8
    stem_width: int = 16
    encoder: tuple[int, ...] = (32, 32, 32)
    decoder: tuple[int, ...] = (32, 32, 32)
    integration_steps: int = 7
    spacing_mm: float = 2.0

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> SAMVMConfig:
        return SAMVMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class SAMVoxelMorphNet(nn.Module):
    """Stem at full resolution -> [stem features, SAM correlation] -> U-Net -> velocity head."""

    def __init__(self, config: SAMVMConfig = SAMVMConfig()) -> None:
        super().__init__()
        self.config = config
        self.stem = HalfResolutionStem(2, config.stem_width, config.full_resolution_channels)
        extra = CORRELATION_CHANNELS if config.correlation else 0
        self.unet = UNet3D(config.stem_width + extra, config.encoder, config.decoder, out_channels=16)
        self.head = flow_head(16)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, correlation: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Velocity ``(N, 3, ceil(D/2), ...)`` in half-grid voxels (see :func:`predict` for mm)."""
        x = self.stem(torch.cat([fixed, moving], dim=1))
        if self.config.correlation:
            if correlation is None:
                raise ValueError("SAMVoxelMorphNet: this network needs the SAM correlation channels")
            x = torch.cat([x, correlation], dim=1)
        return self.head(self.unet(x))


@dataclass(frozen=True)
class Prediction:
    """A network's output for a pair.

    Attributes:
        velocity: ``(N, 3, d, h, w)`` LPS mm on ``velocity_grid`` (half of the pair's grid).
        velocity_grid: its grid.
        displacement: ``(N, 3, D, H, W)`` LPS mm on the pair's grid: ``moving(x + u(x))``.
    """

    velocity: torch.Tensor
    velocity_grid: Grid
    displacement: torch.Tensor


def predict(model: nn.Module, pair: PairBatch) -> Prediction:
    """Runs the network (a :class:`SAMVoxelMorphNet`, possibly wrapped in DistributedDataParallel)
    on a pair (with ``pair.features["sam"]`` when it uses correlation)."""
    config: SAMVMConfig = getattr(model, "module", model).config
    grid = half_grid(pair.grid)
    correlation = sam_correlation(pair.features["sam"]) if config.correlation else None
    velocity = model(pair.fixed, pair.moving, correlation) * grid.spacing[0]
    return Prediction(velocity, grid, velocity_to_displacement(velocity, grid, pair.grid, config.integration_steps))


def velocity_to_displacement(velocity: torch.Tensor, velocity_grid: Grid, grid: Grid, steps: int) -> torch.Tensor:
    """Integrates ``(N, 3, d, h, w)`` mm velocities on ``velocity_grid`` and resamples the
    displacement onto ``grid``."""
    return resample_batch(integrate_batch(velocity, velocity_grid, steps), velocity_grid, grid)


def load_sam_vm(path: Path | str | None = None) -> SAMVoxelMorphNet:
    """SAM-VoxelMorph weights (default: the shipped ones) after their SHA-256 check.

    Raises:
        InputError: missing file or checksum, mismatching checksum, or not SAM-VoxelMorph weights.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    checkpoint = load_checked(path, "SAM-VoxelMorph weights", "--vm-weights")
    return build_checked(checkpoint, lambda config: SAMVoxelMorphNet(SAMVMConfig.from_dict(config)),
                         "SAM-VoxelMorph weights", path)
