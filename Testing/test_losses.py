"""Tests for SAMERegistrationLib.losses: every value is checked against a hand / closed-form value.

Tests that take ``device="cpu"`` are re-run on CUDA by ``test_cuda_runs_the_same_checks``.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for running without installation

from SAMERegistrationLib.losses import (  # noqa: E402
    REGULARIZERS,
    SIMILARITY_LOSSES,
    bending_energy,
    diffusion,
    local_ncc,
    mutual_information,
    ncc,
    similarity_loss,
    soft_dice,
    ssd,
    total_variation,
)

F64 = torch.float64


def rand(shape, seed, device, dtype=F64, normal=False):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn if normal else torch.rand
    return sample(shape, generator=generator, dtype=dtype).to(device)


def close(value, expected, tol=1e-6):
    assert value.dim() == 0
    assert abs(value.item() - expected) < tol, (value.item(), expected)


# ---------------------------------------------------------------- ssd


def test_ssd_hand_values(device="cpu"):
    fixed = torch.full((1, 1, 1, 1, 4), 2.0, device=device)
    warped = torch.arange(4.0, device=device).reshape(1, 1, 1, 1, 4)  # squared diffs 4, 1, 0, 1
    close(ssd(fixed, warped), 6 / 4)
    close(ssd(fixed, warped, torch.tensor([1.0, 1, 0, 0], device=device)), 5 / 2)  # broadcast along W
    close(ssd(fixed, warped, torch.tensor([1.0, 3, 0, 0], device=device)), (4 + 3) / 4)  # soft weights
    close(ssd(fixed, warped, torch.zeros(4, device=device)), 0.0)  # empty mask -> 0, not NaN


# ---------------------------------------------------------------- ncc


def test_ncc_identities(device="cpu"):
    x = rand((2, 2, 4, 5, 6), 0, device)
    close(ncc(x, x), 0.0)
    close(ncc(x, -x), 2.0)
    close(ncc(x, 3 * x + 5), 0.0)
    close(ncc(x, torch.cat([x[:1], -x[1:]])), 1.0)  # batch item 0 gives NCC 1, item 1 gives -1


def test_ncc_matches_numpy_corrcoef(device="cpu"):
    a = np.arange(1.0, 9.0)
    b = np.array([2.0, 1, 4, 3, 6, 8, 7, 5])
    fixed = torch.tensor(a, device=device).reshape(1, 1, 2, 2, 2)
    warped = torch.tensor(b, device=device).reshape(1, 1, 2, 2, 2)
    close(ncc(fixed, warped), 1 - np.corrcoef(a, b)[0, 1], 1e-5)
    keep = np.array([1, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
    mask = torch.tensor(keep, device=device, dtype=F64).reshape(1, 1, 2, 2, 2)
    close(ncc(fixed, warped, mask), 1 - np.corrcoef(a[keep], b[keep])[0, 1], 1e-5)


# ---------------------------------------------------------------- local ncc


def lncc_reference(f, w, window, eps=1e-5, mask=None):
    """Explicit per-voxel loop; windows truncated at the volume border; population statistics."""
    radius = [k // 2 for k in window]
    cc = np.zeros_like(f)
    for n, c, k, j, i in np.ndindex(f.shape):
        box = (n, c) + tuple(slice(max(p - r, 0), p + r + 1) for p, r in zip((k, j, i), radius))
        a, b = f[box], w[box]
        cov = ((a - a.mean()) * (b - b.mean())).mean()
        cc[n, c, k, j, i] = cov**2 / (a.var() * b.var() + eps)
    if mask is None:
        return 1 - cc.mean()
    weights = np.broadcast_to(mask, f.shape)
    return 1 - (weights * cc).sum() / weights.sum()


def test_local_ncc_matches_loop_reference(device="cpu"):
    fixed = rand((2, 2, 5, 6, 7), 1, device)
    warped = fixed + 0.5 * rand((2, 2, 5, 6, 7), 2, device)
    f, w = fixed.cpu().numpy(), warped.cpu().numpy()
    close(local_ncc(fixed, warped, window=3), lncc_reference(f, w, (3, 3, 3)), 1e-5)
    close(local_ncc(fixed, warped, window=(3, 1, 5)), lncc_reference(f, w, (3, 1, 5)), 1e-5)
    mask = rand((2, 1, 5, 6, 7), 3, device)
    expected = lncc_reference(f, w, (3, 3, 3), mask=mask.cpu().numpy())
    close(local_ncc(fixed, warped, window=3, mask=mask), expected, 1e-5)


def test_local_ncc_window_larger_than_volume_is_global_r_squared(device="cpu"):
    # Every truncated 11-voxel window covers the whole 4x5x6 volume, so cc = r^2 everywhere.
    fixed = rand((1, 1, 4, 5, 6), 4, device, normal=True)
    warped = fixed + rand((1, 1, 4, 5, 6), 5, device, normal=True)
    r = np.corrcoef(fixed.cpu().numpy().ravel(), warped.cpu().numpy().ravel())[0, 1]
    close(local_ncc(fixed, warped, window=11), 1 - r**2, 1e-4)


def test_local_ncc_identity_and_affine_invariance(device="cpu"):
    x = 10 * rand((1, 1, 5, 6, 7), 6, device, normal=True)
    y = 10 * rand((1, 1, 5, 6, 7), 7, device, normal=True)
    close(local_ncc(x, x, window=3), 0.0, 1e-5)
    close(local_ncc(x, 3 * x + 5, window=3), 0.0, 1e-5)
    close(local_ncc(x, -2 * x + 1, window=3), 0.0, 1e-5)  # squared correlation: inversion is a match
    close(local_ncc(x, 3 * y + 5, window=3), local_ncc(x, y, window=3).item(), 1e-5)
    assert local_ncc(x.float(), y.float(), window=5).dtype == torch.float32


def test_gradcheck_local_ncc_and_regularizers(device="cpu"):
    fixed = rand((1, 2, 3, 4, 5), 8, device)
    warped = rand((1, 2, 3, 4, 5), 9, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: local_ncc(fixed, w, window=3), (warped,))
    disp = rand((1, 3, 3, 3, 4), 10, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda d: diffusion(d, (1.0, 2.0, 3.0)), (disp,))
    assert torch.autograd.gradcheck(lambda d: bending_energy(d, (1.0, 2.0, 3.0)), (disp,))
    assert torch.autograd.gradcheck(
        lambda w: mutual_information(fixed, w, bins=8, value_range=(-0.5, 1.5)), (warped,)
    )


# ---------------------------------------------------------------- mutual information


def test_mi_of_binary_images_is_binary_entropy(device="cpu"):
    image = torch.zeros(1, 1, 4, 4, 4, dtype=F64, device=device)
    image[:, :, 2:] = 1  # half 0, half 1: H = ln 2
    sharp = dict(bins=32, sigma=0.002)
    close(mutual_information(image, image, **sharp), -math.log(2), 0.05)
    close(mutual_information(image, 1 - image, **sharp), -math.log(2), 0.05)  # MI ignores inversion
    quarter = torch.zeros_like(image)
    quarter[:, :, 3:] = 1  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    close(mutual_information(quarter, quarter, **sharp), -entropy, 0.05)


def test_mi_masked_region_only(device="cpu"):
    fixed = (torch.arange(8, device=device, dtype=F64) % 2).expand(1, 1, 4, 8, 8).contiguous()  # 0/1 along W
    warped = fixed.clone()
    warped[:, :, 2:] = (rand((1, 1, 2, 8, 8), 11, device) > 0.5).to(F64)  # unrelated outside the mask
    mask = torch.zeros(1, 1, 4, 1, 1, dtype=F64, device=device)
    mask[:, :, :2] = 1
    close(mutual_information(fixed, warped, mask, sigma=0.002), -math.log(2), 0.05)


def test_mi_independent_images_near_zero(device="cpu"):
    fixed = rand((1, 1, 32, 32, 32), 12, device)
    warped = rand((1, 1, 32, 32, 32), 13, device)
    loss = mutual_information(fixed, warped, bins=16)
    assert -0.05 < loss.item() <= 1e-9  # plug-in MI is a KL divergence: >= 0


def test_mi_gradient_and_reproducible_subsample(device="cpu"):
    fixed = rand((1, 1, 16, 16, 16), 14, device, dtype=torch.float32)
    warped = (fixed + 0.1 * rand(fixed.shape, 15, device, dtype=torch.float32)).requires_grad_()
    loss = mutual_information(fixed, warped)
    loss.backward()
    assert loss.item() < 0 and torch.isfinite(warped.grad).all() and warped.grad.abs().sum() > 0

    def subsampled(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return mutual_information(fixed, warped, max_samples=500, generator=generator).item()

    assert subsampled(0) == subsampled(0)
    assert subsampled(0) != subsampled(1)
    # All 4096 voxels fit in max_samples: the generator is irrelevant.
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in (0, 1)]
    whole = [mutual_information(fixed, warped, generator=generator) for generator in generators]
    assert whole[0].item() == whole[1].item() == loss.item()


# ---------------------------------------------------------------- soft dice


def test_soft_dice_overlapping_cubes(device="cpu"):
    def one_hot(lo, hi):  # 3 labels: background, a 4^3 cube, label 2 absent
        labels = torch.zeros(1, 3, 10, 10, 10, dtype=F64, device=device)
        labels[0, 1, lo:hi, lo:hi, lo:hi] = 1
        labels[0, 0] = 1 - labels[0, 1]
        return labels

    a, b = one_hot(0, 4), one_hot(2, 6)  # 64 voxels each, overlap 2^3 = 8
    close(soft_dice(a, b), 1 - 2 * 8 / (64 + 64), 1e-12)
    dice_background = 2 * (1000 - 120) / (936 + 936)  # |A u B| = 120
    close(soft_dice(a, b, exclude_background=False), 1 - (dice_background + 2 * 8 / 128) / 2, 1e-12)
    mask = torch.zeros(1, 1, 1, 1, 10, dtype=F64, device=device)
    mask[..., :4] = 1  # x < 4 keeps all of A (64), half of B (32) and all of the overlap (8)
    close(soft_dice(a, b, mask), 1 - 2 * 8 / (64 + 32), 1e-12)
    empty = torch.zeros_like(a)
    close(soft_dice(empty, empty), 0.0)


# ---------------------------------------------------------------- regularizers

SPACING = (1.0, 2.0, 3.0)  # mm along x (W), y (H), z (D)
SHAPE = (4, 5, 6)  # D, H, W


def mm_coordinates(device, spacing=SPACING):
    """(x, y, z) physical coordinates in mm, each of shape (D, H, W)."""
    d, h, w = SHAPE
    axes = [torch.arange(n, dtype=F64, device=device) * s for n, s in zip((d, h, w), spacing[::-1])]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return x, y, z


def field(component, values):
    disp = torch.zeros(1, 3, *SHAPE, dtype=F64, device=values.device)
    disp[0, component] = values
    return disp


@pytest.mark.parametrize("component, axis", [(0, 0), (1, 1), (2, 2), (0, 2), (2, 1)])
def test_linear_and_quadratic_fields(component, axis, device="cpu"):
    a, c = 0.7, -0.3
    coordinate = mm_coordinates(device)[axis]
    linear = field(component, a * coordinate)  # one component, derivative a along one axis
    close(diffusion(linear, SPACING), a**2 / 3, 1e-12)
    close(total_variation(linear, SPACING), abs(a) / 3, 1e-12)
    close(bending_energy(linear, SPACING), 0.0, 1e-12)
    close(bending_energy(field(component, c * coordinate**2), SPACING), (2 * c) ** 2 / 3, 1e-12)


@pytest.mark.parametrize("axes", [(0, 1), (0, 2), (1, 2)])
def test_bending_mixed_term(axes, device="cpu"):
    c = 0.4
    coordinates = mm_coordinates(device)
    bilinear = field(1, c * coordinates[axes[0]] * coordinates[axes[1]])  # only u_ab = c, counted twice
    close(bending_energy(bilinear, SPACING), 2 * c**2 / 3, 1e-12)


def test_regularizers_match_numpy_and_scale_with_spacing(device="cpu"):
    disp = rand((2, 3, *SHAPE), 16, device)
    u = disp.cpu().numpy()
    # Hand reference: numpy forward differences, spacing[0] on W (axis 4), [1] on H (3), [2] on D (2).
    steps = [np.diff(u, axis=axis) / s for axis, s in zip((4, 3, 2), SPACING)]
    close(diffusion(disp, SPACING), sum((g**2).mean() for g in steps), 1e-12)
    close(total_variation(disp, SPACING), sum(np.abs(g).mean() for g in steps), 1e-12)
    s = 2.5
    iso = (s, s, s)
    close(diffusion(disp, iso), diffusion(disp, (1, 1, 1)).item() / s**2, 1e-12)
    close(total_variation(disp, iso), total_variation(disp, (1, 1, 1)).item() / s, 1e-12)
    close(bending_energy(disp, iso), bending_energy(disp, (1, 1, 1)).item() / s**4, 1e-12)
    constant = torch.full_like(disp, 3.0)
    for regularize in (diffusion, total_variation, bending_energy):
        close(regularize(constant, SPACING), 0.0)


# ---------------------------------------------------------------- validation and registry


def test_invalid_arguments_raise_value_error():
    image = torch.zeros(1, 1, 4, 5, 6)
    with pytest.raises(ValueError, match=r"local_ncc\(\): 'window' must be odd, got 4"):
        local_ncc(image, image, window=4)
    with pytest.raises(ValueError, match=r"ssd\(\): 'fixed' and 'warped' must have the same shape"):
        ssd(image, torch.zeros(1, 1, 4, 5, 7))
    with pytest.raises(ValueError, match=r"ncc\(\): 'fixed' must be 5-D"):
        ncc(image[0], image[0])
    with pytest.raises(ValueError, match=r"ssd\(\): 'mask' must be broadcastable"):
        ssd(image, image, torch.ones(2, 1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"mutual_information\(\): 'bins' must be >= 2, got 1"):
        mutual_information(image, image, bins=1)
    with pytest.raises(ValueError, match=r"soft_dice\(\): 'fixed_probs' needs at least 2"):
        soft_dice(image, image)
    with pytest.raises(ValueError, match=r"diffusion\(\): 'disp' must have shape \(N, 3, D, H, W\), got"):
        diffusion(image, SPACING)
    with pytest.raises(ValueError, match=r"bending_energy\(\): 'spacing' must be 3 positive"):
        bending_energy(torch.zeros(1, 3, 4, 5, 6), (1.0, 0.0, 1.0))


def test_registry():
    assert set(SIMILARITY_LOSSES) == {"ssd", "ncc", "lncc", "mi"}
    assert set(REGULARIZERS) == {"diffusion", "tv", "bending"}
    fixed, warped = rand((1, 1, 5, 6, 7), 17, "cpu"), rand((1, 1, 5, 6, 7), 18, "cpu")
    mask = rand((1, 1, 5, 6, 7), 19, "cpu")
    loss = similarity_loss("lncc", window=5)
    assert loss(fixed, warped).item() == local_ncc(fixed, warped, window=5).item()
    assert loss(fixed, warped, mask).item() == local_ncc(fixed, warped, window=5, mask=mask).item()
    with pytest.raises(ValueError, match=r"'bogus'.*'lncc', 'mi', 'ncc', 'ssd'"):
        similarity_loss("bogus")
    with pytest.raises(TypeError):
        similarity_loss("ncc", window=3)


# ---------------------------------------------------------------- CUDA

DEVICE_TESTS = [
    test_ssd_hand_values,
    test_ncc_identities,
    test_ncc_matches_numpy_corrcoef,
    test_local_ncc_matches_loop_reference,
    test_local_ncc_window_larger_than_volume_is_global_r_squared,
    test_local_ncc_identity_and_affine_invariance,
    test_gradcheck_local_ncc_and_regularizers,
    test_mi_of_binary_images_is_binary_entropy,
    test_mi_masked_region_only,
    test_mi_independent_images_near_zero,
    test_mi_gradient_and_reproducible_subsample,
    test_soft_dice_overlapping_cubes,
    test_regularizers_match_numpy_and_scale_with_spacing,
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_runs_the_same_checks():
    for check in DEVICE_TESTS:
        check(device="cuda")
    for component, axis in [(0, 0), (1, 1), (2, 2)]:
        test_linear_and_quadratic_fields(component, axis, device="cuda")
    test_bending_mixed_term((0, 2), device="cuda")
    x = rand((1, 2, 6, 7, 8), 20, "cuda", dtype=torch.float32)
    y = rand((1, 2, 6, 7, 8), 21, "cuda", dtype=torch.float32)
    for name, loss in SIMILARITY_LOSSES.items():
        on_gpu, on_cpu = loss(x, y), loss(x.cpu(), y.cpu())
        assert on_gpu.device.type == "cuda", name
        assert abs(on_gpu.item() - on_cpu.item()) < 1e-4, name
