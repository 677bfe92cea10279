"""The FCN of Li & Fan (ISBI 2018): displacements regressed at three resolutions.

Input: the fixed and the moving registration channels ``(N, 1, D, H, W)`` each (in [-1, 1]),
concatenated. Layers (widths from :class:`FCNConfig`; the paper's are 32/64/128/64 and 64/32, the
defaults here are halved for CPU)::

    conv c1 (full) -> pool -> conv c2 (1/2) -> pool -> conv c3, conv c4 (1/4) -> head: u_2 (1/4)
    deconv d1 (1/4 -> 1/2) ++ skip c2 -> conv d1 -> head: u_1 (1/2)
    deconv d2 (1/2 -> full) ++ skip c1 -> conv d2 -> head: u_0 (full)

Pools are 3x3x3 max pools with stride 2 and padding 1 and deconvolutions 3x3x3 transposed
convolutions with stride 2, so a level's voxel ``n`` sits on the finer level's voxel ``2 n`` (the
:func:`~SAMERegistrationLib.networks.unet.half_grid` convention) and sizes go ``n -> ceil(n / 2)``
and back exactly. Each head regresses its level's displacement in voxels of that level, returned in
LPS mm (times the level's spacing): ``u_l`` ``(N, 3, ceil(D / 2**l), ...)`` on the pair's grid
halved ``l`` times, channels ``(x, y, z)`` along ``(W, H, D)`` (canonical grids only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..learning.pairs import PairBatch
from ..learning.weights import MODELS, build_checked, load_checked, save_weights
from ..networks.unet import conv_block, flow_head, half_grid
from ..spatial.grid import Grid

DEFAULT_WEIGHTS = MODELS / "fcn_lifan.pt"
"""Weights shipped with the product (``.sha256`` beside them, model card ``fcn_lifan.md``)."""


@dataclass(frozen=True)
class FCNConfig:
    """Architecture; stored in every checkpoint.

    Attributes:
        encoder: widths ``(c1, c2, c3, c4)``: full resolution, 1/2, and the two 1/4 convolutions.
        decoder: widths ``(d1, d2)`` of the deconvolutions to 1/2 and to full resolution.
    """

    encoder: tuple[int, int, int, int] = (16, 32, 64, 32)
    decoder: tuple[int, int] = (32, 16)

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> FCNConfig:
        return FCNConfig(**{k: tuple(v) for k, v in values.items()})


class LiFanFCN(nn.Module):
    """See the module docstring."""

    def __init__(self, config: FCNConfig = FCNConfig()) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3, c4 = config.encoder
        d1, d2 = config.decoder
        self.pool = nn.MaxPool3d(3, stride=2, padding=1)
        self.full_conv = conv_block(2, c1)
        self.half_conv = conv_block(c1, c2)
        self.quarter_conv = nn.Sequential(conv_block(c2, c3), conv_block(c3, c4))
        self.up_half = nn.ConvTranspose3d(c4, d1, 3, stride=2, padding=1)
        self.fuse_half = conv_block(d1 + c2, d1)
        self.up_full = nn.ConvTranspose3d(d1, d2, 3, stride=2, padding=1)
        self.fuse_full = conv_block(d2 + c1, d2)
        self.heads = nn.ModuleList([flow_head(d2), flow_head(d1), flow_head(c4)])

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> list[torch.Tensor]:
        """Displacements in voxels of their level, finest first: ``[(N, 3, D, H, W),
        (N, 3, ceil(D/2), ...), (N, 3, ceil(D/4), ...)]`` (see :func:`fcn_displacements` for mm)."""
        full = self.full_conv(torch.cat([fixed, moving], dim=1))
        half = self.half_conv(self.pool(full))
        quarter = self.quarter_conv(self.pool(half))
        up = nn.functional.leaky_relu(self.up_half(quarter, output_size=half.shape[2:]), 0.2)
        fused_half = self.fuse_half(torch.cat([up, half], dim=1))
        up = nn.functional.leaky_relu(self.up_full(fused_half, output_size=full.shape[2:]), 0.2)
        fused_full = self.fuse_full(torch.cat([up, full], dim=1))
        return [head(x) for head, x in zip(self.heads, (fused_full, fused_half, quarter))]


def fcn_displacements(model: nn.Module, pair: PairBatch) -> list[tuple[torch.Tensor, Grid]]:
    """The network's three displacements on ``pair`` in LPS mm with their grids, finest first
    (the input of :func:`~SAMERegistrationLib.learning.multiresolution.multiresolution_loss`)."""
    grids = [pair.grid, half_grid(pair.grid)]
    grids.append(half_grid(grids[-1]))
    outputs = model(pair.fixed, pair.moving)
    return [(voxels * grid.spacing[0], grid) for voxels, grid in zip(outputs, grids)]


def save_fcn(path: Path, model: LiFanFCN, **extra) -> str:
    """Writes the weights and ``<path>.sha256`` (see :func:`save_weights`); returns the SHA-256."""
    return save_weights(path, model, model.config.as_dict(), **extra)


def load_fcn(path: Path | str | None = None) -> LiFanFCN:
    """The FCN (default: the shipped weights) after the SHA-256 check, in eval mode.

    Raises:
        InputError: the file or its ``.sha256`` is missing, the checksum differs, or the file is not
            an FCN checkpoint.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    checkpoint = load_checked(path, "FCN weights", "--weights")
    return build_checked(checkpoint, lambda config: LiFanFCN(FCNConfig.from_dict(config)), "FCN weights", path)
