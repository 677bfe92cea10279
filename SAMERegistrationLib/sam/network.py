"""The SAM network: a small 3-D CNN giving every voxel a local and a global embedding.

Input: one CT channel on a canonical working grid (``Grid.with_spacing``: isotropic
``SAMConfig.spacing_mm``, identity LPS direction, so array axes W, H, D run along L, P, S), with HU
clipped to ``SAMConfig.hu_window`` and scaled to [-1, 1] (:func:`sam_intensity`). The embeddings
are not orientation invariant: always feed that canonical orientation.

Outputs for an input ``(N, 1, D, H, W)``:
* local ``(N, local_dim, ceil(D/2), ceil(H/2), ceil(W/2))`` — stride 2, fine anatomical detail;
* global ``(N, global_dim, ceil(D/8), ceil(H/8), ceil(W/8))`` — stride 8, coarse semantic context.
Both are L2-normalised along the channel axis. Output voxel ``n`` of a stride-``s`` map is centred
on input voxel ``s * n`` (every downsampling is a stride-2 convolution with kernel 3, padding 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SAMConfig:
    """Architecture and input conventions; stored in every checkpoint.

    Attributes:
        widths: channels at strides 2, 4 and 8.
        blocks: residual blocks at strides 2, 4 and 8.
        fpn_width: channels of the feature pyramid that builds the local embedding.
        local_dim, global_dim: embedding sizes.
        spacing_mm: isotropic input voxel size.
        hu_window: HU range mapped to [-1, 1].
    """

    widths: tuple[int, int, int] = (16, 32, 64)
    blocks: tuple[int, int, int] = (1, 2, 2)
    fpn_width: int = 32
    local_dim: int = 32
    global_dim: int = 32
    spacing_mm: float = 2.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> SAMConfig:
        return SAMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def sam_intensity(hu: torch.Tensor, config: SAMConfig) -> torch.Tensor:
    """HU -> network input in [-1, 1] (clipped window)."""
    low, high = config.hu_window
    return ((hu.float() - low) / (high - low) * 2.0 - 1.0).clamp(-1.0, 1.0)


class ChannelNorm(nn.Module):
    """Layer normalisation over channels at each voxel: the same for a crop and a whole scan."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias)
        return x.movedim(-1, 1)


def _conv_norm(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation),
                         ChannelNorm(out_channels))


class ResidualBlock(nn.Module):
    """x + norm(conv(gelu(norm(conv(x))))), then GELU."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.first = _conv_norm(channels, channels, dilation=dilation)
        self.second = _conv_norm(channels, channels, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.second(F.gelu(self.first(x))))


class SAMNet(nn.Module):
    """Encoder with three stride-2 stages, an FPN local head and a dilated global head."""

    def __init__(self, config: SAMConfig = SAMConfig()) -> None:
        super().__init__()
        self.config = config
        w2, w4, w8 = config.widths
        self.stage2 = nn.Sequential(_conv_norm(1, w2, stride=2), nn.GELU(),
                                    *[ResidualBlock(w2) for _ in range(config.blocks[0])])
        self.stage4 = nn.Sequential(_conv_norm(w2, w4, stride=2), nn.GELU(),
                                    *[ResidualBlock(w4) for _ in range(config.blocks[1])])
        self.stage8 = nn.Sequential(_conv_norm(w4, w8, stride=2), nn.GELU(),
                                    *[ResidualBlock(w8) for _ in range(config.blocks[2])])
        self.global_head = nn.Sequential(ResidualBlock(w8, dilation=2), nn.Conv3d(w8, config.global_dim, 1))
        f = config.fpn_width
        self.lateral2, self.lateral4, self.lateral8 = nn.Conv3d(w2, f, 1), nn.Conv3d(w4, f, 1), nn.Conv3d(w8, f, 1)
        self.local_head = nn.Sequential(nn.Conv3d(f, f, 3, padding=1), nn.GELU(), nn.Conv3d(f, config.local_dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``(N, 1, D, H, W)`` from :func:`sam_intensity`. Returns ``(local, global)`` embeddings."""
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"SAMNet.forward(): expected (N, 1, D, H, W), got {tuple(x.shape)}")
        f2 = self.stage2(x)
        f4 = self.stage4(f2)
        f8 = self.stage8(f4)
        p4 = self.lateral4(f4) + _upsample_to(self.lateral8(f8), f4)
        p2 = self.lateral2(f2) + _upsample_to(p4, f2)
        local = F.normalize(self.local_head(p2), dim=1)
        global_ = F.normalize(self.global_head(f8), dim=1)
        return local, global_


def _upsample_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=reference.shape[2:], mode="trilinear", align_corners=False)
