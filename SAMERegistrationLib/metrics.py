"""Overlap metrics between label maps on the same grid."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def dice_per_label(fixed_labels: torch.Tensor, warped_labels: torch.Tensor,
                   labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice coefficient ``2|A n B| / (|A| + |B|)`` per label.

    Args:
        fixed_labels, warped_labels: integer tensors of the same shape (usually ``(D, H, W)``).
        labels: the label values to score, e.g. those present in both the fixed and the *moving*
            label maps, so that a structure lost by the warp scores 0 instead of disappearing from
            the mean. Default: non-zero values present in both given maps.

    Returns:
        ``{label value: Dice}`` sorted by label value (0.0 where a label is absent from both maps).
        Label values are assumed to mean the same structure in both maps.
    """
    if fixed_labels.shape != warped_labels.shape:
        raise ValueError(f"dice_per_label(): shapes differ: {tuple(fixed_labels.shape)} vs {tuple(warped_labels.shape)}")
    if labels is None:
        labels = set(torch.unique(fixed_labels).tolist()) & set(torch.unique(warped_labels).tolist()) - {0}
    scores = {}
    for value in sorted(int(v) for v in labels):
        a, b = fixed_labels == value, warped_labels == value
        total = int(a.sum() + b.sum())
        scores[value] = float(2.0 * (a & b).sum() / total) if total else 0.0
    return scores


def shared_labels(*label_maps: torch.Tensor) -> set[int]:
    """Non-zero label values present in every one of the given maps."""
    sets = [set(torch.unique(m).tolist()) for m in label_maps]
    return set.intersection(*sets) - {0}
