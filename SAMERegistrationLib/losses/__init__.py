"""Registration losses: image similarity terms and displacement-field regularisers.

Conventions: images are (N, C, D, H, W); displacement fields are (N, 3, D, H, W)
in mm with channels (x, y, z) = along (W, H, D); ``spacing`` is (x, y, z) in mm.
Every function returns a 0-dim differentiable loss (lower is better).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor

from .lddmm import lddmm_energy, lddmm_operator
from .regularizers import bending_energy, diffusion, total_variation
from .similarity import local_ncc, mutual_information, ncc, soft_dice, ssd

SIMILARITY_LOSSES: dict[str, Callable[..., Tensor]] = {
    "ssd": ssd,
    "ncc": ncc,
    "lncc": local_ncc,
    "mi": mutual_information,
}

REGULARIZERS: dict[str, Callable[..., Tensor]] = {
    "diffusion": diffusion,
    "tv": total_variation,
    "bending": bending_energy,
}


def similarity_loss(name: str, **options) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """Return ``loss(fixed, warped, mask=None)`` for a registered similarity.

    Args:
        name: One of the keys of :data:`SIMILARITY_LOSSES` ("ssd", "ncc", "lncc", "mi").
        **options: Keyword arguments bound to the loss, e.g. ``window=5`` for "lncc".

    Returns:
        A callable taking (fixed, warped, mask=None) and returning a 0-dim loss.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the valid names).
        TypeError: if ``options`` are not parameters of the chosen loss.
    """
    if name not in SIMILARITY_LOSSES:
        raise ValueError(
            f"similarity_loss(): unknown 'name' {name!r}, expected one of {sorted(SIMILARITY_LOSSES)}"
        )
    function = SIMILARITY_LOSSES[name]
    inspect.signature(function).bind_partial(**options)

    def loss(fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        return function(fixed, warped, mask=mask, **options)

    return loss


__all__ = [
    "REGULARIZERS",
    "SIMILARITY_LOSSES",
    "bending_energy",
    "diffusion",
    "lddmm_energy",
    "lddmm_operator",
    "local_ncc",
    "mutual_information",
    "ncc",
    "similarity_loss",
    "soft_dice",
    "ssd",
    "total_variation",
]
