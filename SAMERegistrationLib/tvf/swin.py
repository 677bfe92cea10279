"""A small Swin-transformer backbone (TransMorph style) for half-resolution registration features.

Input ``(N, C, d, h, w)`` half-resolution features; a stride-2 patch embedding gives tokens at a
quarter of the working resolution, two stages of (shifted-)window self-attention with relative
position bias run there and at an eighth (after a stride-2 patch merging), and a convolutional
decoder with skips brings the features back to the input size. Windows are cubes of ``window``
tokens; the token grid is padded to a multiple of it, and in shifted blocks attention between
tokens that wrapped around from opposite sides is masked, as in Swin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..networks.unet import conv_block


class WindowAttention(nn.Module):
    """Multi-head self-attention inside cubic windows with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        offsets = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)
        relative = (offsets[:, :, None] - offsets[:, None, :]).permute(1, 2, 0) + window - 1
        index = (relative * torch.tensor([(2 * window - 1) ** 2, 2 * window - 1, 1])).sum(-1)
        self.register_buffer("bias_index", index, persistent=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``tokens`` ``(B, L, C)`` (B = windows x batch, L = window^3); ``mask`` ``(windows, L, L)``
        additive (0 or -inf-like) or None."""
        batch, length, dim = tokens.shape
        q, k, v = self.qkv(tokens).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        scores = scores + self.bias_table[self.bias_index].permute(2, 0, 1)[None]
        if mask is not None:
            windows = mask.shape[0]
            scores = scores.view(batch // windows, windows, self.heads, length, length) + mask[None, :, None]
            scores = scores.view(batch, self.heads, length, length)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.projection(attended)


class SwinBlock(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm_attention, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = WindowAttention(dim, heads, window)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D, H, W, C)`` channels-last tokens -> same shape."""
        n, depth, height, width, dim = x.shape
        w = self.window
        pads = [(-size) % w for size in (depth, height, width)]
        shortcut = x
        x = F.pad(self.norm_attention(x), (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = x.shape[1:4]
        mask = None
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift,) * 3, dims=(1, 2, 3))
            mask = _shift_mask(padded, w, self.shift, x.device)
        windows = x.view(n, padded[0] // w, w, padded[1] // w, w, padded[2] // w, w, dim)
        windows = windows.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, w ** 3, dim)
        attended = self.attention(windows, mask)
        x = attended.view(n, padded[0] // w, padded[1] // w, padded[2] // w, w, w, w, dim)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, *padded, dim)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift,) * 3, dims=(1, 2, 3))
        x = shortcut + x[:, :depth, :height, :width]
        return x + self.mlp(self.norm_mlp(x))


def _shift_mask(shape: Sequence[int], window: int, shift: int, device: torch.device) -> torch.Tensor:
    """``(windows, L, L)`` additive mask: -100 between tokens of different regions of a shifted
    window (tokens that came from opposite sides of the grid), 0 elsewhere."""
    regions = torch.zeros(tuple(shape), device=device)
    label = 0
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for a in cuts:
        for b in cuts:
            for c in cuts:
                regions[a, b, c] = label
                label += 1
    d, h, w = (size // window for size in shape)
    ids = regions.view(d, window, h, window, w, window).permute(0, 2, 4, 1, 3, 5).reshape(-1, window ** 3)
    return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


class SwinBackbone(nn.Module):
    """Half-resolution features ``(N, in, d, h, w)`` -> ``(N, out, d, h, w)``.

    Args:
        in_channels: input channels.
        dims: token widths of the two stages (1/4 and 1/8 of the working resolution).
        heads: attention heads per stage.
        window: window edge in tokens.
        out_channels: output width.
    """

    def __init__(self, in_channels: int, dims: Sequence[int] = (32, 64), heads: Sequence[int] = (2, 4),
                 window: int = 4, out_channels: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv3d(in_channels, dims[0], 2, stride=2)
        self.merge = nn.Conv3d(dims[0], dims[1], 2, stride=2)
        self.stages = nn.ModuleList(
            nn.Sequential(SwinBlock(dim, head, window, 0), SwinBlock(dim, head, window, window // 2))
            for dim, head in zip(dims, heads))
        self.up_quarter = conv_block(dims[1] + dims[0], dims[0])
        self.up_half = conv_block(dims[0] + in_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quarter = self._stage(0, self.embed(F.pad(x, _even_padding(x))))
        eighth = self._stage(1, self.merge(F.pad(quarter, _even_padding(quarter))))
        up = F.interpolate(eighth, size=quarter.shape[2:], mode="trilinear", align_corners=False)
        quarter = self.up_quarter(torch.cat([up, quarter], dim=1))
        up = F.interpolate(quarter, size=x.shape[2:], mode="trilinear", align_corners=False)
        return self.up_half(torch.cat([up, x], dim=1))

    def _stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.stages[index](x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def _even_padding(x: torch.Tensor) -> tuple[int, ...]:
    """F.pad amounts making the spatial sizes of ``(N, C, D, H, W)`` even (at the far end)."""
    return (0, x.shape[4] % 2, 0, x.shape[3] % 2, 0, x.shape[2] % 2)
