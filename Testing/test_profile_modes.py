"""benchmarks/profile_modes.py: what its profile counts, on a toy stage (not a registration)."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_modes import (OUTSIDE, MachineRates, RegionProfile, _counting_convolutions, _timed_phase,
                                      collect_regions)


class ToyStage:
    """A stage-like object: one strided convolution network, a trilinear warp with gradients."""

    name = "toy"

    def __init__(self) -> None:
        self.network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, stride=2, padding=1))

    def run(self, problem, transform, progress):
        image = torch.randn(1, 2, 8, 10, 12, requires_grad=True)
        features = self.network(image)  # (1, 4, 4, 5, 6)
        grid = torch.zeros(1, 3, 5, 7, 3, requires_grad=True)
        warped = F.grid_sample(features, grid, align_corners=True)  # 4 channels x 105 points
        (warped.sum() + torch.mm(torch.ones(6, 7), torch.ones(7, 8)).sum()).backward()
        return transform


def test_profile_counts_convolutions_products_and_samples_per_region() -> None:
    stage = ToyStage()
    flops: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    stage.run = _counting_convolutions(stage, flops)
    phase_product = _timed_phase(lambda: torch.mm(torch.ones(3, 4), torch.ones(4, 5)), "phase one", seconds)
    regions: dict[str, RegionProfile] = defaultdict(RegionProfile)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as step:
        stage.run(None, "transform", None)
        phase_product()
    collect_regions(step.events(), regions, "toy")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as step:
        torch.mm(torch.ones(2, 2), torch.ones(2, 2))
    collect_regions(step.events(), regions, OUTSIDE)

    conv_forward = 2 * 2 * 27 * 4 * (4 * 5 * 6)  # 2 FLOP x in-channels x 3^3 x out-channels x output voxels
    assert flops == {"toy": conv_forward}  # counted by the hook
    toy = regions["toy"]
    assert toy.flops == 2 * conv_forward + 2 * 6 * 7 * 8  # profiler: backward (input + weights), the mm
    assert toy.samples_forward == 4 * 3 * 5 * 7
    assert toy.samples_backward == 4 * 3 * 5 * 7
    assert regions["phase one"].flops == 2 * 3 * 4 * 5 and seconds["phase one"] > 0
    assert regions[OUTSIDE].flops == 2 * 2 * 2 * 2
    assert toy.self_s["aten::grid_sampler_3d"] > 0 and "aten::grid_sampler_3d" not in regions[OUTSIDE].self_s

    rates = MachineRates(gemm_flops_per_s=1e9, sample_s_per_value=1e-8)
    assert abs(toy.floor_s(rates) - (toy.flops / 1e9 + 3 * 420 * 1e-8)) < 1e-12
