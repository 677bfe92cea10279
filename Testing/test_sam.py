"""SAM: network shapes, training, weights I/O, data-parallel training, matching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from SAMERegistrationLib.errors import InputError
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image
from SAMERegistrationLib.preprocess import body_mask, to_working_grid
from SAMERegistrationLib.sam.embedding import DEFAULT_WEIGHTS, embed, feature_grids, load_sam, save_checkpoint
from SAMERegistrationLib.sam.loss import ContrastiveSettings, global_loss, query_points
from SAMERegistrationLib.sam.matching import match_points
from SAMERegistrationLib.sam.network import SAMConfig, SAMNet
from SAMERegistrationLib.sam.train import prepare_volume, training_step
from SAMERegistrationLib.sam.views import TrainingVolume, ViewAugmentation, sample_view_pair
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.synthetic import make_synthetic_pair

REPO = Path(__file__).resolve().parents[1]
TORSO = REPO / "Resources" / "SampleData" / "patientA_torso_ct.nii.gz"


def cropped_torso(size_mm: float = 150.0) -> Image:
    """A cube of the bundled torso CT around its centre (keeps tests fast)."""
    torso = read_image(TORSO)
    centre = torso.grid.centre_world()
    count = int(size_mm / 3.0)
    direction = torso.grid.direction_matrix
    grid = Grid.create((count,) * 3, (3.0,) * 3, centre - direction @ np.full(3, (count - 1) * 1.5), direction)
    from SAMERegistrationLib.spatial.warp import resample_image

    return resample_image(torso, grid, fill=-1024.0)


def test_embedding_shapes_strides_and_unit_norm():
    model = SAMNet(SAMConfig()).eval()
    with torch.no_grad():
        local, coarse = model(torch.randn(1, 1, 37, 30, 21))
    assert local.shape == (1, 32, 19, 15, 11)
    assert coarse.shape == (1, 32, 5, 4, 3)
    assert torch.allclose(local.norm(dim=1), torch.ones(1, 19, 15, 11), atol=1e-5)
    assert torch.allclose(coarse.norm(dim=1), torch.ones(1, 5, 4, 3), atol=1e-5)


def test_feature_grids_place_stride_s_voxel_n_on_working_voxel_s_n():
    working = Grid.create((40, 30, 20), (2.0, 2.0, 2.0), (10.0, -5.0, 3.0))
    local, coarse = feature_grids(working)
    assert local.shape == (20, 15, 10) and coarse.shape == (5, 4, 3)
    assert np.allclose(local.index_to_world() @ [3, 2, 1, 1], working.index_to_world() @ [6, 4, 2, 1])
    assert np.allclose(coarse.index_to_world() @ [1, 2, 1, 1], working.index_to_world() @ [8, 16, 8, 1])


def test_a_few_training_steps_lower_the_loss_on_a_real_ct():
    torch.manual_seed(0)
    config = SAMConfig()
    volume = prepare_volume(str(TORSO), config.spacing_mm)
    model = SAMNet(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    augmentation = ViewAugmentation(patch=32)
    settings = ContrastiveSettings(queries=64, hard_negatives=64, random_negatives=64)

    def loss_on_fixed_batch() -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return training_step(model, config, [volume, volume], augmentation, settings, generator, 2, torch.device("cpu"))[0]

    with torch.no_grad():
        before = loss_on_fixed_batch().item()
    for _ in range(8):
        optimiser.zero_grad()
        loss_on_fixed_batch().backward()
        optimiser.step()
    with torch.no_grad():
        after = loss_on_fixed_batch().item()
    assert after < before - 0.2, (before, after)


NO_INTENSITY_CHANGE = ViewAugmentation(patch=16, contrast=(1.0, 1.0), offset_hu=0.0, max_noise_hu=0.0,
                                       blur_probability=0.0)


def test_a_cross_patient_view_pair_cuts_one_view_from_each_patient_around_one_place():
    """The partner (here a uniform 500 HU 'patient' on the same grid) gives one of the two views,
    each direction about half the time, and the two views always overlap."""
    grid = Grid.create((80, 80, 80), (2.0,) * 3, (-79.0, -79.0, -79.0))
    world = grid.world_points()
    central = world.reshape(-1, 3)[world.reshape(-1, 3).norm(dim=-1) < 20.0]   # views stay inside the grid
    volume = TrainingVolume(Image(world[..., 0].float() * 10.0 - 400.0, grid), central)
    partner = Image(torch.full(grid.shape, 500.0), grid)
    augmentation = NO_INTENSITY_CHANGE
    reach = augmentation.max_offset_fraction * augmentation.patch * 2.0 * augmentation.scale[1]  # per axis, mm
    partner_first = 0
    for seed in range(20):
        hu_1, grid_1, hu_2, grid_2 = sample_view_pair(volume, 2.0, augmentation,
                                                      torch.Generator().manual_seed(seed), partner)
        from_partner = [bool(torch.allclose(hu, torch.full_like(hu, 500.0), atol=1e-3)) for hu in (hu_1, hu_2)]
        assert sorted(from_partner) == [False, True]
        partner_first += from_partner[0]
        centres = [torch.as_tensor(g.centre_world()) for g in (grid_1, grid_2)]
        assert float((centres[0] - centres[1]).norm()) < 2 * 3 ** 0.5 * reach  # both near one seed
    assert 4 <= partner_first <= 16


def test_cross_patient_queries_skip_air_in_the_other_view():
    """A cross-patient view may reach outside the other patient's scan: queries need tissue in both."""
    grid = Grid.create((16, 16, 16), (2.0,) * 3, (0.0, 0.0, 0.0))
    local_grid = feature_grids(grid)[0]
    tissue = torch.zeros(grid.shape)
    half_air = tissue.clone()
    half_air[:, :, :8] = -1024.0   # x < 16 mm is outside the other scan
    generator = torch.Generator().manual_seed(0)
    one_sided = query_points(grid, local_grid, tissue, grid, 1000, -900.0, generator)
    both = query_points(grid, local_grid, tissue, grid, 1000, -900.0, generator, half_air)
    assert len(both) > 0 and float(both[:, 0].min()) >= 15.0
    assert len(one_sided) > len(both) and float(one_sided[:, 0].min()) < 15.0


