"""The TVF network: ``T`` time-dependent velocity fields, each step seeing the moving image warped by
the transform integrated so far (TransMorph-TVF).

Input: the fixed and the (affinely pre-aligned) moving registration channels ``(N, 1, D, H, W)``
on a canonical working grid. A backbone (U-Net by default, or a Swin transformer) computes
features once at half resolution (:func:`..networks.unet.half_grid`). Then for ``t = 0 .. T-1`` a
velocity head of its own reads those features with the fixed image and the moving image warped by
``phi_t``, and emits ``v_t`` (LPS mm on the half grid); the flow is advanced by
``phi_{t+1} = phi_t + v_t o phi_t`` (:func:`..spatial.integrate.flow_step`). The integrated
displacement is resampled onto the working grid; in mm it needs no rescaling (the published code's
missing factor 2 cannot occur).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..learning.pairs import PairBatch
from ..learning.weights import MODELS, build_checked, load_checked
from ..networks.unet import HalfResolutionStem, UNet3D, flow_head, half_grid
from ..spatial.fields import resample_batch, warp_batch
from ..spatial.grid import Grid
from ..spatial.integrate import flow_step, integrate_velocities
from .swin import SwinBackbone

DEFAULT_WEIGHTS = {"tvf": MODELS / "tvf.pt", "tvf-lddmm": MODELS / "tvf_lddmm.pt"}
"""The shipped weights of each TVF mode."""
BACKBONES = ("unet", "swin")


@dataclass(frozen=True)
class TVFConfig:
    """Architecture; stored in every checkpoint.

    Attributes:
        steps: number of time-dependent velocity fields ``T``.
        backbone: "unet" or "swin".
        full_resolution_channels, stem_width: the stem's widths (full and half resolution).
        encoder, decoder: U-Net widths at 1/4, 1/8, 1/16 (and back) of the working resolution.
        swin_dims, swin_heads, window: Swin token widths and heads at 1/4 and 1/8, window edge.
        features: width of the backbone output.
        spacing_mm: working spacing the network was trained at.
    """

    steps: int = 8
    backbone: str = "unet"
    full_resolution_channels: int = 8
    stem_width: int = 16
    encoder: tuple[int, ...] = (16, 32, 32)
    decoder: tuple[int, ...] = (32, 32, 16)
    swin_dims: tuple[int, ...] = (32, 64)
    swin_heads: tuple[int, ...] = (2, 4)
    window: int = 4
    features: int = 16
    spacing_mm: float = 2.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TVFConfig: 'steps' must be >= 1, got {self.steps}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"TVFConfig: 'backbone' must be one of {BACKBONES}, got {self.backbone!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> TVFConfig:
        return TVFConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class VelocityHead(nn.Module):
    """One time step: [backbone features, fixed, warped moving] -> velocity (half-grid voxels).

    Kept thin (``T`` of them run per pair): a 3x3x3 convolution of the two images and a 1x1x1
    projection of the features to ``hidden`` channels each, summed, LeakyReLU, then the flow head.
    """

    def __init__(self, features: int, hidden: int = 8) -> None:
        super().__init__()
        self.images = nn.Conv3d(2, hidden, 3, padding=1)
        self.features = nn.Conv3d(features, hidden, 1)
        self.out = flow_head(hidden)

    def forward(self, features: torch.Tensor, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        mixed = self.images(torch.cat([fixed, warped], dim=1)) + self.features(features)
        return self.out(F.leaky_relu(mixed, 0.2))


class TVFNet(nn.Module):
    """Backbone once, then ``config.steps`` velocity heads run one after another."""

    def __init__(self, config: TVFConfig = TVFConfig()) -> None:
        super().__init__()
        self.config = config
        self.stem = HalfResolutionStem(2, config.stem_width, config.full_resolution_channels)
        if config.backbone == "unet":
            self.backbone = UNet3D(config.stem_width, config.encoder, config.decoder, config.features)
        else:
            self.backbone = SwinBackbone(config.stem_width, config.swin_dims, config.swin_heads, config.window,
                                         config.features)
        self.heads = nn.ModuleList(VelocityHead(config.features) for _ in range(config.steps))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> list[torch.Tensor]:
        """The velocities ``v_0 .. v_{T-1}``, each ``(N, 3, ceil(D/2), ...)`` LPS mm on
        ``half_grid(grid)``.

        Args:
            fixed, moving: ``(N, 1, D, H, W)`` registration channels on ``grid``.
            grid: the working grid (canonical: identity direction).
        """
        half = half_grid(grid)
        features = self.backbone(self.stem(torch.cat([fixed, moving], dim=1)))
        fixed_half, moving_half = downsample(fixed), downsample(moving)
        displacement = fixed_half.new_zeros((fixed.shape[0], 3, *half.shape))
        velocities = []
        for head in self.heads:
            warped = warp_batch(moving_half, half, displacement)
            velocity = head(features, fixed_half, warped) * half.spacing[0]
            velocities.append(velocity)
            displacement = flow_step(displacement, velocity, half)
        return velocities


def downsample(image: torch.Tensor) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> ``(N, C, ceil(D/2), ...)`` on :func:`half_grid`: a 3x3x3 mean centred
    on every even voxel (so half-grid voxel ``i`` sits on working voxel ``2 i``)."""
    return F.avg_pool3d(image, 3, stride=2, padding=1, count_include_pad=False)


@dataclass(frozen=True)
class TVFPrediction:
    """Time-dependent velocities and the displacement they integrate to.

    Attributes:
        velocities: ``T`` tensors ``(N, 3, d, h, w)``, LPS mm on ``velocity_grid``.
        velocity_grid: half of the pair's grid.
        final: ``(N, 3, d, h, w)`` integrated displacement ``u_T`` (LPS mm) on ``velocity_grid``.
        displacement: ``u_T`` resampled onto the pair's grid ``(N, 3, D, H, W)``: ``moving(x + u(x))``.
    """

    velocities: list[torch.Tensor]
    velocity_grid: Grid
    final: torch.Tensor
    displacement: torch.Tensor


def predict(model: nn.Module, pair: PairBatch) -> TVFPrediction:
    """Runs the network (a :class:`TVFNet`, possibly wrapped in DistributedDataParallel) on a pair."""
    velocities = model(pair.fixed, pair.moving, pair.grid)
    return prediction_of(velocities, half_grid(pair.grid), pair.grid)


def prediction_of(velocities: list[torch.Tensor], velocity_grid: Grid, grid: Grid) -> TVFPrediction:
    """Integrates ``velocities`` on ``velocity_grid`` and resamples the displacement onto ``grid``."""
    final = integrate_velocities(velocities, velocity_grid)
    return TVFPrediction(velocities, velocity_grid, final, resample_batch(final, velocity_grid, grid))


def load_tvf(path: Path | str) -> TVFNet:
    """TVF weights after their SHA-256 check.

    Raises:
        InputError: missing file or checksum, mismatching checksum, or not TVF weights.
    """
    checkpoint = load_checked(path, "TVF weights", "--tvf-weights")
    return build_checked(checkpoint, lambda config: TVFNet(TVFConfig.from_dict(config)), "TVF weights", path)
