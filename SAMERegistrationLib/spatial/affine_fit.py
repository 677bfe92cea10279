"""Fitting affine transforms to point correspondences (plain and robust to wrong matches)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def fit_affine(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares 4x4 affine ``A`` with ``target ~ A @ source`` (points ``(N, 3)``, N >= 4).

    Raises:
        ValueError: fewer than 4 points, or points that do not span 3-D (all on a plane).
    """
    source, target = np.asarray(source, float), np.asarray(target, float)
    if len(source) < 4 or source.shape != target.shape:
        raise ValueError(f"fit_affine(): need >= 4 matching (N, 3) points, got {source.shape} and {target.shape}")
    homogeneous = np.hstack([source, np.ones((len(source), 1))])
    w = np.ones(len(source)) if weights is None else np.asarray(weights, float)
    sqrt_w = np.sqrt(w)[:, None]
    if np.linalg.matrix_rank(homogeneous * sqrt_w, tol=1e-6 * max(1.0, np.abs(source).max())) < 4:
        raise ValueError("fit_affine(): the points are degenerate (coplanar or repeated)")
    solution, *_ = np.linalg.lstsq(homogeneous * sqrt_w, target * sqrt_w, rcond=None)
    matrix = np.eye(4)
    matrix[:3, :] = solution.T
    return matrix


@dataclass(frozen=True)
class RobustAffine:
    """A RANSAC affine: the 4x4 ``matrix``, the ``inliers`` mask ``(N,)`` and the inliers' residual
    ``rms_mm`` after the final least-squares refit on them."""

    matrix: np.ndarray
    inliers: np.ndarray
    rms_mm: float


def ransac_affine(source: np.ndarray, target: np.ndarray, threshold_mm: float = 10.0, iterations: int = 500,
                  seed: int = 0) -> RobustAffine:
    """Affine ``target ~ A @ source`` robust to wrong matches.

    Random minimal samples of 4 points give candidate affines; the one with most points within
    ``threshold_mm`` wins, then least squares is refit on its inliers (twice, re-selecting inliers).
    """
    source, target = np.asarray(source, float), np.asarray(target, float)
    rng = np.random.default_rng(seed)
    best = np.zeros(len(source), bool)
    for _ in range(iterations):
        sample = rng.choice(len(source), 4, replace=False)
        try:
            candidate = fit_affine(source[sample], target[sample])
        except (ValueError, np.linalg.LinAlgError):
            continue
        inliers = _residuals(candidate, source, target) < threshold_mm
        if inliers.sum() > best.sum():
            best = inliers
    if best.sum() < 4:
        raise ValueError("ransac_affine(): no consistent set of 4 or more matches")
    matrix = fit_affine(source[best], target[best])
    for _ in range(2):
        inliers = _residuals(matrix, source, target) < threshold_mm
        if inliers.sum() >= 4:
            best = inliers
            matrix = fit_affine(source[best], target[best])
    rms = float(np.sqrt(np.mean(_residuals(matrix, source[best], target[best]) ** 2)))
    return RobustAffine(matrix, best, rms)


def _residuals(matrix: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.linalg.norm(source @ matrix[:3, :3].T + matrix[:3, 3] - target, axis=1)
