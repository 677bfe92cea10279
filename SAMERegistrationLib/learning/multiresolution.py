"""Deep self-supervision: one loss over displacements predicted at several resolutions.

Li & Fan ("Non-rigid image registration using self-supervised fully convolutional networks without
training data", ISBI 2018) regress a displacement at three resolutions and add the similarity loss
of each, weighted 1, 0.6, 0.3 (finest first): the coarse outputs get a direct training signal.

Here each output ``u_l`` ``(N, 3, d_l, h_l, w_l)`` (LPS mm on its grid ``g_l``) is resampled
trilinearly onto the pair's grid (mm values need no rescaling), scored there by the
:class:`RegistrationObjective` (similarity, Dice), and regularised on its own grid:

``loss = sum_l w_l * objective(pair, resample(u_l -> pair.grid), regularised=u_l on g_l)``

Any network with one or more displacement outputs can use it (one output, weight 1: the plain
objective).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..spatial.fields import resample_batch
from ..spatial.grid import Grid
from .objective import RegistrationObjective
from .pairs import PairBatch

LI_FAN_WEIGHTS = (1.0, 0.6, 0.3)
"""Weights of the finest, middle and coarsest output in Li & Fan."""


def multiresolution_loss(objective: RegistrationObjective, pair: PairBatch,
                         displacements: Sequence[tuple[torch.Tensor, Grid]],
                         weights: Sequence[float] = LI_FAN_WEIGHTS) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the objective at every resolution.

    Args:
        objective: the loss of one displacement on the pair.
        pair: the images, on ``pair.grid``.
        displacements: ``(u_l, g_l)`` per resolution, finest first: ``u_l`` ``(N, 3, ...)`` LPS mm
            on grid ``g_l`` (the pair's grid or a coarser one covering the same region).
        weights: ``w_l``, one per displacement; a 0 weight skips that output.

    Returns:
        ``(loss, parts)``: the 0-dim loss, and each level's parts as ``"<part>@<l>"`` plus the
        level's total as ``"loss@<l>"`` (level 0 = finest).

    Raises:
        ValueError: the numbers of displacements and weights differ, or a weight is negative.
    """
    if len(displacements) != len(weights):
        raise ValueError(f"multiresolution_loss(): {len(displacements)} displacements but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"multiresolution_loss(): weights must be >= 0, got {tuple(weights)}")
    loss = pair.fixed.new_zeros(())
    parts: dict[str, float] = {}
    for level, ((displacement, grid), weight) in enumerate(zip(displacements, weights)):
        if weight == 0:
            continue
        on_pair = displacement if grid == pair.grid else resample_batch(displacement, grid, pair.grid)
        value, level_parts = objective(pair, on_pair, regularised=displacement, regularised_grid=grid)
        loss = loss + weight * value
        parts.update({f"{name}@{level}": v for name, v in level_parts.items()})
        parts[f"loss@{level}"] = value.item()
    return loss, parts
