"""Finding, for points in one image, the anatomically corresponding points in another with SAM.

Coarse to fine, so cost does not grow with the whole volume per point:
1. global similarity of each query's coarse embedding against every coarse voxel of the target
   (a few thousand), keeping the ``top_k`` best as candidate regions;
2. in a ``window_mm`` cube around each candidate, the combined similarity
   ``(cos_local + cos_global) / 2`` at every local (stride-2) voxel; the best voxel wins, optionally
   refined by a parabola through its neighbours along each axis (at most half a local voxel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..spatial.sampling import sample_at_points
from .embedding import Embeddings, FeatureMap


@dataclass(frozen=True)
class Matches:
    """``points`` ``(N, 3)`` LPS mm in the target, ``score`` ``(N,)`` combined cosine similarity in
    [-1, 1], and ``consistent`` ``(N,)`` booleans from the forward-backward check (all True when
    the check was not run)."""

    points: torch.Tensor
    score: torch.Tensor
    consistent: torch.Tensor


class MatchTarget:
    """A target image's embeddings prepared for repeated matching.

    Attributes:
        voxel_rows: ``(V, C_l + C_g)``: for every local voxel (flat k, j, i order) its unit local
            embedding followed by the unit global embedding resampled there, one contiguous row per
            voxel, so a search window is one row gather and one batched dot product.
        coarse_flat: ``(C_g, Vc)`` the global embeddings on their own (coarse) grid.
    """

    def __init__(self, embeddings: Embeddings) -> None:
        self.embeddings = embeddings
        local = embeddings.local
        coarse_on_local = sample_at_points(embeddings.coarse.features, embeddings.coarse.grid,
                                           local.grid.world_points(device=local.features.device), padding="border")
        rows = torch.cat([local.features, F.normalize(coarse_on_local, dim=0)])
        self.voxel_rows = rows.reshape(rows.shape[0], -1).T.contiguous()
        self.coarse_flat = embeddings.coarse.features.reshape(embeddings.coarse.features.shape[0], -1)
        self.coarse_points = embeddings.coarse.grid.world_points(device=local.features.device).reshape(-1, 3)
        self.shape_dhw = torch.tensor(local.grid.shape, device=local.features.device)


def describe_points(embeddings: Embeddings, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit local and global descriptors ``(N, C)`` of world ``points`` ``(N, 3)``."""
    local = sample_at_points(embeddings.local.features, embeddings.local.grid, points, padding="border")
    coarse = sample_at_points(embeddings.coarse.features, embeddings.coarse.grid, points, padding="border")
    return F.normalize(local.T, dim=-1), F.normalize(coarse.T, dim=-1)


def match_points(source: Embeddings, target: Embeddings | MatchTarget, points: torch.Tensor,
                 window_mm: float = 12.0, top_k: int = 3, cycle_tolerance_mm: float | None = None,
                 subvoxel: bool = True, search_centres: torch.Tensor | None = None, chunk: int = 256) -> Matches:
    """Matches world ``points`` ``(N, 3)`` of the source image into the target image.

    Args:
        window_mm: half-width of the local search cube around each coarse candidate (the default
            covers the 16 mm spacing of the coarse grid with a margin).
        top_k: coarse candidates searched locally per point.
        cycle_tolerance_mm: when given, each match is matched back into the source and flagged
            ``consistent`` when it returns within this distance of its query.
        subvoxel: refine the best local voxel with a parabola fit along each axis.
        search_centres: optional ``(N, 3)`` world points in the target around which to search
            (e.g. each point's own position after an alignment) instead of the coarse candidates.
    """
    prepared = target if isinstance(target, MatchTarget) else MatchTarget(target)
    results = [_match_chunk(source, prepared, points[i:i + chunk], window_mm, top_k, subvoxel,
                            None if search_centres is None else search_centres[i:i + chunk])
               for i in range(0, len(points), chunk)]
    matched = torch.cat([r[0] for r in results]) if results else points.new_zeros((0, 3))
    score = torch.cat([r[1] for r in results]) if results else points.new_zeros((0,))
    consistent = torch.ones(len(points), dtype=torch.bool, device=points.device)
    if cycle_tolerance_mm is not None and len(points):
        back = match_points(prepared.embeddings, source, matched, window_mm, top_k, None, subvoxel,
                            None if search_centres is None else points, chunk).points
        consistent = (back - points).norm(dim=-1) <= cycle_tolerance_mm
    return Matches(matched, score, consistent)


