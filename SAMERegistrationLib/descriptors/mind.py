"""MIND-SSC: a hand-crafted local self-similarity descriptor, as a drop-in baseline for SAM.

MIND-SSC (Heinrich et al., MICCAI 2013, "Towards realtime multimodal fusion for image-guided
interventions using self-similarities") describes each voxel by how similar small patches around it
are to each other, which makes it insensitive to the intensity mapping (contrast, offset, modality):

* take the 6-neighbourhood of a voxel at distance ``dilation`` voxels (``+-x, +-y, +-z``) and the
  12 pairs of those neighbours that are not opposite each other (each pair is ``sqrt(2) * dilation``
  apart): the "self-similarity context";
* for each pair ``(p, q)`` the patch distance ``D_pq(x) = box(I(. + p) - I(. + q))^2 (x)`` (a
  ``(2 radius + 1)^3`` box mean, separable, over the border-replicated image);
* subtract the smallest of the 12 distances at each voxel and divide by their mean ``V(x)``
  (clamped to [1e-3, 1e3] times the volume's mean of ``V``, as in the authors' deeds/ConvexAdam
  code), then ``exp(-D / V)``: 12 values in (0, 1], the best-matching pair at exactly 1.

Every step is invariant to a linear intensity change ``a I + b`` (``a > 0``): the differences remove
``b``, and ``D`` and ``V`` both scale with ``a^2``.

:func:`mind_embed` turns this into the :class:`~SAMERegistrationLib.sam.embedding.Embeddings` that
SAM produces, so :func:`~SAMERegistrationLib.sam.matching.match_points` works unchanged:

* the image is resampled to the same canonical working grid as SAM's (``to_working_grid``:
  ``spacing_mm`` isotropic, identity LPS direction) and its HU clipped to ``hu_window``;
* **local** map: MIND-SSC on the working grid taken at every second voxel (stride 2, voxel ``n``
  centred on working voxel ``2 n``, the grid of ``feature_grids``), L2-normalised — 12 channels;
* **coarse** map: "context" MIND-SSC of the working image box-averaged to ``context_stride`` (4:
  8 mm voxels), computed with larger neighbour distances (``context``: (radius, dilation, box) per
  block, in those 8 mm voxels; default neighbours 16, 32 and 64 mm apart), each block box-averaged
  over ``box`` voxels and taken at every second 8 mm voxel (stride 8 of the working grid, voxel
  ``n`` centred on working voxel ``8 n``), L2-normalised per block, concatenated and scaled to unit
  length (12 channels per block). It describes the layout of large structures around a point
  (body outline, lungs, bones) without any notion of which organ a region is, which is what
  SAM's global embedding adds.

The settings (local radius 2 / dilation 2, the three context blocks) were chosen among a handful
of variants on small runs (150 points, seed-0 pairs) of the synthetic benchmark
(``benchmarks/benchmark_sam.py``): pooling the fine descriptor alone (box 9 and 25 working voxels)
gave a coarse level so uninformative that the global search failed for most points (median errors
20-45 mm against 8-10 mm with the context blocks).

The descriptor vectors are non-negative, so cosine similarities between them are high everywhere
(typically 0.6-1.0); :func:`match_points` only ranks them, which is equivalent to ranking the
Euclidean distance of the unit vectors (the quantity MIND registration methods minimise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..filters import window_mean
from ..image import Image
from ..preprocess import to_working_grid
from ..sam.embedding import Embeddings, FeatureMap, feature_grids

_SIX_NEIGHBOURS = ((0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1))
"""Offsets + 1 (array order k, j, i) of the 6-neighbourhood, in the order of the authors' code."""

_CHANNEL_ORDER = (6, 9, 10, 1, 11, 4, 0, 2, 3, 5, 8, 7)
"""The authors' reordering of the 12 pairs (to match their C++ implementation)."""


