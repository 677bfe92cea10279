"""Dice per label, against hand-counted overlaps."""

import pytest
import torch

from SAMERegistrationLib.metrics import dice_per_label, shared_labels


def test_dice_of_two_offset_cubes_matches_the_hand_count():
    fixed = torch.zeros((6, 6, 6), dtype=torch.int64)
    warped = torch.zeros_like(fixed)
    fixed[0:2, 0:2, 0:2] = 3            # 8 voxels
    warped[1:3, 0:2, 0:2] = 3           # 8 voxels, 4 shared
    assert dice_per_label(fixed, warped) == {3: pytest.approx(2 * 4 / 16)}


def test_a_label_lost_by_the_warp_scores_zero_when_asked_for():
    fixed = torch.zeros((4, 4, 4), dtype=torch.int64)
    fixed[0, 0, 0], fixed[3, 3, 3] = 1, 2
    warped = torch.zeros_like(fixed)
    warped[0, 0, 0] = 1
    assert dice_per_label(fixed, warped) == {1: 1.0}                # default: labels in both maps
    assert dice_per_label(fixed, warped, labels={1, 2}) == {1: 1.0, 2: 0.0}


def test_shared_labels_ignore_background():
    a = torch.tensor([0, 1, 2, 5])
    b = torch.tensor([0, 2, 5, 7])
    assert shared_labels(a, b) == {2, 5}


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_label(torch.zeros(2, 2, 2), torch.zeros(2, 2, 3))
