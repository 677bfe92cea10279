"""The checks that keep the SAM stages from making a result worse: the anatomical plausibility of
an affine fitted to point matches, the choice between candidate transforms by one alignment score,
and the gate that keeps a deformation only where it improves the alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SAMERegistrationLib.io import read_image
from SAMERegistrationLib.pipeline.problem import RegistrationProblem
from SAMERegistrationLib.spatial.affine_fit import AnatomicalAffineRange, ransac_affine
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.stages.alignment_score import SimilarityMap, best_candidate, improvement_gate
from SAMERegistrationLib.synthetic import make_synthetic_pair, rotation_matrix

TORSO = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "patientA_torso_ct.nii.gz"


def body_points(count: int = 600, seed: int = 0) -> np.ndarray:
    """Random LPS points filling a torso-sized box (350 x 250 x 400 mm)."""
    return np.random.default_rng(seed).uniform((-175, -125, -200), (175, 125, 200), (count, 3))


def matched(points: np.ndarray, linear: np.ndarray, shift=(30.0, -20.0, 15.0), noise_mm: float = 2.0,
            seed: int = 1) -> np.ndarray:
    return points @ linear.T + np.asarray(shift) + np.random.default_rng(seed).normal(0, noise_mm, points.shape)


def test_a_plausible_fit_passes():
    points = body_points()
    linear = rotation_matrix((0.0, 3.0, 8.0)) @ np.diag([1.05, 0.95, 1.1])
    fit = ransac_affine(points, matched(points, linear))
    assert AnatomicalAffineRange().problems(fit) == []


def test_a_reflection_is_rejected():
    points = body_points()
    fit = ransac_affine(points, matched(points, np.diag([-1.0, 1.0, 1.0])))
    problems = AnatomicalAffineRange().problems(fit)
    assert any("reflection" in p for p in problems), problems


def test_a_fit_scaled_by_1_4_is_rejected():
    points = body_points()
    fit = ransac_affine(points, matched(points, 1.4 * np.eye(3)))
    problems = AnatomicalAffineRange().problems(fit)
    assert any("determinant 2.7" in p for p in problems) and any("axis scales" in p for p in problems), problems


def test_a_fit_to_mostly_mismatched_points_is_rejected():
    """Like the inter-patient failure seen in use: a few matches agree by chance, most do not."""
    points = body_points()
    moving = matched(points, np.eye(3))
    wrong = np.random.default_rng(2).permutation(len(points))[: int(0.9 * len(points))]
    moving[wrong] = body_points(len(wrong), seed=3)
    fit = ransac_affine(points, moving)
    problems = AnatomicalAffineRange().problems(fit)
    assert any("matches agree" in p for p in problems), problems


@pytest.fixture(scope="module")
def synthetic_problem():
    """The bundled torso under a known 6 degree rotation + 40 mm shift (no deformation field)."""
    torch.set_num_threads(2)
    pair = make_synthetic_pair(read_image(TORSO), rotation_deg=(0.0, 0.0, 6.0), scale=(1.0, 1.0, 1.0),
                               translation_mm=(40.0, -20.0, 10.0), field_amplitude_mm=0.0)
    return pair, RegistrationProblem(pair.fixed, pair.moving)


def test_the_choice_takes_the_better_aligning_candidate(synthetic_problem):
    pair, problem = synthetic_problem
    truth = np.linalg.inv(pair.psi.affine)                 # psi is the exact (affine) moving -> fixed map
    off = truth.copy()
    off[:3, 3] += (12.0, -8.0, 10.0)                       # the truth shifted by 18 mm
    for candidates in ({"off": off, "truth": truth}, {"truth": truth, "off": off}):
        chosen, scores = best_candidate(problem, {k: SpatialTransform.from_affine(v) for k, v in candidates.items()})
        assert chosen == "truth", scores
        assert scores["truth"] > scores["off"] + 0.05, scores


def test_the_gate_keeps_a_field_where_it_helps_and_drops_it_where_it_hurts():
    grid = Grid.create((16, 16, 40), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    weight = torch.ones(grid.shape)
    before = SimilarityMap(torch.full(grid.shape, 0.3), weight, grid)
    after_values = torch.full(grid.shape, 0.3)
    after_values[..., :20] += 0.2                          # the left half (low i) improved
    after_values[..., 20:] -= 0.2                          # the right half got worse
    gate = improvement_gate(before, SimilarityMap(after_values, weight, grid), grid, width_mm=24.0)
    assert gate.shape == grid.shape and float(gate.min()) >= 0.0 and float(gate.max()) <= 1.0
    assert float(gate[..., :8].min()) > 0.99 and float(gate[..., 32:].max()) < 0.01
    assert float((gate[..., 1:] - gate[..., :-1]).abs().max()) < 0.25      # a smooth transition


def test_the_command_line_says_when_the_sam_stages_fall_back_or_add_nothing(tmp_path):
    """Images that are not CT in HU (here the bundled CT rescaled to 0..255) keep the intensity path:
    the run succeeds and prints one warning per SAM stage, which summary.json records too."""
    import contextlib
    import io
    import json

    import SimpleITK as sitk

    from SAMERegistrationLib.cli import main
    from SAMERegistrationLib.image import Image
    from SAMERegistrationLib.io import write_image
    from sample_cases import small_torso

    torso = small_torso()
    rescaled = Image(((torso.data + 1024.0) / 16.0).clamp(0.0, 255.0), torso.grid)
    pair = make_synthetic_pair(rescaled, translation_mm=(20.0, -10.0, 5.0), field_amplitude_mm=0.0, fill=0.0)
    write_image(pair.fixed, tmp_path / "fixed.nii.gz", sitk.sitkUInt8)
    write_image(pair.moving, tmp_path / "moving.nii.gz", sitk.sitkUInt8)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(tmp_path / "out"),
                     "--mode", "coarse", "--spacing", "8", "--threads", "1", "--device", "cpu", "--quiet", "--no-overview"])
    assert code == 0, err.getvalue()
    lines = [line for line in err.getvalue().splitlines() if "do not look like CT" in line]
    assert [line.split(":")[:3] for line in lines] == [["same-register", " warning", " sam-affine"],
                                                       ["same-register", " warning", " sam-coarse"]], err.getvalue()
    stages = {s["name"]: s for s in json.loads((tmp_path / "out" / "summary.json").read_text())["stages"]}
    assert "do not look like CT" in json.dumps(stages["sam-affine"]) and "do not look like CT" in json.dumps(stages["sam-coarse"])
