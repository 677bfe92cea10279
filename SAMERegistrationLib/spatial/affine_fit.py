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


@dataclass(frozen=True)
class AnatomicalAffineRange:
    """What an affine between two scans of adult anatomy may look like (fixed -> moving, LPS mm).

    A fit outside these ranges is not a body-to-body mapping but an artefact of wrong matches
    (e.g. 37 inliers of 570 matches with a 37 % volume change). Scales are the singular values of
    the linear part, so a rotation does not count as a scale.

    Attributes:
        min_inliers: fewest inliers a fit of 12 parameters may rest on.
        min_inlier_share: smallest fraction of the matches that must agree with the fit.
        max_inlier_rms_mm: largest root-mean-square residual of the inliers.
        scale_range: per-axis scale range.
        determinant_range: volume-change range (a reflection has a negative determinant).
    """

    min_inliers: int = 20
    min_inlier_share: float = 0.25
    max_inlier_rms_mm: float = 6.0
    scale_range: tuple[float, float] = (0.75, 1.33)
    determinant_range: tuple[float, float] = (0.6, 1.6)

    def problems(self, fit: RobustAffine) -> list[str]:
        """Why ``fit`` is implausible (empty when it is plausible), as short phrases for a message."""
        inliers, matches = int(fit.inliers.sum()), len(fit.inliers)
        linear = fit.matrix[:3, :3]
        determinant = float(np.linalg.det(linear))
        scales = np.linalg.svd(linear, compute_uv=False)
        found = []
        if inliers < self.min_inliers:
            found.append(f"{inliers} inliers (need {self.min_inliers})")
        if inliers < self.min_inlier_share * matches:
            found.append(f"only {inliers} of {matches} matches agree ({100 * inliers / max(matches, 1):.0f} %, "
                         f"need {100 * self.min_inlier_share:.0f} %)")
        if fit.rms_mm > self.max_inlier_rms_mm:
            found.append(f"inlier RMS {fit.rms_mm:.1f} mm (at most {self.max_inlier_rms_mm:g})")
        if determinant <= 0:
            found.append(f"a reflection (determinant {determinant:.2f})")
        elif not self.determinant_range[0] <= determinant <= self.determinant_range[1]:
            found.append(f"determinant {determinant:.2f} (allowed {self.determinant_range[0]:g}-"
                         f"{self.determinant_range[1]:g})")
        if scales.min() < self.scale_range[0] or scales.max() > self.scale_range[1]:
            found.append(f"axis scales {scales.min():.2f}-{scales.max():.2f} (allowed {self.scale_range[0]:g}-"
                         f"{self.scale_range[1]:g})")
        return found
