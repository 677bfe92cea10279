"""A small 3D U-Net and the half-resolution stem in front of it.

Registration networks here run their 3D convolutions at half the working resolution (a 2 mm
working grid gives 4 mm features): a full-resolution U-Net costs ~28 s per chest-size forward pass on
a 2-core CPU, a half-resolution one about an eighth of that. :class:`HalfResolutionStem` reads the
full-resolution input once, :class:`UNet3D` works on the half-resolution tensor and returns features
of the same size.

Tensors are ``(N, C, D, H, W)``; a stride-2 step maps a size ``n`` to ``ceil(n / 2)``, like the
grids of :func:`half_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..spatial.grid import Grid


def half_grid(grid: Grid) -> Grid:
    """The grid of a stride-2 feature map of ``grid``: ``ceil(n / 2)`` voxels of twice the spacing,
    same origin and direction (the same convention as SAM's local embeddings)."""
    shape = [-(-n // 2) for n in grid.shape]
    return Grid.create(shape, [2 * s for s in grid.spacing], grid.origin, grid.direction_matrix)


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution + LeakyReLU(0.2), as in VoxelMorph."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class HalfResolutionStem(nn.Module):
    """Full-resolution input ``(N, in, D, H, W)`` -> half-resolution features ``(N, out, ceil(D/2), ...)``:
    one thin full-resolution convolution, then a stride-2 convolution."""

    def __init__(self, in_channels: int, out_channels: int = 16, full_resolution_channels: int = 8) -> None:
        super().__init__()
        self.full = conv_block(in_channels, full_resolution_channels)
        self.down = conv_block(full_resolution_channels, out_channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.full(x))


class UNet3D(nn.Module):
    """Encoder (stride-2 convolutions) and decoder (trilinear upsampling + skip concatenation).

    Args:
        in_channels: channels of the input.
        encoder: widths of the encoder levels; level ``i`` is at ``1 / 2**(i + 1)`` of the input size.
        decoder: widths of the decoder levels, coarse to fine; one per encoder level.
        out_channels: width of the output, at the input's size.
    """

    def __init__(self, in_channels: int, encoder: Sequence[int] = (32, 32, 32), decoder: Sequence[int] = (32, 32, 32),
                 out_channels: int = 16) -> None:
        super().__init__()
        if len(encoder) != len(decoder):
            raise ValueError(f"UNet3D: encoder {tuple(encoder)} and decoder {tuple(decoder)} need one width per level")
        self.input = conv_block(in_channels, encoder[0])
        widths = [encoder[0], *encoder]
        self.down = nn.ModuleList(conv_block(a, b, stride=2) for a, b in zip(widths[:-1], widths[1:]))
        skips = list(reversed(widths[:-1]))
        previous = encoder[-1]
        self.up = nn.ModuleList()
        for width, skip in zip(decoder, skips):
            self.up.append(conv_block(previous + skip, width))
            previous = width
        self.output = conv_block(previous, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.input(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return self.output(x)


def flow_head(in_channels: int) -> nn.Conv3d:
    """3x3x3 convolution to a 3-channel field, initialised near zero (training starts at identity)."""
    head = nn.Conv3d(in_channels, 3, 3, padding=1)
    nn.init.normal_(head.weight, std=1e-5)
    nn.init.zeros_(head.bias)
    return head
