"""Overlap metrics between label maps on the same grid."""

from __future__ import annotations

import torch


def dice_per_label(fixed_labels: torch.Tensor, warped_labels: torch.Tensor) -> dict[int, float]:
    """Dice coefficient for every non-zero label value present in BOTH maps.

    Args:
        fixed_labels, warped_labels: integer tensors of the same shape (usually ``(D, H, W)``).

    Returns:
        ``{label value: 2|A n B| / (|A| + |B|)}``, sorted by label value. Label values are assumed to
        mean the same structure in both maps.
    """
    if fixed_labels.shape != warped_labels.shape:
        raise ValueError(f"dice_per_label(): shapes differ: {tuple(fixed_labels.shape)} vs {tuple(warped_labels.shape)}")
    common = set(torch.unique(fixed_labels).tolist()) & set(torch.unique(warped_labels).tolist())
    scores = {}
    for value in sorted(common - {0}):
        a, b = fixed_labels == value, warped_labels == value
        scores[int(value)] = float(2.0 * (a & b).sum() / (a.sum() + b.sum()))
    return scores
