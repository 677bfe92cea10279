"""Accuracy and regularity of one registration result, computed identically for every method.

Every method's result arrives as a displacement field on the prepared fixed grid (LPS mm, fixed
point ``x`` -> moving point ``x + u(x)``), wrapped as ``SpatialTransform(eye(4), u, fixed grid)``:

* Dice per label and mean: the moving labels warped onto the fixed grid by nearest neighbour
  (:func:`resample_labels`), scored with :func:`dice_per_label` over the labels present in both the
  fixed and the moving label maps (a label the warp loses scores 0).
* HD95 per label (mm): :func:`hd95_mm`; the mean is over labels present in both the fixed and the
  warped map (a lost label has no surface to measure and is left out of that mean).
* Target registration error (mm): the pair's ground-truth error function (known deformation or
  landmarks), median and 90th percentile.
* Jacobian: :func:`jacobian_determinant` of the field (physical units, direction honoured), inside
  the fixed body mask: % of voxels with J <= 0, and std(log J) over the voxels with J > 0 (the
  folded voxels are counted by the first number and left out of the logarithm; plain log J, not
  Learn2Reg's log(J + 3)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from SAMERegistrationLib.metrics import dice_per_label, shared_labels
from SAMERegistrationLib.spatial.jacobian import jacobian_determinant, jacobian_statistics
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_labels

from .pairs import PreparedPair


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one result.

    Attributes:
        summary: ``labels`` (count), ``mean_dice``, ``mean_hd95_mm``, ``tre_median_mm``,
            ``tre_p90_mm``, ``tre_points``, ``percent_nonpositive_jacobian``, ``std_log_jacobian``;
            NaN where the pair lacks what a metric needs.
        per_label: one ``{label, name, dice, hd95_mm}`` dict per scored label.
    """

    summary: dict[str, float | int]
    per_label: list[dict]


def evaluate(pair: PreparedPair, displacement: torch.Tensor) -> Evaluation:
    """All metrics of a displacement field ``(3, D, H, W)`` (LPS mm) on ``pair.fixed.grid``."""
    grid = pair.fixed.grid
    transform = SpatialTransform(np.eye(4), displacement, grid)
    summary: dict[str, float | int] = {"labels": 0, "mean_dice": math.nan, "mean_hd95_mm": math.nan,
                                       "tre_median_mm": math.nan, "tre_p90_mm": math.nan, "tre_points": 0}
    per_label: list[dict] = []
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        warped = resample_labels(pair.moving_labels, grid, transform).data
        labels = shared_labels(pair.fixed_labels.data, pair.moving_labels.data)
        dice = dice_per_label(pair.fixed_labels.data, warped, labels)
        spacing = grid.spacing[::-1]
        for label, score in dice.items():
            distance = hd95_mm(pair.fixed_labels.data == label, warped == label, spacing)
            per_label.append({"label": label, "name": pair.label_names.get(label, ""), "dice": score,
                              "hd95_mm": distance})
        distances = [row["hd95_mm"] for row in per_label if not math.isnan(row["hd95_mm"])]
        summary.update(labels=len(dice), mean_dice=float(np.mean(list(dice.values()))) if dice else math.nan,
                       mean_hd95_mm=float(np.mean(distances)) if distances else math.nan)
    if pair.error_mm is not None:
        error = pair.error_mm(transform).double()
        summary.update(tre_median_mm=float(error.median()), tre_p90_mm=float(torch.quantile(error, 0.9)),
                       tre_points=error.numel())
    statistics = jacobian_statistics(jacobian_determinant(displacement, grid), pair.fixed_body.data > 0)
    summary.update(percent_nonpositive_jacobian=statistics.percent_nonpositive,
                   std_log_jacobian=statistics.std_log_jacobian)
    return Evaluation(summary, per_label)


def hd95_mm(first: torch.Tensor, second: torch.Tensor, spacing_dhw: tuple[float, float, float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of two masks, in mm.

    A surface voxel is a mask voxel with at least one of its 6 face neighbours outside the mask
    (outside the array counts as outside). For each surface the distances from its voxel centres to
    the nearest voxel centre of the other surface are collected; the result is the larger of the two
    95th percentiles (as Learn2Reg's HD95, without surface-area weighting).

    Args:
        first, second: boolean masks ``(D, H, W)`` on the same grid.
        spacing_dhw: voxel size in mm along the array axes (D, H, W), i.e. ``grid.spacing[::-1]``.

    Returns:
        the distance in mm, or NaN when either mask is empty.
    """
    if first.shape != second.shape:
        raise ValueError(f"hd95_mm(): shapes differ: {tuple(first.shape)} vs {tuple(second.shape)}")
    if not bool(first.any()) or not bool(second.any()):
        return math.nan
    occupied = torch.nonzero(first | second)
    low, high = occupied.min(dim=0).values, occupied.max(dim=0).values + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    surfaces = [_surface(mask[box]) for mask in (first, second)]
    directed = (_distance_to(other, spacing_dhw)[surface] for surface, other in (surfaces, surfaces[::-1]))
    return float(max(torch.quantile(distances.double(), 0.95) for distances in directed))


def _surface(mask: torch.Tensor) -> torch.Tensor:
    """Mask voxels with a face neighbour outside the mask (the array's outside counts as outside)."""
    padded = F.pad(mask[None, None].float(), (1, 1, 1, 1, 1, 1))[0, 0].bool()
    interior = mask.clone()
    for dim in range(3):
        for start in (0, 2):
            index = [slice(1, -1)] * 3
            index[dim] = slice(start, start + mask.shape[dim])
            interior &= padded[tuple(index)]
    return mask & ~interior


def _distance_to(surface: torch.Tensor, spacing_dhw: tuple[float, float, float]) -> torch.Tensor:
    """Euclidean distance in mm from every voxel centre to the nearest voxel of ``surface``."""
    image = sitk.GetImageFromArray(surface.numpy().astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_dhw[::-1]))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    # Voxels of a surface thicker than one voxel get negative values: they are on the surface (0).
    return torch.from_numpy(sitk.GetArrayFromImage(distance)).clamp(min=0.0)
