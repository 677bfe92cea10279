"""DeepSim: similarity of frozen deep features of the fixed and the warped moving image.

``deepsim = 1 - mean over levels l of ( weighted mean over voxels of cos(F_l(fixed), F_l(warped)) )``

where ``F_l`` are feature maps of a frozen network and the cosine is taken over channels at each
voxel (Czolbe et al., "DeepSim: semantic similarity metrics for learned image registration",
2021/2023). 0 for identical images; at most 2.

Two extractors are registered as similarity terms of :mod:`SAMERegistrationLib.learning.objective`:

* ``deepsim``: the encoder stages of the segmentation U-Net (``segmentation/network.py``, shipped
  ``Resources/Models/seg_unet.pt``): strides 1, 2, 4, 8;
* ``deepsim-sam``: the SAM network's embeddings (``sam/network.py``, shipped ``sam_small.pt``):
  local (stride 2) and global (stride 8).

Both read **HU** (``pair.fixed_hu`` and the moving HU warped by the displacement, so pairs without
HU, i.e. non-CT images, are refused) on the pair's own grid: they were trained at 2 mm, the working
spacing of the learned stages. The warped moving image is pushed through the extractor at every
evaluation (gradients reach the displacement through it); the extractor is frozen (eval mode,
``requires_grad`` off) and the fixed image's features are computed once per pair without autograd.
Weights load on the first use of a term, once per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks.unet import half_grid
from ..spatial.fields import resample_batch, warp_batch
from ..spatial.grid import Grid

if TYPE_CHECKING:
    from ..learning.pairs import PairBatch

_EPS = 1e-6


def deepsim(fixed_features: Sequence[Tensor], warped_features: Sequence[Tensor],
            weights: Sequence[Tensor | None] | None = None) -> Tensor:
    """``1 - mean_l weighted_mean_voxels cos_channels(fixed_l, warped_l)``.

    Args:
        fixed_features, warped_features: one ``(N, C_l, D_l, H_l, W_l)`` map per level, equal shapes
            level by level.
        weights: per level, voxel weights ``(N, 1, D_l, H_l, W_l)`` (e.g. the body) or None for a
            plain mean; default: plain means everywhere.

    Returns:
        0-dim loss in [0, 2]; 0 when every level's features agree in direction at every voxel.

    Raises:
        ValueError: no levels, different level counts, or a level's shapes differ.
    """
    if not fixed_features or len(fixed_features) != len(warped_features):
        raise ValueError(f"deepsim(): need the same non-zero number of levels, got {len(fixed_features)} "
                         f"and {len(warped_features)}")
    weights = list(weights) if weights is not None else [None] * len(fixed_features)
    similarities = []
    for level, (fixed, warped, weight) in enumerate(zip(fixed_features, warped_features, weights)):
        if fixed.shape != warped.shape:
            raise ValueError(f"deepsim(): level {level}: fixed {tuple(fixed.shape)} and warped "
                             f"{tuple(warped.shape)} features differ in shape")
        cosine = F.cosine_similarity(fixed, warped, dim=1, eps=_EPS)[:, None]
        if weight is None:
            similarities.append(cosine.mean())
        else:
            similarities.append((cosine * weight).sum() / weight.sum().clamp_min(_EPS))
    return 1 - torch.stack(similarities).mean()


@dataclass(frozen=True)
class FeatureExtractor:
    """A frozen network seen as a list of feature maps.

    Attributes:
        features: HU ``(N, 1, D, H, W)`` -> one ``(N, C_l, ceil(D / 2**h_l), ...)`` map per level.
        halvings: ``h_l`` per level: level ``l`` lies on the input grid halved ``h_l`` times
            (:func:`~SAMERegistrationLib.networks.unet.half_grid`).
        module: the network (frozen by :func:`frozen_extractor`).
    """

    features: Callable[[Tensor], list[Tensor]]
    halvings: tuple[int, ...]
    module: nn.Module


def frozen_extractor(module: nn.Module, features: Callable[[Tensor], Sequence[Tensor]],
                     halvings: Sequence[int]) -> FeatureExtractor:
    """Puts ``module`` in eval mode with ``requires_grad`` off and wraps it."""
    module.eval().requires_grad_(False)
    return FeatureExtractor(lambda hu: list(features(hu)), tuple(halvings), module)


class DeepSimSimilarity:
    """DeepSim of a :class:`PairBatch` for one extractor: ``term(pair, warped, displacement)``.

    The fixed features and the per-level body weights of the last pair are kept (the pair is
    recognised by its ``fixed_hu`` tensor), so iterating on one pair embeds the fixed image once.
    """

    def __init__(self, extractor: Callable[[], FeatureExtractor]) -> None:
        self._extractor = extractor
        self._cache: tuple[Tensor, list[Tensor], list[Tensor]] | None = None

    def fixed_features(self, pair: PairBatch) -> tuple[list[Tensor], list[Tensor]]:
        """The fixed image's features and each level's weight (``pair.weight`` resampled)."""
        if self._cache is not None and self._cache[0] is pair.fixed_hu:
            return self._cache[1], self._cache[2]
        extractor = self._extractor()
        with torch.no_grad():
            features = extractor.features(pair.fixed_hu)
            weights = [resample_batch(pair.weight, pair.grid, level_grid(pair.grid, halvings))
                       for halvings in extractor.halvings]
        self._cache = (pair.fixed_hu, features, weights)
        return features, weights

    def __call__(self, pair: PairBatch, warped: Tensor, displacement: Tensor) -> Tensor:
        """DeepSim of ``pair.fixed_hu`` and ``pair.moving_hu`` warped by ``displacement``
        ``(N, 3, D, H, W)`` (LPS mm on ``pair.grid``); ``warped`` (the registration channel) is unused.

        Raises:
            ValueError: the pair has no HU images (not CT).
        """
        if pair.fixed_hu is None or pair.moving_hu is None:
            raise ValueError("the DeepSim similarities need CT images in HU (the feature networks are trained on CT)")
        fixed, weights = self.fixed_features(pair)
        moving = self._extractor().features(warp_batch(pair.moving_hu, pair.grid, displacement))
        return deepsim(fixed, moving, weights)


def level_grid(grid: Grid, halvings: int) -> Grid:
    """``grid`` halved ``halvings`` times (the grid of a stride ``2**halvings`` feature map)."""
    for _ in range(halvings):
        grid = half_grid(grid)
    return grid


@lru_cache(maxsize=1)
def segmentation_extractor() -> FeatureExtractor:
    """The shipped segmentation U-Net's encoder stages (loaded once, on first use)."""
    from ..segmentation.network import load_segmentation

    model = load_segmentation()
    return frozen_extractor(model, model.encode, model.feature_halvings)


@lru_cache(maxsize=1)
def sam_extractor() -> FeatureExtractor:
    """The shipped SAM network's local (stride 2) and global (stride 8) embeddings."""
    from ..sam.embedding import load_sam
    from ..sam.network import sam_intensity

    model = load_sam()
    return frozen_extractor(model, lambda hu: model(sam_intensity(hu, model.config)), (1, 3))


def deepsim_term(settings: object) -> DeepSimSimilarity:
    """Factory of the ``deepsim`` similarity term (segmentation U-Net features)."""
    return DeepSimSimilarity(segmentation_extractor)


def deepsim_sam_term(settings: object) -> DeepSimSimilarity:
    """Factory of the ``deepsim-sam`` similarity term (SAM embeddings)."""
    return DeepSimSimilarity(sam_extractor)
