"""Li & Fan's FCN (fcn/), the multi-resolution deep-supervision loss (learning/multiresolution.py)
and refining a trained network on one pair through the shared instance-optimisation loop."""

from __future__ import annotations

import json

import pytest
import torch

from SAMERegistrationLib.fcn.network import FCNConfig, LiFanFCN, fcn_displacements, load_fcn
from SAMERegistrationLib.fcn.registration import register_pair
from SAMERegistrationLib.fcn.train import main as train_main
from SAMERegistrationLib.learning.multiresolution import LI_FAN_WEIGHTS, multiresolution_loss
from SAMERegistrationLib.learning.objective import ObjectiveSettings, RegistrationObjective
from SAMERegistrationLib.networks.unet import half_grid
from SAMERegistrationLib.spatial.fields import resample_batch

from test_deepsim import torso_pair
from test_sam import REPO

TINY = FCNConfig(encoder=(4, 8, 8, 8), decoder=(8, 4))
SSD = RegistrationObjective(ObjectiveSettings(similarity="ssd", regulariser="tv", regulariser_weight=0.1,
                                              dice_weight=0.0))


def shifted_pair():
    """The torso pair with the moving image shifted by one 8 mm voxel along x."""
    pair = torso_pair()
    return type(pair)(fixed=pair.fixed, moving=torch.roll(pair.moving, 1, dims=4), weight=pair.weight,
                      grid=pair.grid, fixed_hu=pair.fixed_hu, moving_hu=torch.roll(pair.moving_hu, 1, dims=4))


def test_three_outputs_on_the_halved_grids_for_odd_sizes():
    torch.manual_seed(0)
    pair = torso_pair()
    crop = type(pair)(fixed=pair.fixed[..., :11, :9, :7], moving=pair.moving[..., :11, :9, :7],
                      weight=pair.weight[..., :11, :9, :7], grid=pair.grid)
    crop.grid = type(pair.grid).create((11, 9, 7), pair.grid.spacing, pair.grid.origin)
    outputs = fcn_displacements(LiFanFCN(TINY), crop)
    grids = [crop.grid, half_grid(crop.grid), half_grid(half_grid(crop.grid))]
    assert [g for _, g in outputs] == grids
    assert [tuple(u.shape) for u, _ in outputs] == [(1, 3, *g.shape) for g in grids]
    assert [g.shape for g in grids] == [(11, 9, 7), (6, 5, 4), (3, 3, 2)]


def test_level_weights_are_applied_as_configured():
    pair = torso_pair()
    generator = torch.Generator().manual_seed(0)
    grids = [pair.grid, half_grid(pair.grid), half_grid(half_grid(pair.grid))]
    displacements = [(torch.randn((1, 3, *g.shape), generator=generator) * 3.0, g) for g in grids]
    singles = []
    for u, grid in displacements:
        on_pair = u if grid == pair.grid else resample_batch(u, grid, pair.grid)
        singles.append(SSD(pair, on_pair, regularised=u, regularised_grid=grid)[0].item())
    for weights in (LI_FAN_WEIGHTS, (0.0, 1.0, 0.0), (0.2, 0.0, 2.0)):
        loss, parts = multiresolution_loss(SSD, pair, displacements, weights)
        assert loss.item() == pytest.approx(sum(w * s for w, s in zip(weights, singles)), rel=1e-5)
        assert sorted(k for k in parts if k.startswith("loss@")) == [f"loss@{i}" for i, w in enumerate(weights) if w]
    with pytest.raises(ValueError, match="weights"):
        multiresolution_loss(SSD, pair, displacements, (1.0, 0.5))
    with pytest.raises(ValueError, match=">= 0"):
        multiresolution_loss(SSD, pair, displacements, (1.0, -0.5, 0.1))


def test_refining_on_a_pair_lowers_its_loss_and_leaves_the_trained_network_unchanged():
    torch.manual_seed(0)
    pair, model = shifted_pair(), LiFanFCN(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predicted, report0 = register_pair(model, pair, SSD, iterations=0)
    refined, report = register_pair(model, pair, SSD, iterations=15, learning_rate=3e-3)
    assert report0.loss_after == pytest.approx(report.loss_before, rel=1e-5)
    assert report.loss_after < 0.95 * report.loss_before
    assert refined.shape == (1, 3, *pair.grid.shape) and not refined.requires_grad
    assert not torch.equal(predicted, refined)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_training_script_runs_and_ships_checked_weights(tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps({"volumes": [{"image": str(REPO / "Resources/SampleData/patientA_abdomen_ct.nii.gz")}]}))
    code = train_main([str(listing), "-o", str(tmp_path / "run"), "--iterations", "2", "--batch", "1",
                       "--crop", "8", "16", "16", "--threads", "1", "--encoder", "4", "8", "8", "8",
                       "--decoder", "8", "4", "--similarity", "ncc+0.5*mi"])
    assert code == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and {"ncc@0", "mi@2", "tv@1"} <= set(log[0])
    model = load_fcn(tmp_path / "run" / "fcn.pt")
    assert model.config == TINY


def test_training_script_rejects_an_unknown_similarity(tmp_path, capsys):
    assert train_main(["list.json", "-o", str(tmp_path), "--similarity", "nmi"]) == 2
    assert "unknown term 'nmi'" in capsys.readouterr().err