def test_without_other_volume_negatives_each_pairs_global_loss_stands_alone():
    """Cross-patient training drops the other volumes of the batch as global negatives (they would
    push the same anatomy of two patients apart): the batch loss is then the mean of the pairs'
    own losses; with them (the self-supervised default) it is larger."""
    generator = torch.Generator().manual_seed(0)
    grid = Grid.create((4, 4, 4), (16.0,) * 3, (0.0, 0.0, 0.0))
    maps = [torch.nn.functional.normalize(torch.randn(2, 8, 4, 4, 4, generator=generator), dim=1) for _ in range(2)]
    points = [grid.world_points().reshape(-1, 3)[::5] for _ in range(2)]
    alone = ContrastiveSettings(other_volume_negatives=False)
    each = [global_loss([m], [(grid, grid)], [p], [alone]) for m, p in zip(maps, points)]
    together = global_loss(maps, [(grid, grid)] * 2, points, [alone, alone])
    assert torch.isclose(together, (each[0] + each[1]) / 2)
    assert global_loss(maps, [(grid, grid)] * 2, points, [ContrastiveSettings()] * 2) > together + 0.1
    widened = alone.with_tolerance(8.0)
    assert (widened.local_exclusion_mm, widened.global_exclusion_mm) == (alone.local_exclusion_mm + 8.0,
                                                                         alone.global_exclusion_mm + 8.0)


