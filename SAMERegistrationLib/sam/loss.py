"""Pixel-level InfoNCE losses of SAM training (local and global embeddings)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points


@dataclass(frozen=True)
class ContrastiveSettings:
    """Sampling of positives and negatives (distances in mm).

    Local: positives are the corresponding points; negatives are all local voxels of the other view
    farther than ``local_exclusion_mm`` from the positive, of which the ``hard_negatives`` most
    similar and ``random_negatives`` random ones are kept ("hard and diverse").
    Global: negatives are coarse voxels of the other view farther than ``global_exclusion_mm``
    plus, with ``other_volume_negatives``, every coarse voxel of the other pairs in the batch (other
    volumes). Those teach the global embedding to tell patients apart, which is wrong when the
    same anatomy of different patients must match (cross-patient pairs): training with them turns
    it off. Cross-patient pairs use larger exclusions (:meth:`with_tolerance`), as their positives
    are only as exact as the registration that aligned them.
    """

    queries: int = 128
    temperature: float = 0.2
    local_exclusion_mm: float = 8.0
    global_exclusion_mm: float = 25.0
    hard_negatives: int = 256
    random_negatives: int = 256
    min_query_hu: float = -900.0
    other_volume_negatives: bool = True

    def with_tolerance(self, tolerance_mm: float) -> "ContrastiveSettings":
        """These settings with both exclusion radii widened by ``tolerance_mm`` (the positives' error)."""
        return replace(self, local_exclusion_mm=self.local_exclusion_mm + tolerance_mm,
                       global_exclusion_mm=self.global_exclusion_mm + tolerance_mm)


def query_points(grid_1: Grid, local_grid_1: Grid, hu_1: torch.Tensor, grid_2: Grid, count: int,
                 min_hu: float, generator: torch.Generator, hu_2: torch.Tensor | None = None) -> torch.Tensor:
    """World points ``(<=count, 3)``: local voxel centres of view 1 that view 2 also covers and that
    are not air in view 1 (nor in view 2 when ``hu_2`` is given: a cross-patient view may lie partly
    outside the other patient's scan)."""
    points = local_grid_1.world_points().reshape(-1, 3)
    index_2 = grid_2.world_to_index_points(points)
    inside = ((index_2 >= 1.0) & (index_2 <= torch.tensor(grid_2.size_ijk) - 2.0)).all(dim=-1)
    tissue = sample_at_points(hu_1, grid_1, points) > min_hu
    if hu_2 is not None:
        tissue &= sample_at_points(hu_2, grid_2, points) > min_hu
    candidates = points[inside & tissue]
    if len(candidates) == 0:
        return candidates
    chosen = torch.randperm(len(candidates), generator=generator)[:count]
    return candidates[chosen]


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
             negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of -log softmax of the positive among ``[positive, negatives]``.

    Args:
        query, positive: ``(N, C)`` unit vectors; negatives: ``(N, K, C)`` unit vectors.
        negative_mask: optional ``(N, K)`` booleans, False for negatives to ignore.
    """
    positive_logit = (query * positive).sum(-1, keepdim=True)
    negative_logits = torch.einsum("nc,nkc->nk", query, negatives)
    if negative_mask is not None:
        negative_logits = negative_logits.masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def local_loss(local_1: torch.Tensor, grid_1: Grid, local_2: torch.Tensor, grid_2: Grid, points: torch.Tensor,
               settings: ContrastiveSettings, generator: torch.Generator) -> torch.Tensor:
    """InfoNCE of the local embeddings ``(C, d, h, w)`` on their local grids at world ``points``."""
    query = F.normalize(sample_at_points(local_1, grid_1, points).T, dim=-1)
    positive = F.normalize(sample_at_points(local_2, grid_2, points).T, dim=-1)
    candidates = local_2.reshape(local_2.shape[0], -1).T                       # (M, C)
    positions = grid_2.world_points(device=points.device).reshape(-1, 3)
    far = torch.cdist(points, positions) > settings.local_exclusion_mm          # (N, M)
    with torch.no_grad():
        similarity = (query @ candidates.T).masked_fill(~far, -2.0)
        hard = similarity.topk(min(settings.hard_negatives, similarity.shape[1]), dim=1).indices
        weights = far.float() + 1e-6
        diverse = torch.multinomial(weights, settings.random_negatives, replacement=True, generator=generator)
    negatives = candidates[torch.cat([hard, diverse], dim=1)]                   # (N, K, C)
    return info_nce(query, positive, negatives, settings.temperature)


def global_loss(coarse: list[torch.Tensor], grids: list[tuple[Grid, Grid]], points: list[torch.Tensor],
                settings: list[ContrastiveSettings]) -> torch.Tensor:
    """InfoNCE of the global embeddings over a batch of view pairs.

    Args:
        coarse: per pair, ``(coarse_1, coarse_2)`` stacked as ``(2, C, d, h, w)``.
        grids: per pair, the coarse grids of view 1 and view 2.
        points: per pair, world query points ``(N, 3)``.
        settings: per pair (the exclusion radius, temperature and other-volume negatives).
    """
    losses = []
    for pair, (maps, (grid_1, grid_2), pts, pair_settings) in enumerate(zip(coarse, grids, points, settings)):
        if len(pts) == 0:
            continue
        query = F.normalize(sample_at_points(maps[0], grid_1, pts).T, dim=-1)
        positive = F.normalize(sample_at_points(maps[1], grid_2, pts).T, dim=-1)
        own = maps[1].reshape(maps.shape[1], -1).T
        distance = torch.cdist(pts, grid_2.world_points(device=pts.device).reshape(-1, 3))
        far = distance > pair_settings.global_exclusion_mm
        others = [m.reshape(2, m.shape[1], -1).permute(0, 2, 1).reshape(-1, m.shape[1])
                  for other, m in enumerate(coarse) if other != pair and pair_settings.other_volume_negatives]
        negatives = torch.cat([own] + others)[None].expand(len(pts), -1, -1)
        mask = torch.cat([far, torch.ones(len(pts), len(negatives[0]) - len(own), dtype=torch.bool, device=pts.device)], 1)
        losses.append(info_nce(query, positive, negatives, pair_settings.temperature, mask))
    if not losses:
        # no query point in any pair: a zero that still involves every output, so data-parallel
        # training sees each parameter used
        return sum(maps.sum() for maps in coarse) * 0.0
    return torch.stack(losses).mean()
