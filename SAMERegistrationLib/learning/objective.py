"""The loss of every learned stage, in training and in instance optimisation.

``loss = sum_k w_k * similarity_k + regulariser_weight * regulariser(field) + dice_weight * Dice``

Similarities are chosen by a spec string: a name, or a weighted sum such as ``"lncc+0.1*sam"`` or
``"0.5*ncc+0.5*mi"``. Names: ``ssd``, ``ncc``, ``lncc`` (local NCC), ``mi`` (mutual information) on
the registration channels, and ``sam`` (1 - cosine of the fixed and the warped moving SAM
embeddings, which needs ``pair.features["sam"]``), ``deepsim`` and ``deepsim-sam`` (frozen
segmentation-U-Net or SAM features of the fixed and the warped moving HU, :mod:`..losses.deepsim`).
More terms can be added with :func:`register_similarity`. Image terms are weighted by ``pair.weight`` (the body), so air
outside the body and regions without moving data do not count.

The regulariser (``diffusion``, ``tv`` or ``bending``) acts on the field the method optimises (a
velocity or a displacement, on its own grid), weighted 1 inside the fixed body and
``outside_body_weight`` outside, so the field stays tame in the air around the patient.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..losses import REGULARIZERS, mutual_information, ncc, soft_dice, ssd
from ..losses.deepsim import deepsim_sam_term, deepsim_term
from ..losses.similarity import local_ncc
from ..spatial.fields import resample_batch, warp_batch
from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points
from .pairs import PairBatch

SimilarityTerm = Callable[[PairBatch, torch.Tensor, torch.Tensor], torch.Tensor]
"""``term(pair, warped, displacement) -> 0-dim loss``: ``warped`` is the moving registration
channel warped by ``displacement`` ``(N, 3, D, H, W)`` (LPS mm on ``pair.grid``)."""


@dataclass(frozen=True)
class ObjectiveSettings:
    """Settings of a :class:`RegistrationObjective` (lengths in mm).

    Attributes:
        similarity: similarity spec, e.g. ``"lncc+0.1*sam"``.
        regulariser: ``diffusion``, ``tv`` or ``bending``.
        regulariser_weight: weight of the regulariser.
        dice_weight: weight of the soft Dice of warped labels (used when the pair has labels).
        lncc_window_mm: local NCC window edge (an odd voxel count on the pair's grid).
        outside_body_weight: regulariser weight outside the fixed body, relative to inside.
    """

    similarity: str = "lncc+0.1*sam"
    regulariser: str = "diffusion"
    regulariser_weight: float = 1.0
    dice_weight: float = 1.0
    lncc_window_mm: float = 18.0
    outside_body_weight: float = 0.1


_SIMILARITY_FACTORIES: dict[str, Callable[[ObjectiveSettings], SimilarityTerm]] = {}


def register_similarity(name: str, factory: Callable[[ObjectiveSettings], SimilarityTerm]) -> None:
    """Makes ``name`` usable in similarity specs; ``factory(settings)`` builds the term."""
    _SIMILARITY_FACTORIES[name] = factory


def similarity_names() -> list[str]:
    """The names a similarity spec may use."""
    return sorted(_SIMILARITY_FACTORIES)


def parse_similarity(spec: str) -> list[tuple[float, str]]:
    """``"lncc+0.1*sam"`` -> ``[(1.0, "lncc"), (0.1, "sam")]``.

    Raises:
        ValueError: a part is not ``[weight*]name`` with a registered name and a positive, finite
            weight.
    """
    terms = []
    for part in spec.replace(" ", "").split("+"):
        match = re.fullmatch(r"(?:([0-9.eE-]+)\*)?([a-z][a-z0-9-]*)", part)
        if match is None:
            raise ValueError(f"similarity {spec!r}: cannot read {part!r}: write e.g. 'lncc' or 'lncc+0.1*sam'")
        try:
            weight = float(match.group(1)) if match.group(1) else 1.0
        except ValueError:
            raise ValueError(f"similarity {spec!r}: cannot read the weight {match.group(1)!r}: write a number "
                             "such as 0.1") from None
        name = match.group(2)
        if name not in _SIMILARITY_FACTORIES:
            raise ValueError(f"similarity {spec!r}: unknown term {name!r}: choose from {', '.join(similarity_names())}")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"similarity {spec!r}: the weight of {name!r} must be a positive finite number, "
                             f"got {weight:g}")
        terms.append((weight, name))
    return terms


class RegistrationObjective:
    """Callable loss of a residual displacement on a :class:`PairBatch`.

    Args:
        settings: what to compute (see :class:`ObjectiveSettings`).
    """

    def __init__(self, settings: ObjectiveSettings = ObjectiveSettings()) -> None:
        if settings.regulariser not in REGULARIZERS:
            raise ValueError(f"regulariser {settings.regulariser!r}: choose from {', '.join(sorted(REGULARIZERS))}")
        self.settings = settings
        self.terms = [(weight, name, _SIMILARITY_FACTORIES[name](settings))
                      for weight, name in parse_similarity(settings.similarity)]

    @property
    def needs_sam(self) -> bool:
        return any(name == "sam" for _, name, _ in self.terms)

    def __call__(self, pair: PairBatch, displacement: torch.Tensor, regularised: torch.Tensor | None = None,
                 regularised_grid: Grid | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and its parts.

        Args:
            pair: the images.
            displacement: ``(N, 3, D, H, W)`` LPS mm on ``pair.grid``: ``moving(x + u(x))``.
            regularised: the field the method optimises (velocity or displacement) ``(N, 3, ...)``
                on ``regularised_grid``; default: ``displacement`` itself.

        Returns:
            ``(loss, parts)``: a 0-dim tensor and the value of each term (unweighted).
        """
        if regularised is None:
            regularised, regularised_grid = displacement, pair.grid
        warped = pair.warp_moving(displacement)
        parts: dict[str, float] = {}
        loss = displacement.new_zeros(())
        for weight, name, term in self.terms:
            value = term(pair, warped, displacement)
            parts[name] = value.item()
            loss = loss + weight * value
        body = pair.weight if regularised_grid == pair.grid else resample_batch(pair.weight, pair.grid, regularised_grid)
        region = self.settings.outside_body_weight + (1 - self.settings.outside_body_weight) * (body > 0.5).float()
        smoothness = REGULARIZERS[self.settings.regulariser](regularised, regularised_grid.spacing, weight=region)
        parts[self.settings.regulariser] = smoothness.item()
        loss = loss + self.settings.regulariser_weight * smoothness
        if self.settings.dice_weight > 0 and pair.fixed_labels is not None and pair.moving_labels is not None:
            dice = label_dice_loss(pair, displacement)
            parts["dice"] = dice.item()
            loss = loss + self.settings.dice_weight * dice
        return loss, parts


def label_dice_loss(pair: PairBatch, displacement: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss of the moving labels warped by ``displacement`` (one-hot, trilinear) against
    the fixed labels, over the labels present in both images of the batch."""
    shared = sorted(set(torch.unique(pair.fixed_labels).tolist()) & set(torch.unique(pair.moving_labels).tolist()) - {0})
    if not shared:
        return displacement.new_zeros(())
    values = torch.tensor(shared, device=displacement.device).view(1, -1, 1, 1, 1)
    fixed = (pair.fixed_labels == values).float()
    moving = warp_batch((pair.moving_labels == values).float(), pair.grid, displacement)
    return soft_dice(fixed, moving, exclude_background=False)


def sam_similarity(pair: PairBatch, displacement: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of the fixed SAM embeddings and the moving ones warped by ``displacement``,
    averaged over the fixed body on the embeddings' grid (``pair.features["sam"]``).

    Only the embedding voxels of non-zero weight are sampled: the others do not count, and on CT
    most of a scan's box is air (70 % of the bundled demo's), so warping the whole 64-channel map
    would spend most of the stage's trilinear samples on nothing. The features are unit vectors
    (:func:`..sam.features.sam_features`), so the cosine is the dot product divided by the warped
    vector's norm alone (interpolation shortens it).
    """
    if "sam" not in pair.features:
        raise ValueError("the 'sam' similarity needs SAM embeddings of the pair (CT images and SAM weights)")
    features = pair.features["sam"]
    on_pair_grid = features.grid == pair.grid
    weight = pair.weight if on_pair_grid else resample_batch(pair.weight, pair.grid, features.grid)
    centres = features.grid.world_points(dtype=displacement.dtype, device=displacement.device)
    weighted_cosine, total_weight = displacement.new_zeros(()), displacement.new_zeros(())
    for n in range(displacement.shape[0]):
        counted = weight[n, 0] > 0                                               # (d, h, w)
        points = centres[counted]                                                # (P, 3) LPS mm
        if on_pair_grid:
            shift = displacement[n][:, counted]                                  # (3, P) LPS mm
        else:
            shift = sample_at_points(displacement[n], pair.grid, points, padding="border")
        warped = sample_at_points(features.moving[n], features.grid, points + shift.T, padding="border")  # (C, P)
        cosine = (features.fixed[n][:, counted] * warped).sum(dim=0) / warped.norm(dim=0).clamp_min(1e-6)
        weighted_cosine = weighted_cosine + (cosine * weight[n, 0][counted]).sum()
        total_weight = total_weight + weight[n, 0][counted].sum()
    return 1 - weighted_cosine / total_weight.clamp_min(1e-6)


def _lncc_term(settings: ObjectiveSettings) -> SimilarityTerm:
    def term(pair: PairBatch, warped: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        voxels = max(3, int(round(settings.lncc_window_mm / pair.grid.spacing[0])))
        return local_ncc(pair.fixed, warped, voxels if voxels % 2 else voxels + 1, mask=pair.weight)
    return term


def _image_term(function) -> Callable[[ObjectiveSettings], SimilarityTerm]:
    def factory(settings: ObjectiveSettings) -> SimilarityTerm:
        return lambda pair, warped, displacement: function(pair.fixed, warped, mask=pair.weight)
    return factory


register_similarity("ssd", _image_term(ssd))
register_similarity("ncc", _image_term(ncc))
register_similarity("mi", _image_term(mutual_information))
register_similarity("lncc", _lncc_term)
register_similarity("sam", lambda settings: lambda pair, warped, displacement: sam_similarity(pair, displacement))
register_similarity("deepsim", deepsim_term)
register_similarity("deepsim-sam", deepsim_sam_term)