def test_weights_round_trip_and_checksum_failure(tmp_path):
    model = SAMNet(SAMConfig(widths=(8, 16, 16), local_dim=8, global_dim=8))
    path = tmp_path / "sam.pt"
    digest = save_checkpoint(path, model, iterations=1)
    assert (tmp_path / "sam.pt.sha256").read_text().split()[0] == digest
    loaded = load_sam(path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    with open(path, "ab") as stream:
        stream.write(b"tampered")
    with pytest.raises(InputError, match="does not match"):
        load_sam(path)


def test_missing_weights_and_missing_checksum_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_sam(tmp_path / "nothing.pt")
    path = tmp_path / "sam.pt"
    torch.save({"config": SAMConfig().as_dict(), "state_dict": {}}, path)
    with pytest.raises(InputError, match="no checksum file"):
        load_sam(path)


def test_matching_an_image_into_itself_returns_the_query_points():
    image = cropped_torso()
    embeddings = embed(image, SAMNet(SAMConfig()).eval())
    grid = embeddings.local.grid
    generator = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randint(2, n - 2, (50,), generator=generator) for n in grid.size_ijk], -1).double()
    matrix = torch.as_tensor(grid.index_to_world())
    points = (index @ matrix[:3, :3].T + matrix[:3, 3]).float()
    # Searching around the true position isolates the geometry: every point comes back exactly.
    exact = match_points(embeddings, embeddings, points, subvoxel=False, search_centres=points)
    assert float((exact.points - points).norm(dim=-1).max()) < 1e-3
    assert float(exact.score.min()) > 0.999
    # The coarse-to-fine search over the whole image finds nearly all of them with an untrained
    # network (a few near-ties in featureless regions can win).
    searched = match_points(embeddings, embeddings, points, subvoxel=False, cycle_tolerance_mm=0.01)
    found = (searched.points - points).norm(dim=-1) < 1e-3
    assert float(found.float().mean()) >= 0.9
    assert bool((searched.consistent | ~found).all())
    refined = match_points(embeddings, embeddings, points, subvoxel=True, search_centres=points)
    half_voxel = grid.spacing[0] / 2 * 3**0.5
    moved = (refined.points - exact.points).norm(dim=-1)
    assert float(moved.max()) <= half_voxel + 1e-3


def test_shipped_weights_match_points_under_a_known_deformation():
    """The bundled torso (a training volume) under an 8 degree rotation, anisotropic scaling, a
    translation and a 6 mm smooth field; 300 random body points matched without any filter, and
    the confident (score >= 0.7), cycle-consistent subset that the SAM stages use.

    Measured with the shipped weights: all points median 3.4 mm, 71 % within 10 mm; confident and
    consistent (62 % of points) median 2.2 mm, 94 % within 10 mm."""
    model = load_sam()
    fixed = read_image(TORSO)
    pair = make_synthetic_pair(fixed, rotation_deg=(0.0, 0.0, 8.0), scale=(1.05, 0.95, 1.0),
                               translation_mm=(30.0, -20.0, 10.0), field_amplitude_mm=6.0, seed=3)
    working = to_working_grid(fixed, 2.0, is_ct=True)
    body = working.grid.world_points()[body_mask(working, is_ct=True).data.bool()]
    points = body[torch.randperm(len(body), generator=torch.Generator().manual_seed(0))[:300]]
    matches = match_points(embed(pair.fixed, model), embed(pair.moving, model), points, cycle_tolerance_mm=8.0)
    error = (pair.psi.map_points(matches.points.double()).float() - points).norm(dim=-1)
    assert float(error.median()) < 5.0
    assert float((error < 10.0).float().mean()) > 0.6
    confident = (matches.score >= 0.7) & matches.consistent
    assert float(confident.float().mean()) > 0.4
    assert float(error[confident].median()) < 3.5
    assert float((error[confident] < 10.0).float().mean()) > 0.85


def test_two_process_data_parallel_training_and_resume(tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks step, rank 0 logs, and a resumed run continues."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = [str(TORSO), "-o", str(tmp_path), "--batch", "1", "--patch", "32", "--probe-every", "1000",
              "--checkpoint-every", "2", "--threads", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "SAMERegistrationLib.sam.train"]
    first = subprocess.run(launcher + common + ["--iterations", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(launcher + common + ["--iterations", "4", "--resume"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4 and len(checkpoint["generators"]) == 2
    assert load_sam(tmp_path / "sam.pt").config == SAMConfig()
