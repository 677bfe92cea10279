"""The MIND-SSC baseline descriptor (SAMERegistrationLib/descriptors/mind.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SAMERegistrationLib.descriptors.mind import NEIGHBOUR_PAIRS, MINDConfig, mind_embed, mind_ssc
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image
from SAMERegistrationLib.preprocess import to_working_grid
from SAMERegistrationLib.sam.embedding import feature_grids
from SAMERegistrationLib.sam.matching import match_points
from SAMERegistrationLib.spatial.grid import Grid

TORSO = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "patientA_torso_ct.nii.gz"


@pytest.fixture(scope="module")
def torso() -> Image:
    return read_image(TORSO)


def _crop(image: Image, start_kji, size_kji) -> Image:
    """The block of ``size_kji`` voxels from ``start_kji``, on ``image``'s own grid origin (so that the
    same array offset in two crops means a known translation of the anatomy)."""
    (k, j, i), (d, h, w) = start_kji, size_kji
    grid = Grid.create((d, h, w), image.grid.spacing, image.grid.origin, image.grid.direction_matrix)
    return Image(image.data[k:k + d, j:j + h, i:i + w].contiguous(), grid)


def test_neighbour_pairs_are_the_twelve_non_opposite_pairs_of_the_six_neighbourhood():
    assert len(set(NEIGHBOUR_PAIRS)) == 12
    for p, q in NEIGHBOUR_PAIRS:
        assert sum(abs(v) for v in p) == 1 and sum(abs(v) for v in q) == 1
        assert sum((a - b) ** 2 for a, b in zip(p, q)) == 2          # sqrt(2) apart: never opposite
    assert len({frozenset(pair) for pair in NEIGHBOUR_PAIRS}) == 12


def test_constant_image_gives_twelve_equal_channels():
    descriptor = mind_ssc(torch.full((9, 10, 11), -300.0))
    assert descriptor.shape == (12, 9, 10, 11)
    assert torch.equal(descriptor, torch.ones_like(descriptor))
    assert torch.allclose(F.normalize(descriptor, dim=0), torch.full_like(descriptor, 1 / math.sqrt(12)))


def test_ramp_by_hand():
    """I = 7 x along W: pairs whose offsets differ along W have patch distance (7 d)^2 * 2 ... all
    equal; the 4 pairs in the D-H plane have distance 0. After subtracting the minimum the 12
    distances are {0 x 4, c x 8}, their mean 2c/3, so the channels are 1 and exp(-1.5)."""
    ramp = 7.0 * torch.arange(24.0).expand(16, 18, 24).contiguous()
    descriptor = mind_ssc(ramp, radius=1, dilation=2)[:, 8, 9, 12]
    expected = torch.tensor([1.0 if p[2] == q[2] else math.exp(-1.5) for p, q in NEIGHBOUR_PAIRS])
    assert torch.allclose(descriptor, expected, atol=1e-6)
    assert int((descriptor > 0.99).sum()) == 4


def test_invariant_to_linear_intensity_change(torso):
    block = torso.data[40:64, 30:62, 30:70].contiguous()
    reference = mind_ssc(block, radius=2, dilation=2)
    for gain, offset in ((2.5, 300.0), (0.01, -5.0), (1.1, 30.0)):
        assert (mind_ssc(gain * block + offset, radius=2, dilation=2) - reference).abs().max() < 1e-4


def _reference_mind(volume: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """MIND-SSC written out plainly: replicate-pad, 12 squared differences, box mean, exp(-D/V)."""
    pad = dilation + radius
    padded = F.pad(volume[None, None], (pad,) * 6, mode="replicate")[0, 0]
    size = [n + 2 * radius for n in volume.shape]

    def at(offset):
        return padded[tuple(slice(dilation + o * dilation, dilation + o * dilation + n) for o, n in zip(offset, size))]

    distances = torch.stack([F.avg_pool3d(((at(p) - at(q)) ** 2)[None, None], 2 * radius + 1, stride=1)[0, 0]
                             for p, q in NEIGHBOUR_PAIRS])
    distances = distances - distances.min(dim=0).values
    variance = distances.mean(dim=0)
    variance = variance.clamp(float(variance.mean()) * 1e-3, float(variance.mean()) * 1e3)
    return torch.exp(-distances / variance)


@pytest.mark.parametrize("radius, dilation", [(1, 2), (2, 2), (2, 3)])
def test_fast_mind_equals_plain_formula_at_every_stride(radius, dilation):
    volume = torch.randn(15, 18, 21, dtype=torch.float64).cumsum(0).cumsum(2)
    reference = _reference_mind(volume, radius, dilation)
    assert torch.allclose(mind_ssc(volume, radius, dilation), reference, atol=1e-12)
    for stride in (2, 4):
        # The variance clamp uses the mean over the returned voxels, so compare where it is inactive.
        expected = reference[:, ::stride, ::stride, ::stride]
        assert torch.allclose(mind_ssc(volume, radius, dilation, stride=stride), expected, atol=1e-12)


def test_embedding_shapes_grids_and_unit_norm(torso):
    image = _crop(torso, (30, 20, 20), (30, 45, 57))
    config = MINDConfig()
    embeddings = mind_embed(image, config)
    working = to_working_grid(image, config.spacing_mm, is_ct=True).grid
    local_grid, coarse_grid = feature_grids(working)
    assert embeddings.local.grid == local_grid and embeddings.coarse.grid == coarse_grid
    assert embeddings.local.features.shape == (12, *[-(-n // 2) for n in working.shape])
    assert embeddings.coarse.features.shape == (12 * len(config.context), *[-(-n // 8) for n in working.shape])
    for feature_map in (embeddings.local, embeddings.coarse):
        assert feature_map.features.dtype == torch.float32
        assert torch.allclose(feature_map.features.norm(dim=0), torch.ones(()), atol=1e-5)
        assert bool((feature_map.features >= 0).all())


def test_matching_recovers_an_integer_translation(torso):
    """Two crops of the bundled 3 mm CT, the second shifted by (2, -3, 4) voxels (k, j, i) but given
    the same grid: the anatomy at fixed point x is at x - (direction * spacing) @ shift_ijk."""
    start, size, shift_kji = np.array((30, 25, 30)), (36, 48, 60), np.array((2, -3, 4))
    fixed = _crop(torso, start, size)
    moving = _crop(torso, start + shift_kji, size)
    generator = torch.Generator().manual_seed(0)
    margin = 6
    index_kji = torch.stack([torch.randint(margin, n - margin, (300,), generator=generator) for n in size], dim=1)
    inside_body = fixed.data[index_kji[:, 0], index_kji[:, 1], index_kji[:, 2]] > -500
    index_ijk = index_kji[inside_body].flip(-1).double()
    matrix = torch.as_tensor(fixed.grid.index_to_world())
    points = (index_ijk @ matrix[:3, :3].T + matrix[:3, 3]).float()
    truth = ((index_ijk - torch.as_tensor(shift_kji[::-1].copy())) @ matrix[:3, :3].T + matrix[:3, 3]).float()
    assert len(points) > 100
    matches = match_points(mind_embed(fixed), mind_embed(moving), points)
    error = (matches.points - truth).norm(dim=-1)
    print(f"MIND translation test: median {float(error.median()):.2f} mm, 90th pct {float(torch.quantile(error, 0.9)):.2f} mm, {len(points)} points")
    assert float(error.median()) < 4.0, f"median error {float(error.median()):.2f} mm"
