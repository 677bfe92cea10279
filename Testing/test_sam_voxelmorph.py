"""SAM-VoxelMorph: network shapes, SAM correlation, training, test-time refinement, the SAME mode."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SAMERegistrationLib.errors import InputError, RegistrationCancelled
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image, read_labels, write_image
from SAMERegistrationLib.learning.objective import (ObjectiveSettings, RegistrationObjective, parse_similarity,
                                                    sam_similarity)
from SAMERegistrationLib.learning.pairs import FeaturePair, pair_from_problem
from SAMERegistrationLib.learning.training_pairs import Augmentation, prepare_scans, sample_batch
from SAMERegistrationLib.learning.weights import save_weights
from SAMERegistrationLib.metrics import dice_per_label, shared_labels
from SAMERegistrationLib.modes import ModeSettings, build_pipeline
from SAMERegistrationLib.pipeline.problem import RegistrationOptions, RegistrationProblem
from SAMERegistrationLib.pipeline.runner import RegistrationPipeline
from SAMERegistrationLib.preprocess import body_mask
from SAMERegistrationLib.registration import RegistrationRequest, register_files
from SAMERegistrationLib.sam.embedding import load_sam
from SAMERegistrationLib.sam.features import add_sam_features, principal_features, sam_correlation
from SAMERegistrationLib.sam_voxelmorph.network import (DEFAULT_WEIGHTS, SAMVMConfig, SAMVoxelMorphNet, load_sam_vm,
                                                        predict)
from SAMERegistrationLib.spatial.fields import resample_batch, warp_batch
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.jacobian import jacobian_determinant, jacobian_statistics
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.stages.sam_voxelmorph import SAMVoxelMorph
from SAMERegistrationLib.synthetic import make_synthetic_pair

from sample_cases import small_torso

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "Resources" / "SampleData"
TORSO = SAMPLES / "patientA_torso_ct.nii.gz"
TINY = SAMVMConfig(full_resolution_channels=4, stem_width=8, encoder=(8, 8), decoder=(8, 8), integration_steps=4)

# Measured with the shipped weights on the bundled inter-patient pair (patient C <- patient A, 27
# shared labels): SAM-affine 0.185 -> SAME 0.279 mean Dice, 0.19 % J <= 0 in the body (README's
# SAM-VoxelMorph ablation). The bounds leave a margin.
SAME_DICE_GAIN_OVER_SAM_AFFINE = 0.05
SAME_MAX_PERCENT_FOLDED = 0.5


@pytest.fixture(scope="module")
def torso_scans():
    torch.set_num_threads(1)
    return prepare_scans([{"image": str(TORSO)}], [], 2.0)


def test_forward_pass_shapes_with_and_without_correlation():
    fixed = torch.zeros((2, 1, 17, 20, 23))
    for correlation in (True, False):
        model = SAMVoxelMorphNet(SAMVMConfig(**{**TINY.as_dict(), "correlation": correlation}))
        channels = torch.randn((2, 27, 9, 10, 12)) if correlation else None
        assert model(fixed, fixed, channels).shape == (2, 3, 9, 10, 12)
    with pytest.raises(ValueError, match="correlation"):
        SAMVoxelMorphNet(TINY)(fixed, fixed, None)
    # An untrained network starts near the identity (the head is initialised near zero).
    pair_velocity = SAMVoxelMorphNet(TINY)(fixed, fixed, torch.zeros((2, 27, 9, 10, 12)))
    assert pair_velocity.abs().max() < 1e-3


def test_sam_correlation_channels_are_neighbourhood_cosines():
    generator = torch.Generator().manual_seed(0)
    fixed = torch.nn.functional.normalize(torch.randn((1, 6, 5, 6, 7), generator=generator), dim=1)
    shifted = torch.roll(fixed, shifts=1, dims=4)  # moving(x + 1 voxel along W) == fixed(x)
    grid = Grid.create((5, 6, 7), (4.0, 4.0, 4.0))
    correlation = sam_correlation(FeaturePair(fixed, shifted, grid))
    assert correlation.shape == (1, 27, 5, 6, 7)
    # Channel order (dz, dy, dx) lexicographic from -1: the centre is 13, dx = +1 is 14.
    matched = correlation[:, 14][:, :, :, :-1]  # the last column's neighbour is a replicated edge
    assert torch.allclose(matched, torch.ones_like(matched), atol=1e-5)
    same_position = (fixed * shifted).sum(1)
    assert torch.allclose(correlation[:, 13], same_position, atol=1e-6)
    assert correlation.max() <= 1 + 1e-5


def test_sam_similarity_is_the_body_mean_of_the_cosine(torso_scans):
    """The SAM term on real SAM features of two crops, under a smooth displacement: 1 - the
    body-weighted mean of F.cosine_similarity between the fixed and the whole warped moving feature
    map, in value and in its gradient (the term itself samples only the body's voxels)."""
    pair = add_sam_features(sample_batch(torso_scans, 1, (32, 48, 48), Augmentation(), torch.Generator().manual_seed(4)),
                            load_sam())
    features = pair.features["sam"]
    assert torch.allclose(features.fixed.norm(dim=1), torch.ones(()), atol=1e-5)   # unit vectors
    pair.weight = torch.zeros_like(pair.weight)                      # a "body" with air beside it
    pair.weight[..., :20] = 1.0
    pair.weight[..., 20:28] = 0.5
    generator = torch.Generator().manual_seed(5)
    displacement = F.interpolate(torch.randn(1, 3, 4, 6, 6, generator=generator), size=pair.grid.shape,
                                 mode="trilinear", align_corners=True) * 4.0
    dense = displacement.clone().requires_grad_(True)
    on_features = resample_batch(dense, pair.grid, features.grid)
    warped = warp_batch(features.moving, features.grid, on_features)
    weight = resample_batch(pair.weight, pair.grid, features.grid)
    cosine = F.cosine_similarity(features.fixed, warped, dim=1, eps=1e-6)[:, None]
    expected = 1 - (cosine * weight).sum() / weight.sum()
    expected.backward()
    sampled = displacement.clone().requires_grad_(True)
    value = sam_similarity(pair, sampled)
    value.backward()
    assert abs(float(value) - float(expected)) < 1e-5
    assert 0.05 < float(expected) < 1.5                              # a real, non-trivial mismatch
    assert float((sampled.grad - dense.grad).abs().max()) < 1e-4 * float(dense.grad.abs().max())
    on_feature_grid = dataclasses.replace(pair, grid=features.grid, weight=weight)    # no resampling of u
    assert abs(float(sam_similarity(on_feature_grid, on_features.detach())) - float(expected)) < 1e-5


def test_principal_features_keep_the_cosine_of_real_sam_features(torso_scans):
    """32 principal directions of 64: unit vectors whose cosine between the fixed and the moving
    crop (displaced, so the cosines spread) follows the full features' closely; 4 directions do not."""
    pair = add_sam_features(sample_batch(torso_scans, 1, (32, 48, 48), Augmentation(), torch.Generator().manual_seed(6)),
                            load_sam())
    features = pair.features["sam"]
    weight = torch.ones_like(features.fixed[:, :1])
    moved = FeaturePair(features.fixed, torch.roll(features.moving, shifts=(1, 2), dims=(3, 4)), features.grid)

    def correlation(reduced: FeaturePair) -> float:
        full = (moved.fixed * moved.moving).sum(dim=1).flatten()
        kept = (reduced.fixed * reduced.moving).sum(dim=1).flatten()
        return float(torch.corrcoef(torch.stack([full, kept]))[0, 1])

    reduced = principal_features(moved, weight, 32)
    assert reduced.fixed.shape[1] == 32 and reduced.grid == features.grid
    assert torch.allclose(reduced.moving.norm(dim=1), torch.ones(()), atol=1e-5)
    assert correlation(reduced) > 0.99
    assert correlation(principal_features(moved, weight, 4)) < correlation(reduced) - 0.02
    assert principal_features(moved, weight, 64) is moved


def test_a_few_training_steps_lower_the_loss(torso_scans):
    """Ten Adam steps on one fixed batch of synthetic crop pairs (SAM correlation + SAM loss)."""
    torch.manual_seed(0)
    sam = load_sam()
    pair = add_sam_features(sample_batch(torso_scans, 2, (32, 48, 48), Augmentation(), torch.Generator().manual_seed(3)),
                            sam)
    model = SAMVoxelMorphNet(TINY)
    objective = RegistrationObjective(ObjectiveSettings(similarity="lncc+0.1*sam"))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        prediction = predict(model, pair)
        return objective(pair, prediction.displacement, prediction.velocity, prediction.velocity_grid)[0]

    before = loss().item()
    for _ in range(10):
        optimiser.zero_grad()
        value = loss()
        value.backward()
        optimiser.step()
    after = loss().item()
    assert after < before - 0.01, (before, after)


def test_similarity_specs_are_checked():
    assert parse_similarity("lncc+0.1*sam") == [(1.0, "lncc"), (0.1, "sam")]
    with pytest.raises(ValueError, match="unknown term 'nmi'"):
        parse_similarity("lncc+nmi")
    with pytest.raises(ValueError, match="cannot read"):
        parse_similarity("lncc+*sam")


def deformed_torso_crop(voxel_mm: float, field_amplitude_mm: float, seed: int):
    """A 176 x 144 x 96 mm torso CT crop at ``voxel_mm``, a smooth deformation of it (no affine),
    and their problem at that spacing with the whole crop as the similarity mask (it lies inside the
    body); one thread, seeded."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torso = small_torso(voxel_mm=voxel_mm, crop_mm=(176.0, 144.0, 96.0))
    pair = make_synthetic_pair(torso, rotation_deg=(0, 0, 0), scale=(1, 1, 1), translation_mm=(0, 0, 0),
                               field_amplitude_mm=field_amplitude_mm, seed=seed)
    everywhere = Image(torch.ones(torso.grid.shape), torso.grid)
    problem = RegistrationProblem(pair.fixed, pair.moving, fixed_mask=everywhere,
                                  options=RegistrationOptions(spacing=voxel_mm, threads=1))
    return torso, pair, problem


def test_refinement_recovers_a_known_deformation():
    """With an untrained network (zero output) the test-time refinement alone must recover a smooth
    10 mm deformation of a torso CT crop (inside the body, so the similarity mask is the whole crop).
    Measured: median error 2.22 mm -> 1.04 mm after 40 iterations."""
    torso, pair, problem = deformed_torso_crop(voxel_mm=4.0, field_amplitude_mm=10.0, seed=2)
    stage = SAMVoxelMorph(SAMVoxelMorphNet(SAMVMConfig()), load_sam(), refine_iterations=40, refine_similarity="lncc")
    result = RegistrationPipeline([stage]).run(problem)
    points = torso.grid.world_points()[2:-2, 2:-2, 2:-2].reshape(-1, 3)
    before = float(pair.error_mm(SpatialTransform.identity(), points).median())
    after = float(pair.error_mm(result.transform, points).median())
    details = result.stages[0].details["refinement"]
    assert details["loss_after"] < details["loss_before"]
    assert after < 0.6 * before, (before, after)


def test_precision_step_lowers_the_error_left_by_the_refinement():
    """A smooth 6 mm deformation of a 2 mm torso CT crop: after the half-resolution refinement, the
    precision step on the 2 mm images lowers the median error further. Measured: 0.86 -> 0.49 mm
    (30 refinement iterations, then 20 precision iterations)."""
    torso, pair, problem = deformed_torso_crop(voxel_mm=2.0, field_amplitude_mm=6.0, seed=3)
    points = torso.grid.world_points()[4:-4, 4:-4, 4:-4].reshape(-1, 3)
    errors, details = [], None
    for precision_iterations in (0, 20):
        stage = SAMVoxelMorph(SAMVoxelMorphNet(SAMVMConfig()), load_sam(), refine_iterations=30,
                              refine_similarity="lncc", precision_iterations=precision_iterations)
        result = RegistrationPipeline([stage]).run(problem)
        errors.append(float(pair.error_mm(result.transform, points).median()))
        details = result.stages[0].details
    assert details["precision_step"]["loss_after"] < details["precision_step"]["loss_before"]
    assert errors[1] < 0.75 * errors[0], errors


def test_moving_image_sampled_through_the_incoming_transform_matches_the_composed_result():
    """The precision step's moving image under a residual ``u`` is the moving working image sampled
    once through ``phi.then_residual(u)``, the transform the stage returns, also where ``u`` moves
    points beyond the incoming field's grid; and it is differentiable in ``u``."""
    torch.manual_seed(0)
    torso = small_torso(voxel_mm=8.0)
    problem = RegistrationProblem(torso, torso, options=RegistrationOptions(spacing=8.0, threads=1))
    grid = problem.level(8.0).fixed.grid
    rotation = np.eye(4)
    rotation[:3, :3] = make_synthetic_pair(torso, rotation_deg=(3, -2, 6)).psi.affine[:3, :3]
    rotation[:3, 3] = (2.7, -1.3, 3.1)
    field_grid = Grid.create([n - 4 for n in grid.shape], grid.spacing,
                             [o + 2 * s for o, s in zip(grid.origin, grid.spacing)])   # 2 voxels short of every face
    field = F.interpolate(torch.randn(1, 3, 3, 3, 3) * 4.0, size=field_grid.shape, mode="trilinear")[0]
    incoming = SpatialTransform(rotation, field, field_grid)
    residual = F.interpolate(torch.randn(1, 3, 3, 3, 3) * 6.0, size=grid.shape, mode="trilinear")
    residual.requires_grad_(True)

    pair = pair_from_problem(problem, incoming, 8.0, sample_through_transform=True)
    sampled = pair.warp_moving(residual)[0, 0]
    composed = incoming.then_residual(residual[0], grid)
    expected, _ = problem.level(8.0).sample_moving(composed.map_points(grid.world_points()))
    assert torch.allclose(sampled.detach(), expected.detach(), atol=1e-4), float((sampled - expected).abs().max())
    resampled_twice = pair_from_problem(problem, incoming, 8.0).warp_moving(residual.detach())[0, 0]
    assert float((resampled_twice - expected).abs().max()) > 0.01       # the two differ: the test can fail
    sampled.sum().backward()
    assert torch.isfinite(residual.grad).all() and float(residual.grad.abs().sum()) > 0


def test_training_script_runs_resumes_and_writes_loadable_weights(tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps({"volumes": [{"image": str(TORSO)}]}))
    common = [sys.executable, "-m", "SAMERegistrationLib.sam_voxelmorph.train", "--training-list", str(listing),
              "-o", str(tmp_path / "run"), "--crop", "24", "32", "32", "--batch", "1", "--threads", "1",
              "--checkpoint-every", "2", "--validate-every", "2", "--validation-batches", "1"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    first = subprocess.run(common + ["--iterations", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(common + ["--iterations", "3", "--resume"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "validation_loss" in records[1] and {"lncc", "sam", "diffusion"} <= set(records[0])
    model = load_sam_vm(tmp_path / "run" / "sam_vm.pt")
    assert model.config == SAMVMConfig()


def test_missing_or_foreign_weights_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="SAM-VoxelMorph weights .*not found.*--vm-weights"):
        load_sam_vm(tmp_path / "none.pt")
    foreign = tmp_path / "foreign.pt"
    save_weights(foreign, torch.nn.Linear(2, 2), {"correlation": True})
    with pytest.raises(InputError, match="do not fit"):
        load_sam_vm(foreign)


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped SAM-VoxelMorph weights missing")
def test_same_mode_on_the_sample_pair_beats_sam_affine_without_folding():
    """The full SAME mode with the shipped weights on the bundled inter-patient pair (held out of
    training): mean Dice over shared labels must exceed SAM-affine's by a margin, with almost no
    folding inside the body."""
    torch.set_num_threads(2)
    fixed = read_image(SAMPLES / "patientC_abdomen_ct.nii.gz")
    moving = read_image(SAMPLES / "patientA_abdomen_ct.nii.gz")
    fixed_labels = read_labels(SAMPLES / "patientC_abdomen_labels.nii.gz", fixed, "fixed labels")
    moving_labels = read_labels(SAMPLES / "patientA_abdomen_labels.nii.gz", moving, "moving labels")
    labels = shared_labels(fixed_labels.data, moving_labels.data)
    problem = RegistrationProblem(fixed, moving)
    stages = build_pipeline("same").stages
    assert [s.name for s in stages] == ["sam-affine", "sam-coarse", "sam-voxelmorph"]
    affine = RegistrationPipeline(stages[:1]).run(problem).transform
    same = RegistrationPipeline(stages[1:]).run(problem, initial=affine).transform

    def mean_dice(transform) -> float:
        warped = resample_labels(moving_labels, fixed.grid, transform).data
        return float(np.mean(list(dice_per_label(fixed_labels.data, warped, labels).values())))

    gain = mean_dice(same) - mean_dice(affine)
    mask = body_mask(fixed, True)
    jacobian = jacobian_determinant(same.displacement_on(fixed.grid), fixed.grid)
    folded = jacobian_statistics(jacobian, mask.data > 0).percent_nonpositive
    assert gain > SAME_DICE_GAIN_OVER_SAM_AFFINE, gain
    assert folded < SAME_MAX_PERCENT_FOLDED, folded


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped SAM-VoxelMorph weights missing")
def test_cancelling_during_sam_voxelmorph_writes_nothing(tmp_path):
    """Cancel as soon as the SAM-VoxelMorph stage reports progress: no output file may exist."""
    cancel = threading.Event()
    seen = []

    def on_progress(event) -> None:
        seen.append(event.stage)
        if event.stage == "sam-voxelmorph":
            cancel.set()

    fixed = small_torso()
    pair = make_synthetic_pair(fixed, field_amplitude_mm=4.0)
    write_image(pair.fixed, tmp_path / "fixed.nii.gz")
    write_image(pair.moving, tmp_path / "moving.nii.gz")
    output = tmp_path / "out"
    request = RegistrationRequest(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", output, mode="same",
                                  device="cpu", options=RegistrationOptions(spacing=8.0, threads=1))
    with pytest.raises(RegistrationCancelled):
        register_files(request, on_progress=on_progress, cancel=cancel)
    assert "sam-voxelmorph" in seen
    assert not output.exists() or not any(output.iterdir())
