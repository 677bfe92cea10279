"""TVF-diffeomorphic mode: time-dependent integration and its inverse, the LDDMM operator, the
networks and losses, the inverse transform file, and the mode end to end on the bundled sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from SAMERegistrationLib.cli import main
from SAMERegistrationLib.export import inverse_to_sitk_transform, to_sitk_transform
from SAMERegistrationLib.learning.pairs import PairBatch
from SAMERegistrationLib.losses import lddmm_energy, lddmm_operator
from SAMERegistrationLib.pipeline.progress import Progress
from SAMERegistrationLib.stages.tvf import guidance_velocities
from SAMERegistrationLib.outputs import INVERSE_JACOBIAN_FILE, INVERSE_TRANSFORM_FILE, SUMMARY_FILE
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.integrate import flow_step, integrate_velocities, invert_velocities
from SAMERegistrationLib.spatial.sampling import sample_at_points
from SAMERegistrationLib.spatial.transform import InverseTransform, SpatialTransform
from SAMERegistrationLib.synthetic import rotation_matrix
from SAMERegistrationLib.tvf.network import DEFAULT_WEIGHTS, TVFConfig, TVFNet, predict
from SAMERegistrationLib.tvf.objective import TVFLossSettings, TVFObjective
from sample_cases import write_tiny_pair

GRID = Grid.create((20, 24, 28), (4.0, 4.0, 4.0), (-50.0, -40.0, 10.0))

ROUND_TRIP_MEAN_MM = 0.03
ROUND_TRIP_MAX_MM = 0.4
"""phi_inv(phi(x)) - x for 8 random smooth velocity fields of 2 mm each (|u_T| up to 5 mm) on a
4 mm grid, 3 voxels from the border: measured 0.018 mm mean, 0.30 mm max (trilinear interpolation
of the inverse field); plain negated-velocity Euler steps (no fixed-point correction): 0.055 mm
mean, 0.36 mm max."""


def random_velocities(steps: int = 8, amplitude_mm: float = 2.0, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    velocities = []
    for _ in range(steps):
        coarse = torch.randn((1, 3, 4, 4, 4), generator=generator)
        field = F.interpolate(coarse, size=GRID.shape, mode="trilinear", align_corners=True)
        velocities.append((field * (amplitude_mm / field.norm(dim=1).max())).double())
    return velocities


def round_trip_error(forward: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """|x + u(x) + w(x + u(x)) - x| in mm, 3 voxels away from the border."""
    points = GRID.world_points(dtype=torch.float64)
    moved = points + torch.movedim(forward[0], 0, -1)
    back = moved + torch.movedim(sample_at_points(inverse[0], GRID, moved, padding="border"), 0, -1)
    return (back - points).norm(dim=-1)[3:-3, 3:-3, 3:-3]


# ------------------------------------------------------------------------------------ integration
def test_constant_velocities_integrate_to_their_sum_and_invert_to_minus_it():
    shifts = [(1.5, -0.5, 2.0), (0.25, 1.0, -3.0), (-2.0, 0.0, 0.5)]
    velocities = [torch.tensor(s, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *GRID.shape).contiguous()
                  for s in shifts]
    total = torch.tensor(shifts, dtype=torch.float64).sum(0).view(1, 3, 1, 1, 1)
    assert torch.allclose(integrate_velocities(velocities, GRID), total.expand(1, 3, *GRID.shape), atol=1e-9)
    assert torch.allclose(invert_velocities(velocities, GRID), -total.expand(1, 3, *GRID.shape), atol=1e-9)


def test_steps_compose_the_velocity_with_the_flow_so_far():
    """v(x) = a (x - c) along x: each Euler step of phi_{t+1} = phi_t + v o phi_t multiplies the
    offset by (1 + a), so u_T = ((1 + a)^T - 1)(x - c) exactly (a trilinear field is linear); the
    published shortcut v_t o (Id + v_t) would give a different answer."""
    a, steps = 0.05, 4
    centre = torch.tensor(GRID.centre_world())
    points = GRID.world_points(dtype=torch.float64)
    velocity = torch.zeros((1, 3, *GRID.shape), dtype=torch.float64)
    velocity[0, 0] = a * (points[..., 0] - centre[0])
    displacement = integrate_velocities([velocity] * steps, GRID)
    expected = ((1 + a) ** steps - 1) * (points[..., 0] - centre[0])
    inside = (points[..., 0] - centre[0]).abs() < 30.0        # trajectories stay inside the grid
    assert torch.allclose(displacement[0, 0][inside], expected[inside], atol=1e-9)
    assert float(displacement[0, 1:].abs().max()) < 1e-12
    step = flow_step(torch.zeros_like(velocity), velocity, GRID)
    assert torch.allclose(step, velocity)


def test_forward_and_inverse_of_random_smooth_fields_compose_to_identity():
    velocities = random_velocities()
    forward = integrate_velocities(velocities, GRID)
    assert 3.0 < float(forward.norm(dim=1).max()) < 8.0
    error = round_trip_error(forward, invert_velocities(velocities, GRID))
    plain = round_trip_error(forward, invert_velocities(velocities, GRID, iterations=0))
    assert float(error.mean()) < ROUND_TRIP_MEAN_MM and float(error.max()) < ROUND_TRIP_MAX_MM
    assert float(error.mean()) < float(plain.mean())


def test_an_incoming_dense_field_becomes_invertible_guidance_steps_that_reproduce_it():
    """A smooth 12 mm field on a 2 mm grid (like SAM-coarse's) -> 4 equal velocity steps on the 4 mm
    grid whose flow matches it (interior) within 0.02 mm mean (measured 0.001; 4 naive c/4 steps: 0.14)."""
    fine = Grid.create((40, 48, 56), (2.0, 2.0, 2.0), (-51.0, -41.0, 9.0))
    generator = torch.Generator().manual_seed(5)
    coarse = torch.randn((1, 3, 3, 3, 3), generator=generator)
    field = F.interpolate(coarse, size=fine.shape, mode="trilinear", align_corners=True)[0]
    field = field * (12.0 / field.norm(dim=0).max())
    progress = Progress("tvf", 0, 1, None, None)
    steps, flow = guidance_velocities(SpatialTransform(np.eye(4), field, fine), GRID, 4, progress, "cpu")
    assert len(steps) == 4 and all(step is steps[0] for step in steps)
    assert torch.equal(flow, integrate_velocities(steps, GRID))
    target = sample_at_points(field, fine, GRID.world_points(), padding="border")[None]
    error = (flow - target).norm(dim=1)[0, 3:-3, 3:-3, 3:-3]
    naive = (integrate_velocities([target / 4] * 4, GRID) - target).norm(dim=1)[0, 3:-3, 3:-3, 3:-3]
    assert float(error.mean()) < 0.02 and float(error.mean()) < 0.1 * float(naive.mean())
    guidance = progress.details["guidance"]
    assert guidance["steps"] == 4 and guidance["smallest_step_jacobian"] > 0.5


def test_a_folding_incoming_field_gets_a_warning_not_a_silent_approximation():
    """u_x = -2 (x - centre): det(Id + grad u) = -1 everywhere, which no flow of invertible steps gives."""
    points = GRID.world_points()
    field = torch.zeros((3, *GRID.shape))
    field[0] = -2.0 * (points[..., 0] - points[..., 0].mean())
    with pytest.warns(UserWarning, match="not the flow of 4 invertible velocity steps"):
        guidance_velocities(SpatialTransform(np.eye(4), field, GRID), GRID, 4, Progress("tvf", 0, 1, None, None), "cpu")


def test_negative_inverse_iterations_are_rejected():
    with pytest.raises(ValueError, match="'iterations' must be >= 0"):
        invert_velocities(random_velocities(1), GRID, iterations=-1)


# ------------------------------------------------------------------------------------ LDDMM
@pytest.mark.parametrize("alpha, gamma, beta", [(0.01, 0.001, 2.0), (0.5, 0.1, 1.0), (0.02, 0.3, 1.5)])
def test_lddmm_operator_on_a_cosine_matches_its_closed_form(alpha, gamma, beta):
    """``-Laplacian cos(w x) = w^2 cos(w x)``, so ``L cos = (alpha w^2 + gamma)^beta cos``."""
    spacing = (2.0, 3.0, 4.0)
    depth, height, width = 10, 12, 16
    index = torch.arange(width, dtype=torch.float64)
    wave = torch.cos(math.pi * 3 * (index + 0.5) / width)          # 3 half-periods along x
    omega = math.pi * 3 / (width * spacing[0])
    field = torch.zeros((1, 3, depth, height, width), dtype=torch.float64)
    field[0, 1] = wave
    factor = (alpha * omega ** 2 + gamma) ** beta
    result = lddmm_operator(field, spacing, alpha, gamma, beta)
    assert torch.allclose(result, factor * field, rtol=1e-9, atol=1e-12 * factor)
    assert math.isclose(float(lddmm_energy(field, spacing, alpha=alpha, gamma=gamma, beta=beta)),
                        factor ** 2 * 0.5 / 3, rel_tol=1e-9)


def test_lddmm_energy_of_a_constant_field_is_gamma_to_the_2_beta_and_weights_tile_over_time():
    field = torch.full((2, 3, 6, 7, 8), 2.0, dtype=torch.float64)
    assert math.isclose(float(lddmm_energy(field, (1.0, 1.0, 1.0))), 4.0 * 0.001 ** 4, rel_tol=1e-9)
    weight = torch.ones((1, 1, 6, 7, 8), dtype=torch.float64)
    assert math.isclose(float(lddmm_energy(field, (1.0, 1.0, 1.0), weight)), 4.0 * 0.001 ** 4, rel_tol=1e-9)
    with pytest.raises(ValueError, match="alpha, gamma and beta must be positive"):
        lddmm_operator(field, (1.0, 1.0, 1.0), gamma=0.0)


# ------------------------------------------------------------------------------------ network, losses
@pytest.mark.parametrize("backbone", ["unet", "swin"])
def test_network_emits_t_half_resolution_velocities_starting_near_identity(backbone):
    torch.manual_seed(0)
    grid = Grid.create((12, 20, 18), (2.0, 2.0, 2.0))
    fixed = torch.rand((2, 1, *grid.shape)) * 2 - 1
    pair = PairBatch(fixed=fixed, moving=fixed.roll(1, -1), weight=torch.ones_like(fixed), grid=grid)
    model = TVFNet(TVFConfig(steps=3, backbone=backbone))
    prediction = predict(model, pair)
    assert len(prediction.velocities) == 3
    assert all(tuple(v.shape) == (2, 3, 6, 10, 9) for v in prediction.velocities)
    assert tuple(prediction.displacement.shape) == (2, 3, *grid.shape)
    assert float(prediction.displacement.detach().abs().max()) < 1e-2
    total = 0
    for loss in ("tvf", "tvf-lddmm"):
        value, parts = TVFObjective(TVFLossSettings(loss=loss))(pair, prediction)
        total = total + value
        assert "lncc" in parts and "diffusion" in parts and (("lddmm_weighted" in parts) == (loss == "tvf-lddmm"))
    total.backward()
    assert all(p.grad is not None for p in model.heads[0].parameters())


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="'backbone' must be one of"):
        TVFConfig(backbone="resnet")
    with pytest.raises(ValueError, match="'loss' must be one of"):
        TVFLossSettings(loss="lddmm")


# ------------------------------------------------------------------------------------ inverse transform file
def test_inverse_transform_file_maps_points_like_the_library_and_inverts_the_result(tmp_path):
    velocities = random_velocities(steps=4, amplitude_mm=2.0, seed=3)
    forward = integrate_velocities(velocities, GRID)[0].float()
    backward = invert_velocities(velocities, GRID)[0].float()
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix((2.0, -3.0, 10.0)) * 1.05
    affine[:3, 3] = (30.0, -12.0, 7.0)
    transform = SpatialTransform(affine, forward, GRID)
    inverse = InverseTransform(np.linalg.inv(affine), backward, GRID)
    path = tmp_path / INVERSE_TRANSFORM_FILE
    sitk.WriteTransform(inverse_to_sitk_transform(inverse), str(path))
    read_inverse = sitk.ReadTransform(str(path))
    read_forward = to_sitk_transform(transform)
    generator = torch.Generator().manual_seed(0)
    fixed_points = GRID.world_points(dtype=torch.float64)[4:-4, 4:-4, 4:-4].reshape(-1, 3)
    fixed_points = fixed_points[torch.randperm(len(fixed_points), generator=generator)[:200]]
    moving_points = transform.map_points(fixed_points)
    ours = inverse.map_points(moving_points)
    theirs = torch.tensor([read_inverse.TransformPoint(tuple(p)) for p in moving_points.tolist()])
    assert float((ours - theirs).norm(dim=-1).max()) < 1e-4
    round_trip = torch.tensor([read_inverse.TransformPoint(read_forward.TransformPoint(tuple(p)))
                               for p in fixed_points.tolist()])
    assert float((round_trip - fixed_points).norm(dim=-1).max()) < ROUND_TRIP_MAX_MM


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tvf_run(tmp_path_factory):
    """``same-register --mode tvf`` on the bundled torso CT at 8 mm against a known affine + 4 mm
    deformation of itself (``sample_cases``): shipped weights, 5 refinement iterations, one thread."""
    if not DEFAULT_WEIGHTS["tvf"].is_file():
        pytest.skip("shipped TVF weights missing")
    folder = tmp_path_factory.mktemp("tvf")
    paths = write_tiny_pair(folder)
    out = folder / "out"
    code = main([str(paths["fixed"]), str(paths["moving"]), "-o", str(out), "--mode", "tvf",
                 "--moving-labels", str(paths["moving_labels"]), "--fixed-labels", str(paths["fixed_labels"]),
                 "--spacing", "8", "--refine-iterations", "5", "--threads", "1", "--device", "cpu",
                 "--no-overview", "--quiet"])
    assert code == 0
    return paths, out, json.loads((out / SUMMARY_FILE).read_text())


def test_tvf_mode_runs_end_to_end_on_the_bundled_sample(tvf_run):
    _, out, summary = tvf_run
    assert [s["name"] for s in summary["stages"]] == ["sam-affine", "sam-coarse", "tvf"]
    assert (out / INVERSE_TRANSFORM_FILE).is_file() and (out / INVERSE_JACOBIAN_FILE).is_file()
    assert summary["files"]["inverse_transform"].endswith(INVERSE_TRANSFORM_FILE)
    consistency = summary["inverse"]["consistency"]
    assert consistency["mean_mm"] < 0.5 and consistency["max_mm"] < 3.0
    assert summary["jacobian"]["percent_nonpositive"] < 0.1
    assert summary["inverse"]["jacobian"]["percent_nonpositive"] < 0.1
    assert summary["dice"]["mean"] > summary["dice"]["mean_before_registration"] + 0.2
    refinement = summary["stages"][2]["details"]["refinement"]
    assert refinement["iterations"] == 5 and refinement["loss_after"] <= refinement["loss_before"]


def test_inverse_becomes_a_from_parent_grid_transform_node_that_saves_readably(tvf_run, tmp_path):
    """Slicer side: the inverse node maps moving points like ``inverse_transform.h5`` and, saved by
    Slicer, is a plain displacement field that SimpleITK reads."""
    slicer = pytest.importorskip("slicer")
    from SAMERegistrationLib import mrml
    from SAMERegistrationLib.io import read_image

    paths, out, summary = tvf_run
    scene = slicer.vtkMRMLScene()
    nodes = {}
    for name in ("fixed", "moving"):
        nodes[name] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        mrml.image_to_volume(read_image(paths[name]), nodes[name])
    inputs = mrml.RegistrationInputs(fixed=nodes["fixed"], moving=nodes["moving"])
    result = mrml.load_outputs(out, summary, inputs, mrml.RegistrationOutputs(), [])
    assert result.inverse is not None and result.inverse.IsA("vtkMRMLGridTransformNode")
    moving = read_image(paths["moving"])
    body = moving.grid.world_points()[moving.data > -300][::7].double()
    reference = sitk.ReadTransform(str(out / INVERSE_TRANSFORM_FILE))
    expected = np.array([reference.TransformPoint(tuple(p)) for p in body.tolist()])
    mapped = mrml.map_points_lps(result.inverse, body.numpy())
    assert np.abs(mapped - expected).max() < 0.2          # resampled onto a moving-space grid
    saved = tmp_path / "inverse_saved.h5"
    mrml.write_transform_node(result.inverse, saved)
    reread = sitk.ReadTransform(str(saved))
    assert np.abs(np.array([reread.TransformPoint(tuple(p)) for p in body.tolist()]) - mapped).max() < 1e-3
