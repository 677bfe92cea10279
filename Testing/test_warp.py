"""Resampling images and label maps, checked against SimpleITK, exact shifts and exact reorientation."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.spatial import sampling, warp
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.sampling import DisplacedVoxelSampler, chunk_ranges, sample_at_points
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_image, resample_labels


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    return np.array(sitk.VersorTransform(tuple(axis), float(np.deg2rad(degrees))).GetMatrix()).reshape(3, 3)


# oblique, flipped (left-handed) and anisotropic
MOVING_GRID = Grid.create((12, 17, 20), (0.7, 1.3, 2.9), (10.0, -5.0, 3.0),
                          rotation((1.0, 2.0, 0.5), 28.0) @ np.diag([-1.0, -1.0, 1.0]))


def random_image(grid: Grid, seed: int = 0) -> Image:
    generator = torch.Generator().manual_seed(seed)
    return Image(torch.rand(grid.shape, generator=generator) + 0.5, grid)


def reference_image(grid: Grid) -> sitk.Image:
    return Image(torch.zeros(grid.shape), grid).to_sitk()


def sitk_resample(image: Image, target: Grid, transform: sitk.Transform, interpolator=sitk.sitkLinear) -> np.ndarray:
    out = sitk.Resample(image.to_sitk(), reference_image(target), transform, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def blob_labels(grid: Grid, values=(0, 3, 7, 12)) -> Image:
    """Nested ellipsoids around the grid centre, labelled values[1] (outer) ... values[-1] (inner)."""
    points = grid.world_points(torch.float64) - torch.from_numpy(grid.centre_world())
    radius = (points / torch.tensor([1.0, 0.8, 0.65], dtype=torch.float64)).norm(dim=-1)
    labels = torch.full(grid.shape, values[0], dtype=torch.int64)
    for value, limit in zip(values[1:], (11.0, 7.0, 3.5)):
        labels[radius < limit] = value
    return Image(labels, grid)


# ------------------------------------------------------------------------------------- Image
def test_image_round_trips_through_sitk_with_its_geometry():
    image = random_image(MOVING_GRID)
    converted = image.to_sitk()
    assert converted.GetSize() == MOVING_GRID.size_ijk
    np.testing.assert_allclose(converted.GetDirection(), MOVING_GRID.direction_matrix.ravel(), atol=1e-12)
    back = Image.from_sitk(converted)
    assert back.grid == MOVING_GRID
    assert torch.equal(back.data, image.data)
    # voxel [k, j, i] of the array is sitk pixel (i, j, k)
    assert converted.GetPixel(19, 3, 7) == pytest.approx(float(image.data[7, 3, 19]))
    with pytest.raises(ValueError, match="does not match"):
        Image(torch.zeros(12, 20, 17), MOVING_GRID)


# ------------------------------------------------------------------------------------- vs SimpleITK
def test_identity_resampling_onto_a_working_grid_matches_sitk():
    image = random_image(MOVING_GRID)
    target = MOVING_GRID.with_spacing(1.1)
    ours = resample_image(image, target).numpy()
    theirs = sitk_resample(image, target, sitk.Transform())
    assert ours.shape == theirs.shape == target.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # the comparison covers both the inside (values in [0.5, 1.5]) and the zero-filled outside
    assert 0.2 < (theirs > 0).mean() < 0.9
    # ... and the half-voxel rim, where ITK (and we) repeat the edge voxel instead of giving 0
    index = MOVING_GRID.world_to_index_points(target.world_points(torch.float64)).numpy()
    last = np.array(MOVING_GRID.size_ijk) - 1
    in_rim = (((index < 0) | (index > last)).any(axis=-1)
              & ((index >= -0.5) & (index <= last + 0.5)).all(axis=-1))
    assert in_rim.sum() > 100
    assert (ours[in_rim] > 0.4).all()


def test_affine_resampling_matches_sitk_affine_transform():
    image = random_image(MOVING_GRID, seed=1)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((0.2, 1.0, -0.4), 14.0) @ np.diag([1.08, 0.95, 1.03])
    matrix[:3, 3] = (2.5, -3.0, 1.5)
    target = Grid.create((15, 18, 16), (1.6, 1.2, 1.4), (-3.0, -15.0, -6.0), rotation((1.0, 0.0, 1.0), -10.0))
    ours = resample_image(image, target, SpatialTransform.from_affine(matrix)).numpy()

    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(matrix[:3, :3].ravel()))
    affine.SetTranslation(tuple(matrix[:3, 3]))
    theirs = sitk_resample(image, target, affine)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert 0.1 < (theirs > 0).mean() < 0.95
    # and the affine matters: without it the result is different
    assert np.abs(resample_image(image, target).numpy() - theirs).max() > 0.5


def test_nearest_resampling_matches_sitk_nearest():
    image = random_image(MOVING_GRID, seed=2)
    target = MOVING_GRID.with_spacing(1.3)
    ours = resample_image(image, target, interpolation="nearest").numpy()
    theirs = sitk_resample(image, target, sitk.Transform(), sitk.sitkNearestNeighbor)
    agree = np.isclose(ours, theirs, atol=1e-6)
    # ties (points exactly half-way between voxel centres) may round differently; there are none here
    assert agree.mean() == 1.0


def test_fill_value_outside_the_image():
    image = random_image(MOVING_GRID, seed=3)
    target = MOVING_GRID.with_spacing(2.0)
    plain = resample_image(image, target).numpy()
    filled = resample_image(image, target, fill=-1000.0).numpy()
    outside = plain == 0
    assert outside.any()
    assert (filled[outside] == -1000.0).all()
    np.testing.assert_allclose(filled[~outside], plain[~outside], atol=1e-3)


# ------------------------------------------------------------------------------------- exact cases
def test_translation_of_two_voxels_along_x_is_a_roll_along_w():
    # sizes 2^n + 1, power-of-two spacings and integer origin: every coordinate is exact in float32
    grid = Grid.create((9, 17, 33), (0.5, 1.0, 2.0), (-8.0, 4.0, 16.0))
    generator = torch.Generator().manual_seed(4)
    image = Image(torch.randint(0, 1000, grid.shape, generator=generator).float(), grid)
    matrix = np.eye(4)
    matrix[0, 3] = 2 * grid.spacing[0]  # phi(x) = x + 2 voxels along x
    warped = resample_image(image, grid, SpatialTransform.from_affine(matrix)).data
    assert torch.equal(warped[:, :, :-2], image.data[:, :, 2:])
    assert torch.equal(warped[:, :, :-2], torch.roll(image.data, -2, dims=2)[:, :, :-2])
    # the last voxel maps 1.5 voxels beyond the image edge: zero
    assert (warped[:, :, -1] == 0).all()


def test_sample_at_points_half_voxel_extension_and_padding():
    grid = Grid.create((3, 4, 5), (2.0, 1.0, 3.0), (1.0, 2.0, 3.0), rotation((1.0, 1.0, 1.0), 40.0))
    volume = torch.arange(60, dtype=torch.float32).reshape(grid.shape) + 1.0
    index = torch.tensor([[-0.4, 1.0, 1.0], [-0.6, 1.0, 1.0], [4.45, 2.0, 1.0], [4.55, 2.0, 1.0],
                          [2.0, 3.0, 2.3], [2.0, 3.0, 2.7], [1.0, 1.0, 1.0], [1.5, 1.0, 1.0]], dtype=torch.float64)
    matrix = grid.index_to_world()
    points = (index.numpy() @ matrix[:3, :3].T + matrix[:3, 3])
    points = torch.from_numpy(points).float()
    zeros = sample_at_points(volume, grid, points)
    border = sample_at_points(volume, grid, points, padding="border")
    v = volume  # v[k, j, i]
    expected_border = torch.stack([v[1, 1, 0], v[1, 1, 0], v[1, 2, 4], v[1, 2, 4], v[2, 3, 2], v[2, 3, 2],
                                   v[1, 1, 1], (v[1, 1, 1] + v[1, 1, 2]) / 2])
    assert torch.allclose(border, expected_border, atol=1e-4)
    expected_zeros = expected_border * torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])  # D = 3: k <= 2.5
    assert torch.allclose(zeros, expected_zeros, atol=1e-4)
    # nearest interpolation, and a channel axis
    nearest = sample_at_points(torch.stack([volume, -volume]), grid, points[6:8] + 0.0, "nearest")
    assert nearest.shape == (2, 2)
    assert nearest[0, 0] == v[1, 1, 1] and nearest[1, 0] == -v[1, 1, 1]
    with pytest.raises(ValueError, match="does not match"):
        sample_at_points(volume[:, :, :4], grid, points)


# ------------------------------------------------------------------------------------- labels
_TILTED = np.array([[np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("direction", [None, np.diag([-1.0, 1.0, -1.0]), np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]),
                                       _TILTED], ids=["identity", "flipped", "permuted", "tilted"])
@pytest.mark.parametrize("shape", [(7, 9, 11), (1, 9, 11)], ids=["volume", "one-slice"])
def test_displaced_voxel_sampler_equals_sampling_at_the_moved_world_points(direction, shape):
    """Values and both gradients of f(x + u(x)) against sample_at_points with border padding, with
    displacements that carry many voxels beyond the grid (where the edge value is taken)."""
    grid = Grid.create(shape, (1.5, 2.0, 3.0), (10.0, -5.0, 3.0), direction)
    generator = torch.Generator().manual_seed(1)
    field = torch.randn(2, *shape, generator=generator, dtype=torch.float64, requires_grad=True)
    displacement = (4.0 * torch.randn(3, *shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    moved = grid.world_points(dtype=torch.float64) + displacement.movedim(0, -1)
    expected = sample_at_points(field, grid, moved, padding="border")
    sampled = DisplacedVoxelSampler(grid, torch.float64)(field, displacement)
    assert torch.allclose(sampled, expected, rtol=0, atol=1e-12)
    expected_gradients = torch.autograd.grad((expected ** 2).sum(), (field, displacement))
    gradients = torch.autograd.grad((sampled ** 2).sum(), (field, displacement))
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        assert torch.allclose(gradient, expected_gradient, rtol=0, atol=1e-10)
    assert float(expected_gradients[1].abs().max()) > 0.1                # the displacement gradient is real


def test_nearest_label_resampling_keeps_the_label_values_and_invents_none():
    grid = Grid.create((24, 26, 28), (0.9, 1.1, 1.0), (0.0, 0.0, 0.0), rotation((0.0, 1.0, 1.0), 20.0))
    labels = blob_labels(grid)
    values = set(torch.unique(labels.data).tolist())
    assert values == {0, 3, 7, 12}
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((1.0, 0.0, 0.0), 8.0)
    centre = grid.centre_world()
    matrix[:3, 3] = centre - matrix[:3, :3] @ centre + (0.7, -0.4, 0.3)
    transform = SpatialTransform.from_affine(matrix)
    target = grid.with_spacing(1.25)
    for method in ("nearest", "onehot"):
        warped = resample_labels(labels, target, transform, method=method)
        assert warped.data.dtype == torch.int64
        assert warped.grid == target
        assert set(torch.unique(warped.data).tolist()) == values


def test_onehot_and_nearest_resampling_of_a_flipped_copy_give_the_labels_back_exactly():
    generator = torch.Generator().manual_seed(5)
    labels = Image(torch.tensor([0, 1, 2, 5])[torch.randint(0, 4, MOVING_GRID.shape, generator=generator)],
                   MOVING_GRID)
    flipped_sitk = sitk.Flip(labels.to_sitk(sitk.sitkUInt8), [True, False, True])
    flipped = Image.from_sitk(flipped_sitk, dtype=torch.int64)
    assert not torch.equal(flipped.data, labels.data)
    assert flipped.grid.same_voxels_as(labels.grid) and not flipped.grid.same_as(labels.grid)
    for method in ("onehot", "nearest"):
        back = resample_labels(flipped, labels.grid, method=method)
        assert torch.equal(back.data, labels.data), method


def test_onehot_agrees_with_nearest_on_a_smooth_downsample():
    grid = Grid.create((30, 32, 34), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = blob_labels(grid)
    target = Grid.create((12, 13, 14), (2.5, 2.5, 2.5), (0.3, 0.2, 0.1), rotation((1.0, -1.0, 2.0), 15.0))
    onehot = resample_labels(labels, target, method="onehot").data
    nearest = resample_labels(labels, target, method="nearest").data
    assert (onehot == nearest).float().mean() >= 0.9
    assert set(torch.unique(onehot).tolist()) == {0, 3, 7, 12}


def test_onehot_labels_outside_the_label_map_are_background_even_without_a_zero_label():
    """``resample_labels`` documents "points outside ``labels`` get 0"; with label values {1, 2} the
    onehot path gives the first label's value there instead."""
    grid = Grid.create((4, 4, 4), (1.0, 1.0, 1.0))
    labels = Image(torch.tensor([1, 2, 1, 2])[None, None, :].expand(4, 4, 4).clone(), grid)
    target = Grid.create((8, 8, 8), (1.0, 1.0, 1.0), (-2.0, -2.0, -2.0))
    outside = torch.ones(target.shape, dtype=torch.bool)
    outside[2:6, 2:6, 2:6] = False  # voxel centres 2 voxels out are beyond the half-voxel rim
    nearest = resample_labels(labels, target, method="nearest").data
    assert (nearest[outside] == 0).all()
    assert torch.equal(nearest[2:6, 2:6, 2:6], labels.data)
    onehot = resample_labels(labels, target, method="onehot").data
    assert torch.equal(onehot[2:6, 2:6, 2:6], labels.data)
    assert (onehot[outside] == 0).all(), f"outside values {torch.unique(onehot[outside]).tolist()}"