def _match_chunk(source: Embeddings, target: MatchTarget, points: torch.Tensor, window_mm: float, top_k: int,
                 subvoxel: bool, search_centres: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    local_query, coarse_query = describe_points(source, points)
    if search_centres is None:
        coarse_similarity = coarse_query @ target.coarse_flat                          # (N, Vc)
        candidates = target.coarse_points[coarse_similarity.topk(min(top_k, coarse_similarity.shape[1]), dim=1).indices]
    else:
        candidates = search_centres[:, None, :]
    local_grid = target.embeddings.local.grid
    radius = max(1, int(round(window_mm / local_grid.spacing[0])))
    offsets = torch.arange(-radius, radius + 1, device=points.device)
    window = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)   # (W, 3) k,j,i
    centre_ijk = local_grid.world_to_index_points(candidates).round().long()              # (N, K, 3) i,j,k
    centre_kji = centre_ijk.flip(-1)
    voxels = (centre_kji[:, :, None, :] + window[None, None]).reshape(len(points), -1, 3)
    voxels = torch.minimum(voxels.clamp(min=0), target.shape_dhw - 1)
    flat = (voxels[..., 0] * target.shape_dhw[1] + voxels[..., 1]) * target.shape_dhw[2] + voxels[..., 2]
    query = torch.cat([local_query, coarse_query], dim=1)                              # (N, C_l + C_g)
    combined = torch.bmm(target.voxel_rows[flat], query[:, :, None])[..., 0] / 2.0      # (cos_l + cos_g) / 2
    score, best = combined.max(dim=1)
    best_kji = voxels.gather(1, best[:, None, None].expand(-1, 1, 3))[:, 0]
    refined_kji = best_kji.double()
    if subvoxel:
        refined_kji = refined_kji + _parabolic_offsets(target, best_kji, query)
    index_ijk = refined_kji.flip(-1)
    matrix = torch.as_tensor(local_grid.index_to_world(), dtype=torch.float64, device=points.device)
    matched = (index_ijk @ matrix[:3, :3].T + matrix[:3, 3]).to(points.dtype)
    return matched, score


def _parabolic_offsets(target: MatchTarget, best_kji: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Sub-voxel offsets ``(N, 3)`` (k, j, i) from a parabola through the best voxel's neighbours
    (``query``: ``(N, C_l + C_g)`` local then global query descriptors)."""
    offsets = torch.zeros(best_kji.shape, dtype=torch.float64, device=best_kji.device)
    shape = target.shape_dhw
    for axis in range(3):
        values = []
        for step in (-1, 0, 1):
            voxel = best_kji.clone()
            voxel[:, axis] = (voxel[:, axis] + step).clamp(0, shape[axis] - 1)
            flat = (voxel[:, 0] * shape[1] + voxel[:, 1]) * shape[2] + voxel[:, 2]
            values.append((target.voxel_rows[flat] * query).sum(-1).double() / 2)
        minus, centre, plus = values
        curvature = minus - 2 * centre + plus
        shift = torch.where(curvature < -1e-9, 0.5 * (minus - plus) / curvature, torch.zeros_like(centre))
        offsets[:, axis] = shift.clamp(-0.5, 0.5)
    return offsets


@dataclass(frozen=True)
class StableMatches:
    """Point pairs that SAM matches both ways (SAME++'s stable sampling).

    Attributes:
        source_points: ``(M, 3)`` LPS mm in the source image (where the queries settled).
        target_points: ``(M, 3)`` LPS mm in the target image.
        score: ``(M,)`` combined cosine similarity of the forward match.
        queried: how many query points were matched (M <= queried).
    """

    source_points: torch.Tensor
    target_points: torch.Tensor
    score: torch.Tensor
    queried: int


def stable_matches(source: Embeddings, target: Embeddings, points: torch.Tensor, iterations: int = 3,
                   tolerance_mm: float | None = None, window_mm: float = 12.0, local_search: bool = False
                   ) -> StableMatches:
    """Matches ``points`` ``(N, 3)`` forward and back ``iterations`` times, each time moving a query to
    where its round trip ended; keeps the points whose last round trip returns within
    ``tolerance_mm`` (default: one local embedding voxel), one per local source voxel.

    A point that survives is a mutual best match: its match in the target matches back to it, the
    property SAME++ requires before fitting anything to SAM matches.

    Args:
        local_search: search around each query's own position (images already aligned, as in
            SAM-coarse) instead of over the whole target.
    """
    tolerance = tolerance_mm if tolerance_mm is not None else float(source.local.grid.spacing[0])
    prepared_target, prepared_source = MatchTarget(target), MatchTarget(source)
    query = points
    for _ in range(max(1, iterations)):
        forward = match_points(source, prepared_target, query, window_mm,
                               search_centres=query if local_search else None)
        back = match_points(target, prepared_source, forward.points, window_mm,
                            search_centres=query if local_search else None).points
        returned = (back - query).norm(dim=-1) <= tolerance
        settled, query = query, back
    keep = returned.nonzero().flatten()
    voxel = source.local.grid.world_to_index_points(settled[keep]).round().long()
    order = forward.score[keep].argsort(descending=True)
    keep = keep[order[_first_occurrences(voxel[order])]]
    return StableMatches(settled[keep], forward.points[keep], forward.score[keep], len(points))


def _first_occurrences(rows: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the first occurrence of each distinct row of an integer ``(N, 3)`` tensor."""
    if len(rows) == 0:
        return torch.zeros(0, dtype=torch.long, device=rows.device)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(rows), device=rows.device), reduce="amin")
    return first.sort().values
