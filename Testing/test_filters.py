"""Box filters (SAMERegistrationLib.filters): window means against a loop over every window."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SAMERegistrationLib.filters import window_mean


def _loop_mean(volume: np.ndarray, sizes: tuple[int, int, int], border: str, stride: int) -> np.ndarray:
    """The mean over each window by explicit indexing: (C, D, H, W) numpy."""
    radius = [k // 2 for k in sizes]
    shape = volume.shape[1:]
    if border == "replicate":
        volume = np.pad(volume, [(0, 0)] + [(r, r) for r in radius], mode="edge")
    centres = [range(0, n, stride) for n in shape]
    out = np.zeros((volume.shape[0], *[len(c) for c in centres]))
    for index in itertools.product(*[range(len(c)) for c in centres]):
        position = [c[i] for c, i in zip(centres, index)]
        if border == "replicate":
            box = tuple(slice(p, p + 2 * r + 1) for p, r in zip(position, radius))
        else:
            box = tuple(slice(max(p - r, 0), p + r + 1) for p, r in zip(position, radius))
        out[(slice(None), *index)] = volume[(slice(None), *box)].mean(axis=(1, 2, 3))
    return out


@pytest.mark.parametrize("border", ["truncate", "replicate"])
@pytest.mark.parametrize("sizes,stride", [((3, 3, 3), 1), ((1, 5, 9), 1), ((5, 3, 7), 2), ((9, 9, 9), 3),
                                          ((7, 7, 7), 1), ((15, 15, 15), 1)])
def test_window_mean_matches_loop_reference(border, sizes, stride):
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(2, 9, 7, 6))
    result = window_mean(torch.from_numpy(volume), sizes, border=border, stride=stride).numpy()
    np.testing.assert_allclose(result, _loop_mean(volume, sizes, border, stride), rtol=0, atol=1e-12)


@pytest.mark.parametrize("border", ["truncate", "replicate"])
def test_window_mean_of_windows_longer_than_the_axis(border):
    """Shifted-copy sums (windows up to 7) and cumulative sums (larger) on axes of 2 and 3 voxels."""
    volume = np.random.default_rng(4).normal(size=(1, 2, 3, 9))
    for sizes in ((5, 7, 3), (11, 9, 3)):
        result = window_mean(torch.from_numpy(volume), sizes, border=border).numpy()
        np.testing.assert_allclose(result, _loop_mean(volume, sizes, border, 1), rtol=0, atol=1e-12)


def test_window_mean_matches_pytorch_pooling():
    volume = torch.rand(2, 13, 17, 22, dtype=torch.float64)
    truncated = F.avg_pool3d(volume[None], 5, stride=4, padding=2, count_include_pad=False)[0]
    assert torch.allclose(window_mean(volume, 5, stride=4), truncated)
    replicated = F.avg_pool3d(F.pad(volume[None], (1,) * 6, mode="replicate"), 3, stride=1)[0]
    assert torch.allclose(window_mean(volume, 3, border="replicate"), replicated)


def test_window_mean_leading_dimensions_and_gradient():
    volume = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    batched = window_mean(volume, (3, 5, 3), border="replicate")
    assert batched.shape == volume.shape
    assert torch.equal(batched[1, 2], window_mean(volume[1, 2], (3, 5, 3), border="replicate"))
    assert torch.autograd.gradcheck(lambda v: window_mean(v, 3), (volume,))
    assert torch.autograd.gradcheck(lambda v: window_mean(v, 5, border="replicate", stride=2), (volume,))


def test_window_mean_float32_keeps_precision_on_long_axes():
    """Cumulative sums along a 300-voxel axis of values with a large offset: the error of a window
    mean stays near float32 resolution of the values, not of the running sum."""
    generator = torch.Generator().manual_seed(0)
    volume = 1000 + torch.randn(1, 300, 8, 8, generator=generator, dtype=torch.float64) * 50
    exact = window_mean(volume, 9)
    approximate = window_mean(volume.float(), 9).double()
    assert float((approximate - exact).abs().max()) < 0.05          # values ~1000, float32 step 6e-5


def test_window_mean_rejects_bad_arguments():
    volume = torch.zeros(4, 4, 4)
    for window in (2, 0, (3, 3), (3, 4, 3)):
        with pytest.raises(ValueError, match="window"):
            window_mean(volume, window)
    with pytest.raises(ValueError, match="stride"):
        window_mean(volume, 3, stride=0)
    with pytest.raises(ValueError, match="border"):
        window_mean(volume, 3, border="zeros")
    with pytest.raises(ValueError, match="D, H, W"):
        window_mean(torch.zeros(4, 4), 3)
