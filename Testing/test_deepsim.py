"""DeepSim (losses/deepsim.py), its registration as similarity terms, the segmentation U-Net
(segmentation/) and the ``--similarity`` option of the CLI."""

from __future__ import annotations

import functools

import pytest
import torch

from sample_cases import small_torso
from SAMERegistrationLib.cli import EXIT_BAD_INPUT, main
from SAMERegistrationLib.learning.objective import ObjectiveSettings, RegistrationObjective, similarity_names
from SAMERegistrationLib.learning.pairs import PairBatch
from SAMERegistrationLib.learning.training_pairs import Augmentation, prepare_scans, sample_batch
from SAMERegistrationLib.losses.deepsim import DeepSimSimilarity, deepsim, frozen_extractor, level_grid
from SAMERegistrationLib.preprocess import body_mask, ct_window, to_working_grid
from SAMERegistrationLib.segmentation.network import (
    CLASS_NAMES, SegmentationConfig, SegmentationUNet, compact_labels, load_segmentation)
from SAMERegistrationLib.segmentation.train import segmentation_loss
from SAMERegistrationLib.spatial.fields import warp_batch

from test_sam import REPO

SAMPLES = REPO / "Resources" / "SampleData"
TINY = SegmentationConfig(encoder=(4, 8), decoder=(8, 4))


@functools.lru_cache(maxsize=1)
def torso_pair() -> PairBatch:
    """The bundled torso at 8 mm (canonical grid) as fixed and as moving image."""
    hu = to_working_grid(small_torso(), 8.0, is_ct=True)
    data = hu.data[None, None]
    weight = body_mask(hu, is_ct=True).data.float()[None, None]
    return PairBatch(fixed=ct_window(data), moving=ct_window(data), weight=weight, grid=hu.grid,
                     fixed_hu=data, moving_hu=data.clone())


def random_extractor():
    torch.manual_seed(0)
    model = SegmentationUNet(TINY)
    return frozen_extractor(model, model.encode, model.feature_halvings)


def shift(pair: PairBatch, mm: float, requires_grad: bool = False) -> torch.Tensor:
    displacement = torch.zeros((1, 3, *pair.grid.shape))
    displacement[:, 0] = mm
    return displacement.requires_grad_(requires_grad)


def test_deepsim_of_an_image_with_itself_is_zero_and_grows_with_misalignment():
    pair, extractor = torso_pair(), random_extractor()
    term = DeepSimSimilarity(lambda: extractor)
    values = [term(pair, pair.moving, shift(pair, mm)).item() for mm in (0.0, 4.0, 8.0, 16.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-5)
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_gradient_reaches_the_displacement_and_not_the_frozen_extractor():
    pair, extractor = torso_pair(), random_extractor()
    displacement = shift(pair, 5.0, requires_grad=True)
    DeepSimSimilarity(lambda: extractor)(pair, pair.moving, displacement).backward()
    assert displacement.grad is not None and displacement.grad.abs().sum() > 0
    assert torch.isfinite(displacement.grad).all()
    assert all(p.grad is None and not p.requires_grad for p in extractor.module.parameters())
    assert not extractor.module.training


def test_feature_levels_lie_on_the_halved_grids():
    pair, extractor = torso_pair(), random_extractor()
    features = extractor.features(pair.fixed_hu)
    assert [f.shape[2:] for f in features] == [level_grid(pair.grid, h).shape for h in extractor.halvings]
    assert [f.shape[1] for f in features] == [4, 4, 8]


def test_deepsim_checks_its_inputs():
    a = torch.randn(1, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="levels"):
        deepsim([a], [])
    with pytest.raises(ValueError, match="level 0"):
        deepsim([a], [a[:, :2]])
    assert deepsim([a], [-a]).item() == pytest.approx(2.0)
    no_hu = PairBatch(fixed=torso_pair().fixed, moving=torso_pair().moving, weight=torso_pair().weight,
                      grid=torso_pair().grid)
    with pytest.raises(ValueError, match="HU"):
        DeepSimSimilarity(random_extractor)(no_hu, no_hu.moving, shift(no_hu, 0.0))


@pytest.mark.parametrize("spec", ["deepsim", "deepsim-sam", "0.5*lncc+0.5*deepsim"])
def test_registered_terms_load_the_shipped_networks_and_rank_alignment(spec):
    pair = torso_pair()
    objective = RegistrationObjective(ObjectiveSettings(similarity=spec, regulariser_weight=0.0, dice_weight=0.0))
    aligned, parts = objective(pair, shift(pair, 0.0))
    misaligned, _ = objective(pair, shift(pair, 12.0))
    assert aligned.item() < misaligned.item()
    assert {"deepsim", "deepsim-sam"} <= set(similarity_names())
    assert parts.get("deepsim", parts.get("deepsim-sam", 0.0)) == pytest.approx(0.0, abs=1e-5)


def test_compact_classes_merge_totalsegmentator_labels():
    labels = torch.tensor([0, 0, 5, 2, 3, 18, 30, 52, 999 % 256])
    hu = torch.tensor([-900.0, 40.0, 60.0, 30.0, 30.0, 20.0, 500.0, 200.0, 0.0])
    assert compact_labels(labels, hu).tolist() == [0, 1, 2, 4, 4, 7, 9, 11, 1]
    assert len(CLASS_NAMES) == SegmentationConfig().classes


def test_segmentation_network_trains_a_few_steps_and_lowers_its_loss():
    volumes = [{"image": str(SAMPLES / "patientA_abdomen_ct.nii.gz"),
                "labels": str(SAMPLES / "patientA_abdomen_labels.nii.gz")}]
    scans = prepare_scans(volumes, [], 6.0)
    batch = sample_batch(scans, 2, (8, 24, 24), Augmentation(), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = SegmentationUNet(TINY)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, parts = segmentation_loss(model, batch, torch.device("cpu"))
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert set(parts) == {"cross_entropy", "dice_loss"}
    assert losses[-1] < 0.9 * losses[0], losses


def test_shipped_segmentation_weights_segment_the_bundled_slab():
    model = load_segmentation()
    hu = to_working_grid(small_torso(4.0, (400.0, 320.0, 40.0)), 2.0, is_ct=True)
    with torch.no_grad():
        predicted = model(hu.data[None, None]).argmax(dim=1)[0]
    air_or_lung = torch.isin(predicted, torch.tensor([0, CLASS_NAMES.index("lung")]))
    assert air_or_lung[hu.data < -900].float().mean() > 0.95
    assert (predicted[(hu.data > 0) & (hu.data < 100)] >= 1).float().mean() > 0.95  # tissue or an organ


def test_cli_rejects_an_unknown_similarity_with_the_valid_names(tmp_path, capfd):
    code = main(["fixed.nii.gz", "moving.nii.gz", "-o", str(tmp_path / "out"), "--similarity", "lncc+0.1*bogus"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(err) == 1
    assert err[0].startswith("same-register: error: --similarity") and "bogus" in err[0] and "deepsim" in err[0]
    assert not (tmp_path / "out").exists()
