"""Test-time instance optimisation: continuing the optimisation on the one pair being registered.

Every learned stage ends with the same loop: whatever the method optimises (a velocity field
initialised from the network's prediction, a set of time-dependent velocities, or the network's
own weights) is refined with Adam on the pair's loss for a number of iterations. The loop reports
progress (which is also where a cancel request stops it) and returns the loss before and after, so
the stage can report the improvement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..pipeline.progress import Progress

Objective = Callable[[], tuple[torch.Tensor, dict[str, float]]]
"""Computes the current loss (0-dim, differentiable in the parameters) and its parts."""


@dataclass(frozen=True)
class RefinementReport:
    """Loss parts at the first and after the last iteration of a refinement."""

    iterations: int
    before: dict[str, float]
    after: dict[str, float]
    loss_before: float
    loss_after: float

    def summary(self) -> dict[str, object]:
        """Numbers for the run summary."""
        return {"iterations": self.iterations, "loss_before": round(self.loss_before, 5),
                "loss_after": round(self.loss_after, 5),
                "parts_before": {k: round(v, 5) for k, v in self.before.items()},
                "parts_after": {k: round(v, 5) for k, v in self.after.items()}}


def refine(parameters: Iterable[torch.Tensor], objective: Objective, iterations: int, learning_rate: float,
           progress: Progress | None = None, fraction_range: tuple[float, float] = (0.0, 1.0),
           description: str = "refining") -> RefinementReport:
    """Adam on ``objective`` over ``parameters`` (tensors with ``requires_grad`` or module
    parameters), in place.

    Args:
        parameters: what is optimised.
        objective: the loss of the current parameters.
        iterations: optimiser steps (0 only evaluates the loss).
        learning_rate: Adam step size, in the parameters' units (mm for fields).
        progress: reports ``fraction_range`` linearly over the iterations and stops on cancel.

    Returns:
        the loss before the first and after the last step.
    """
    parameters = list(parameters)
    optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    loss, parts = objective()
    loss_before, before = loss.item(), parts
    start, end = fraction_range
    for iteration in range(iterations):
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss, parts = objective()
        if progress is not None:
            progress.update(start + (end - start) * (iteration + 1) / iterations,
                            f"{description}, iteration {iteration + 1} of {iterations}, loss {loss.item():.4f}")
    return RefinementReport(iterations, before, parts, loss_before, loss.item())