def _neighbour_pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 (p, q) offset pairs of the self-similarity context, offsets in {-1, 0, 1}^3 (k, j, i)."""
    pairs = []
    for first in range(6):            # the authors' enumeration: mask (x > y) & (dist == 2), row-major
        for second in range(first):
            a, b = _SIX_NEIGHBOURS[first], _SIX_NEIGHBOURS[second]
            if sum((u - v) ** 2 for u, v in zip(a, b)) == 2:
                pairs.append((tuple(u - 1 for u in a), tuple(v - 1 for v in b)))
    assert len(pairs) == 12
    return [pairs[index] for index in _CHANNEL_ORDER]


NEIGHBOUR_PAIRS = _neighbour_pairs()
"""The 12 ``(p, q)`` neighbour offset pairs (unit steps, array order k, j, i) of MIND-SSC channels."""


@dataclass(frozen=True)
class MINDConfig:
    """MIND-SSC baseline settings.

    Attributes:
        spacing_mm: isotropic working-grid voxel size (SAM's: 2 mm).
        hu_window: HU range the image is clipped to before the descriptor (MIND itself is
            invariant to linear intensity changes; the clip bounds the influence of metal, bone
            and contrast agent).
        radius: local patch half-width in working voxels (box of ``2 radius + 1`` voxels per axis).
        dilation: local neighbour distance in working voxels.
        context_stride: working voxels per voxel of the context image (must divide 8).
        context: ``(radius, dilation, box)`` per coarse block, in context voxels; ``box`` (odd) is
            the averaging box applied before sampling at stride 8.
    """

    spacing_mm: float = 2.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    radius: int = 2
    dilation: int = 2
    context_stride: int = 4
    context: tuple[tuple[int, int, int], ...] = ((1, 2, 3), (2, 4, 5), (2, 8, 9))

    def as_dict(self) -> dict:
        return asdict(self)


def mind_ssc(volume: torch.Tensor, radius: int = 1, dilation: int = 2, stride: int = 1) -> torch.Tensor:
    """The 12-channel MIND-SSC descriptor of a volume (computed in its dtype).

    Args:
        volume: ``(D, H, W)`` intensities (any linear scale).
        radius: patch half-width in voxels.
        dilation: neighbour distance in voxels.
        stride: the descriptor is returned at every ``stride``-th voxel (0, stride, ...) only; the
            patch distances are still box means over full-resolution voxels, so this is
            ``mind_ssc(volume, radius, dilation)[:, ::stride, ::stride, ::stride]`` computed faster
            (exactly, except that the variance clamp uses the mean over the returned voxels).

    Returns:
        ``(12, ceil(D/stride), ceil(H/stride), ceil(W/stride))`` values in (0, 1]; channel ``c``
        compares the patches at the offsets ``NEIGHBOUR_PAIRS[c]`` (times ``dilation``). Beyond the
        border the image is replicated (edge voxels repeated) before differences are taken.
    """
    if volume.dim() != 3:
        raise ValueError(f"mind_ssc(): expected a (D, H, W) volume, got {tuple(volume.shape)}")
    d, r = dilation, radius
    sizes = volume.shape
    # Pad by e = 2d + r: every shifted difference and its whole box then lies inside the padding.
    e = 2 * d + r
    padded = F.pad(volume[None, None], (e,) * 6, mode="replicate")[0, 0]
    # The 12 pairs (p, q) only need the squared differences along 6 directions u = +-(p - q):
    # (I(x + p d) - I(x + q d))^2 = S_u(x + o d) with S_u(z) = (I(z + u d) - I(z))^2 and o = q when
    # u = p - q, o = p when u = q - p. S_u is stored for z >= d (index 0 <-> padded voxel d).
    squared: dict[tuple[int, int, int], torch.Tensor] = {}
    distances = []
    for p, q in NEIGHBOUR_PAIRS:
        v = tuple(a - b for a, b in zip(p, q))
        u, origin = (v, q) if v > tuple(-c for c in v) else (tuple(-c for c in v), p)
        if u not in squared:
            length = [n - 2 * d for n in padded.shape]
            shifted = padded[tuple(slice(d + c * d, d + c * d + m) for c, m in zip(u, length))]
            base = padded[tuple(slice(d, d + m) for m in length)]
            squared[u] = (shifted - base) ** 2
        # Box centred on x + o d for x = 0..n-1, i.e. S_u rows x + e + o d - r - d .. + 2r (stored index).
        starts = [e + o * d - r - d for o in origin]
        window = squared[u][tuple(slice(a, a + n + 2 * r) for a, n in zip(starts, sizes))]
        distances.append(_strided_box_mean(window, r, stride))
    distances = torch.stack(distances)
    distances = distances - distances.min(dim=0, keepdim=True).values
    variance = distances.mean(dim=0, keepdim=True)
    mean_variance = float(variance.mean())
    tiny = torch.finfo(distances.dtype).tiny
    variance = variance.clamp(min=max(mean_variance * 1e-3, tiny), max=max(mean_variance * 1e3, tiny))
    return torch.exp(-distances / variance)


def _strided_box_mean(window: torch.Tensor, radius: int, stride: int) -> torch.Tensor:
    """Means over ``2 radius + 1`` consecutive voxels per axis of a ``(D + 2r, H + 2r, W + 2r)``
    window, at output voxels 0, stride, ... of the ``(D, H, W)`` interior (separable sums of slices)."""
    size = 2 * radius + 1
    x = window
    for axis in range(3):
        count = -(-(x.shape[axis] - 2 * radius) // stride)
        total = None
        for offset in range(size):
            index = [slice(None)] * 3
            index[axis] = slice(offset, offset + stride * (count - 1) + 1, stride)
            total = x[tuple(index)].clone() if total is None else total.add_(x[tuple(index)])
        x = total
    return x / size**3


def mind_embed(image: Image, config: MINDConfig = MINDConfig()) -> Embeddings:
    """MIND-SSC "embeddings" of a CT image (HU) on any grid, shaped like SAM's (see module doc).

    Returns:
        :class:`Embeddings` with ``local`` ``(12, ceil(D/2), ceil(H/2), ceil(W/2))`` on the stride-2
        grid and ``coarse`` ``(12 * len(context), ceil(D/8), ceil(H/8), ceil(W/8))`` on the stride-8
        grid of the working grid (``D, H, W`` its shape; see ``feature_grids``), float32, unit length
        along channels.
    """
    working = to_working_grid(image, config.spacing_mm, is_ct=True)
    low, high = config.hu_window
    hu = working.data.float().clamp(low, high)
    local_grid, coarse_grid = feature_grids(working.grid)
    local = F.normalize(mind_ssc(hu, config.radius, config.dilation, stride=2), dim=0).contiguous()
    stride = config.context_stride
    if 8 % stride:
        raise ValueError(f"MINDConfig.context_stride must divide 8, got {stride}")
    context_image = window_mean(hu[None], 2 * stride - 1, stride=stride)[0] if stride > 1 else hu
    blocks = []
    for radius, dilation, box in config.context:
        block = mind_ssc(context_image, radius, dilation)
        blocks.append(F.normalize(window_mean(block, box, stride=8 // stride), dim=0))
    coarse = F.normalize(torch.cat(blocks), dim=0).contiguous()
    if tuple(coarse.shape[1:]) != coarse_grid.shape or tuple(local.shape[1:]) != local_grid.shape:
        raise RuntimeError(f"mind_embed(): maps {tuple(local.shape)}, {tuple(coarse.shape)} do not fit the "
                           f"grids {local_grid.shape}, {coarse_grid.shape}")
    return Embeddings(FeatureMap(local, local_grid), FeatureMap(coarse, coarse_grid))
