"""The two TVF losses, shared by training and test-time instance optimisation.

* ``tvf`` (TM-TVF): similarity (default body-masked local NCC) + Dice of warped labels when the pair
  has them + ``diffusion_weight`` x diffusion of the final displacement ``u_T`` (on the half grid,
  weighted less outside the body), via :class:`..learning.objective.RegistrationObjective`.
* ``tvf-lddmm`` (TM-TVF-LDDMM): the same similarity and Dice + ``lddmm_weight`` x
  ``sum_t ||L v_t||^2`` with ``L = (-alpha Laplacian + gamma)^beta`` (:mod:`..losses.lddmm`, mm
  units). The diffusion of ``u_T`` is still reported (unweighted, not added) so both variants log the
  same smoothness number.

``L`` in mm units is a weak operator (``gamma^(2 beta) = 1e-12`` for the paper's values), hence the
large default ``lddmm_weight``: with it the LDDMM term of a rough (voxel-scale) field is about twice
the diffusion term of the ``tvf`` loss, while smooth fields are penalised less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..learning.objective import ObjectiveSettings, RegistrationObjective
from ..learning.pairs import PairBatch
from ..losses import lddmm_energy
from .network import TVFPrediction

LOSSES = ("tvf", "tvf-lddmm")


@dataclass(frozen=True)
class TVFLossSettings:
    """Which TVF loss and its weights.

    Attributes:
        loss: "tvf" or "tvf-lddmm".
        similarity: similarity spec of :class:`RegistrationObjective` (e.g. "lncc", "lncc+0.1*sam").
        dice_weight: weight of the soft Dice (pairs with labels only).
        diffusion_weight: weight of the diffusion of ``u_T`` in the ``tvf`` loss.
        lddmm_weight: weight of ``sum_t ||L v_t||^2`` (mm^2) in the ``tvf-lddmm`` loss.
        alpha, gamma, beta: the LDDMM operator (mm^2, 1, 1; the paper's values).
    """

    loss: str = "tvf"
    similarity: str = "lncc"
    dice_weight: float = 1.0
    diffusion_weight: float = 1.0
    lddmm_weight: float = 2e9
    alpha: float = 0.01
    gamma: float = 0.001
    beta: float = 2.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"TVFLossSettings: 'loss' must be one of {LOSSES}, got {self.loss!r}")


class TVFObjective:
    """``objective(pair, prediction) -> (loss, parts)`` for either TVF loss.

    Parts are unweighted, except ``lddmm_weighted`` (``lddmm_weight x sum_t ||L v_t||^2``: the raw
    energy, about 1e-12 mm^2, would print as 0).
    """

    def __init__(self, settings: TVFLossSettings = TVFLossSettings()) -> None:
        self.settings = settings
        lddmm = settings.loss == "tvf-lddmm"
        self.objective = RegistrationObjective(ObjectiveSettings(
            similarity=settings.similarity, regulariser="diffusion",
            regulariser_weight=0.0 if lddmm else settings.diffusion_weight, dice_weight=settings.dice_weight))

    @property
    def needs_sam(self) -> bool:
        return self.objective.needs_sam

    def __call__(self, pair: PairBatch, prediction: TVFPrediction) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``prediction`` on ``pair`` and its parts (unweighted)."""
        grid = prediction.velocity_grid
        loss, parts = self.objective(pair, prediction.displacement, prediction.final, grid)
        settings = self.settings
        if settings.loss == "tvf-lddmm":
            # time-major batch (T x N): the mean over it, times T, is sum_t of the mean over samples
            steps = len(prediction.velocities)
            energy = steps * lddmm_energy(torch.cat(prediction.velocities), grid.spacing, alpha=settings.alpha,
                                          gamma=settings.gamma, beta=settings.beta)
            term = settings.lddmm_weight * energy
            parts["lddmm_weighted"] = term.item()
            loss = loss + term
        return loss, parts