def test_unknown_label_method_raises():
    grid = Grid.create((2, 2, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        resample_labels(Image(torch.zeros(2, 2, 2, dtype=torch.int64), grid), grid, method="linear")


# ------------------------------------------------------------------------------------- chunking
def test_chunk_ranges_cover_the_depth_in_bounded_slabs():
    grid = Grid.create((23, 10, 7), (1.0, 1.0, 1.0))
    ranges = chunk_ranges(grid, max_points=3 * 70 + 5)
    assert ranges[0][0] == 0 and ranges[-1][1] == 23
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(0 < k1 - k0 <= 3 for k0, k1 in ranges)
    assert len(ranges) == 8
    assert chunk_ranges(grid, max_points=10) == [(k, k + 1) for k in range(23)]  # never empty slabs
    assert chunk_ranges(grid) == [(0, 23)]


def test_chunked_resampling_equals_unchunked(monkeypatch):
    image = random_image(MOVING_GRID, seed=6)
    target = MOVING_GRID.with_spacing(1.6)
    field_grid = MOVING_GRID.with_spacing(3.0)
    generator = torch.Generator().manual_seed(7)
    field = torch.randn((3, *field_grid.shape), generator=generator) * 1.5
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((1.0, 1.0, 0.0), 5.0)
    transform = SpatialTransform(matrix, field, field_grid)
    labels = blob_labels(MOVING_GRID)

    whole = resample_image(image, target, transform).data
    whole_labels = resample_labels(labels, target, transform, method="onehot").data

    used = []

    def small_chunks(grid, max_points=None):
        ranges = sampling.chunk_ranges(grid, max_points=5 * grid.shape[1] * grid.shape[2])
        used.append(len(ranges))
        return ranges

    monkeypatch.setattr(warp, "chunk_ranges", small_chunks)
    chunked = resample_image(image, target, transform).data
    chunked_labels = resample_labels(labels, target, transform, method="onehot").data
    assert used and min(used) >= 4
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert torch.equal(chunked_labels, whole_labels)
    assert (whole > 0).float().mean() > 0.2
