"""Registering one pair with a trained FCN: its prediction, then continued optimisation.

Li & Fan's network can be refined on a new pair by continuing the optimisation of its weights on
that pair's multi-resolution loss. This is the shared test-time loop
(:func:`~SAMERegistrationLib.learning.instance_optimisation.refine`) run over a copy of the
network's parameters; the trained network itself is left unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..learning.instance_optimisation import RefinementReport, refine
from ..learning.multiresolution import LI_FAN_WEIGHTS, multiresolution_loss
from ..learning.objective import RegistrationObjective
from ..learning.pairs import PairBatch
from ..pipeline.progress import Progress
from .network import fcn_displacements


def register_pair(model: nn.Module, pair: PairBatch, objective: RegistrationObjective, iterations: int,
                  learning_rate: float = 1e-4, weights: Sequence[float] = LI_FAN_WEIGHTS,
                  progress: Progress | None = None) -> tuple[torch.Tensor, RefinementReport]:
    """The finest displacement after refining a copy of ``model`` on ``pair``.

    Args:
        model: a trained :class:`~SAMERegistrationLib.fcn.network.LiFanFCN` (not modified).
        pair: the images; the moving one already on the fixed grid.
        objective: the loss of the refinement (any similarity spec).
        iterations: Adam steps on the network's weights (0: the plain prediction).
        learning_rate: Adam step size of the weights.
        weights: multi-resolution loss weights, finest first.

    Returns:
        ``(displacement, report)``: ``(N, 3, D, H, W)`` LPS mm on ``pair.grid`` (no gradient) and the
        loss before and after.
    """
    network = copy.deepcopy(model).train()
    report = refine(network.parameters(),
                    lambda: multiresolution_loss(objective, pair, fcn_displacements(network, pair), weights),
                    iterations, learning_rate, progress, description="refining the FCN")
    with torch.no_grad():
        displacement = fcn_displacements(network.eval(), pair)[0][0]
    return displacement, report
