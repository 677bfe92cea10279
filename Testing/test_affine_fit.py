"""Affine fitting to point matches: exact recovery, robustness to wrong matches, degenerate input."""

import numpy as np
import pytest

from SAMERegistrationLib.spatial.affine_fit import fit_affine, ransac_affine


def known_affine() -> np.ndarray:
    angle = np.deg2rad(12.0)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) @ np.diag([1.1, 0.95, 1.02])
    matrix[:3, 3] = [35.0, -120.0, 410.0]
    return matrix


def apply(matrix, points):
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def test_least_squares_recovers_an_exact_affine():
    points = np.random.default_rng(0).uniform(-150, 150, (40, 3))
    assert np.allclose(fit_affine(points, apply(known_affine(), points)), known_affine(), atol=1e-9)


def test_ransac_ignores_thirty_percent_wrong_matches_where_least_squares_does_not():
    rng = np.random.default_rng(1)
    points = rng.uniform(-150, 150, (200, 3))
    target = apply(known_affine(), points) + rng.normal(0, 1.0, (200, 3))     # 1 mm matching noise
    wrong = rng.choice(200, 60, replace=False)
    target[wrong] = rng.uniform(-300, 300, (60, 3))
    robust = ransac_affine(points, target, threshold_mm=5.0)
    plain = fit_affine(points, target)
    probe = rng.uniform(-150, 150, (500, 3))
    robust_error = np.linalg.norm(apply(robust.matrix, probe) - apply(known_affine(), probe), axis=1)
    plain_error = np.linalg.norm(apply(plain, probe) - apply(known_affine(), probe), axis=1)
    assert robust_error.max() < 1.5                      # measured ~0.5 mm
    assert plain_error.mean() > 20.0                     # the wrong matches ruin plain least squares
    assert set(np.flatnonzero(~robust.inliers)) >= set(wrong) - {i for i in wrong if np.linalg.norm(
        target[i] - apply(known_affine(), points[i])) < 5.0}


def test_degenerate_points_are_refused():
    flat = np.random.default_rng(2).uniform(-50, 50, (20, 3))
    flat[:, 2] = 0.0
    with pytest.raises(ValueError, match="degenerate"):
        fit_affine(flat, flat)
    with pytest.raises(ValueError, match="need >= 4"):
        fit_affine(flat[:3], flat[:3])
