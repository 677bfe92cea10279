"""SpatialTransform phi(x) = A (x + w(x)): mapping, composition, displacement, ITK field behaviour."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.spatial import sampling, transform as transform_module
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.sampling import sample_at_points
from SAMERegistrationLib.spatial.transform import SpatialTransform, apply_affine


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    return np.array(sitk.VersorTransform(tuple(axis), float(np.deg2rad(degrees))).GetMatrix()).reshape(3, 3)


def affine_matrix() -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((0.3, -1.0, 0.6), 12.0) @ np.diag([1.05, 0.93, 1.1])
    matrix[:3, 3] = (4.0, -2.5, 7.0)
    return matrix


def smooth_field(grid: Grid, amplitude: float, wavelength: float, phase: float = 0.0) -> torch.Tensor:
    """A smooth analytic field (3, D, H, W) sampled at the voxel centres of ``grid``."""
    x = grid.world_points(torch.float64)
    k = 2.0 * np.pi / wavelength
    u = torch.stack([
        amplitude * torch.sin(k * x[..., 1] + phase) * torch.cos(k * x[..., 2]),
        amplitude * torch.cos(k * x[..., 0] - phase) * torch.sin(k * x[..., 2] + 1.0),
        0.7 * amplitude * torch.sin(k * (x[..., 0] + x[..., 1]) + phase),
    ])
    return u.float()


def centred_grid(shape, spacing, direction) -> Grid:
    """A grid whose centre is the LPS origin."""
    size_ijk = np.array(shape[::-1], dtype=float)
    origin = -np.asarray(direction) @ (np.asarray(spacing) * (size_ijk - 1) / 2)
    return Grid.create(shape, spacing, origin, direction)


# an oblique field grid (half-widths >= 29 mm) that contains the residual grid (corners 26 mm out)
FIELD_GRID = centred_grid((30, 32, 34), (2.0, 2.2, 1.8), rotation((1.0, 1.0, 0.0), 20.0))
RESIDUAL_GRID = centred_grid((19, 20, 21), (1.5, 1.5, 1.5), np.eye(3))


def points_in_grid(grid: Grid, n: int, low: float, high_offset: float, seed: int) -> torch.Tensor:
    """Random float32 LPS points whose continuous indices lie in [low, size - 1 - high_offset]."""
    rng = np.random.default_rng(seed)
    size = np.array(grid.size_ijk, dtype=float)
    index = rng.uniform(low, size - 1 - high_offset, size=(n, 3))
    matrix = grid.index_to_world()
    return torch.from_numpy(index @ matrix[:3, :3].T + matrix[:3, 3]).float()


# ------------------------------------------------------------------------------------- affine only
def test_identity_maps_points_to_themselves():
    points = torch.randn(100, 3, dtype=torch.float64) * 50
    assert torch.equal(SpatialTransform.identity().map_points(points), points)
    assert not SpatialTransform.identity().has_field


def test_from_affine_maps_like_the_4x4_matrix_and_copies_it():
    matrix = affine_matrix()
    transform = SpatialTransform.from_affine(matrix)
    points = torch.randn(64, 3, dtype=torch.float64) * 40
    homogeneous = np.concatenate([points.numpy(), np.ones((64, 1))], axis=1)
    expected = (homogeneous @ matrix.T)[:, :3]
    np.testing.assert_allclose(transform.map_points(points).numpy(), expected, atol=1e-10)
    matrix[0, 3] += 100.0  # the transform keeps its own copy
    np.testing.assert_allclose(transform.map_points(points).numpy(), expected, atol=1e-10)
    # points may have any leading shape
    grid_points = points.reshape(4, 4, 4, 3)
    np.testing.assert_allclose(transform.map_points(grid_points).reshape(-1, 3).numpy(), expected, atol=1e-10)


def test_invalid_transforms_raise_value_error():
    with pytest.raises(ValueError, match="affine"):
        SpatialTransform(np.eye(3))
    with pytest.raises(ValueError, match="together"):
        SpatialTransform(np.eye(4), torch.zeros(3, *FIELD_GRID.shape))
    with pytest.raises(ValueError, match="does not match"):
        SpatialTransform(np.eye(4), torch.zeros(3, 2, 2, 2), FIELD_GRID)


# ------------------------------------------------------------------------------------- fields
def test_zero_field_is_the_affine_alone():
    points = points_in_grid(FIELD_GRID, 200, -2.0, -2.0, seed=1)  # inside and around the field grid
    zero = torch.zeros(3, *FIELD_GRID.shape)
    assert torch.equal(SpatialTransform(np.eye(4), zero, FIELD_GRID).map_points(points), points)
    matrix = affine_matrix()
    with_field = SpatialTransform(matrix, zero, FIELD_GRID).map_points(points)
    assert torch.allclose(with_field, SpatialTransform.from_affine(matrix).map_points(points), atol=1e-5)


def test_constant_field_adds_before_the_affine():
    matrix = affine_matrix()
    c = torch.tensor([1.5, -2.0, 0.75])
    field = c[:, None, None, None].expand(3, *FIELD_GRID.shape).clone()
    transform = SpatialTransform(matrix, field, FIELD_GRID)
    points = points_in_grid(FIELD_GRID, 300, -0.45, -0.45, seed=2)  # inside, up to the half-voxel edge
    expected = apply_affine(matrix, points + c)
    assert torch.allclose(transform.map_points(points), expected, atol=1e-4)
    # a pure translation field without affine: x -> x + c exactly where the field is defined
    assert torch.allclose(SpatialTransform(np.eye(4), field, FIELD_GRID).map_points(points), points + c, atol=1e-5)


def test_field_is_zero_beyond_half_a_voxel_outside_its_grid():
    matrix = affine_matrix()
    c = torch.tensor([3.0, 1.0, -2.0])
    field = c[:, None, None, None].expand(3, *FIELD_GRID.shape).clone()
    transform = SpatialTransform(matrix, field, FIELD_GRID)
    size = np.array(FIELD_GRID.size_ijk, dtype=float)
    centre = (size - 1) / 2
    index = []
    for axis in range(3):
        for offset in (-0.6, -0.45, size[axis] - 1 + 0.45, size[axis] - 1 + 0.6, -5.0, size[axis] + 4.0):
            point = centre.copy()
            point[axis] = offset
            index.append(point)
    index = np.array(index)
    world = torch.from_numpy(index @ FIELD_GRID.index_to_world()[:3, :3].T + FIELD_GRID.origin).float()
    inside = ((index >= -0.5) & (index <= size - 0.5)).all(axis=1)
    assert inside.sum() == 6 and (~inside).sum() == 12
    expected = apply_affine(matrix, world + torch.from_numpy(inside[:, None]).float() * c)
    assert torch.allclose(transform.map_points(world), expected, atol=1e-4)


def test_map_points_matches_a_sitk_composite_of_affine_and_displacement_field():
    """What a transform file holds (ITK DisplacementFieldTransform then affine) maps points like
    map_points, inside the field grid, in its half-voxel rim, and outside it."""
    matrix = affine_matrix()
    field = smooth_field(FIELD_GRID, amplitude=4.0, wavelength=25.0)
    transform = SpatialTransform(matrix, field, FIELD_GRID)

    field_image = sitk.GetImageFromArray(field.permute(1, 2, 3, 0).double().numpy(), isVector=True)
    field_image.SetSpacing(FIELD_GRID.spacing)
    field_image.SetOrigin(FIELD_GRID.origin)
    field_image.SetDirection(tuple(FIELD_GRID.direction_matrix.ravel()))
    displacement = sitk.DisplacementFieldTransform(field_image)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(matrix[:3, :3].ravel()))
    affine.SetTranslation(tuple(matrix[:3, 3]))
    composite = sitk.CompositeTransform([affine, displacement])  # the last one added acts first

    points = points_in_grid(FIELD_GRID, 400, -3.0, -3.0, seed=3).double()
    index = FIELD_GRID.world_to_index_points(points).numpy()
    size = np.array(FIELD_GRID.size_ijk)
    margin = np.minimum(np.abs(index + 0.5), np.abs(index - (size - 0.5))).min(axis=1)
    points = points[torch.from_numpy(margin > 1e-3)]  # away from the inside/outside boundary itself
    inside = ((index >= -0.5) & (index <= size - 0.5)).all(axis=1)[margin > 1e-3]
    assert inside.sum() > 50 and (~inside).sum() > 50

    expected = np.array([composite.TransformPoint(tuple(p)) for p in points.numpy()])
    mapped = transform.map_points(points).numpy()
    np.testing.assert_allclose(mapped, expected, atol=1e-4)
    # the field really acts inside (the comparison is not with a pure affine)
    affine_only = apply_affine(matrix, points).numpy()
    assert np.abs(mapped - affine_only)[inside].max() > 1.0


# ------------------------------------------------------------------------------------- composition
def test_then_residual_without_a_field_makes_the_residual_the_field():
    matrix = affine_matrix()
    residual = smooth_field(RESIDUAL_GRID, amplitude=2.0, wavelength=40.0)
    composed = SpatialTransform.from_affine(matrix).then_residual(residual, RESIDUAL_GRID)
    assert composed.field_grid == RESIDUAL_GRID
    assert torch.equal(composed.field, residual)
    np.testing.assert_array_equal(composed.affine, matrix)


def test_then_residual_equals_mapping_by_hand_at_voxel_centres():
    matrix = affine_matrix()
    previous = SpatialTransform(matrix, smooth_field(FIELD_GRID, amplitude=3.0, wavelength=30.0), FIELD_GRID)
    residual = smooth_field(RESIDUAL_GRID, amplitude=2.0, wavelength=35.0, phase=0.4)
    composed = previous.then_residual(residual, RESIDUAL_GRID)
    assert composed.field_grid == RESIDUAL_GRID

    x = RESIDUAL_GRID.world_points()[2:-2, 2:-2, 2:-2]
    u = torch.movedim(residual, 0, -1)[2:-2, 2:-2, 2:-2]
    by_hand = previous.map_points(x + u)  # phi(x + u(x))
    result = composed.map_points(x)
    assert (result - by_hand).abs().max() < 1e-4
    # not trivially equal to either part alone
    assert (result - previous.map_points(x)).abs().max() > 1.0
    assert (result - apply_affine(matrix, x + u)).abs().max() > 1.0


def test_then_residual_equals_mapping_by_hand_between_voxel_centres():
    """Between voxel centres the composed field is the trilinear interpolation of w(x + u(x)), so it
    differs from the exact composition by the interpolation error: a few hundredths of a mm for
    fields this smooth (1.5 mm voxels, >= 40 mm wavelengths, a few mm amplitude)."""
    matrix = affine_matrix()
    previous = SpatialTransform(matrix, smooth_field(FIELD_GRID, amplitude=2.0, wavelength=60.0), FIELD_GRID)
    residual = smooth_field(RESIDUAL_GRID, amplitude=1.5, wavelength=45.0, phase=0.4)
    composed = previous.then_residual(residual, RESIDUAL_GRID)

    x = points_in_grid(RESIDUAL_GRID, 2000, 2.0, 2.0, seed=4)
    u = torch.movedim(sample_at_points(residual, RESIDUAL_GRID, x), 0, -1)
    moved_index = FIELD_GRID.world_to_index_points(x + u)
    assert (moved_index > 1).all() and (moved_index < torch.tensor(FIELD_GRID.size_ijk) - 2).all()
    by_hand = previous.map_points(x + u)
    error = (composed.map_points(x) - by_hand).norm(dim=-1)
    assert error.max() < 0.05
    assert (composed.map_points(x) - previous.map_points(x)).norm(dim=-1).max() > 1.0


# ------------------------------------------------------------------------------------- displacement
def test_displacement_on_equals_mapped_points_minus_points(monkeypatch):
    matrix = affine_matrix()
    transform = SpatialTransform(matrix, smooth_field(FIELD_GRID, amplitude=3.0, wavelength=30.0), FIELD_GRID)
    grid = Grid.create((11, 13, 15), (2.5, 2.0, 2.2), (-20.0, -16.0, -9.0), rotation((0.0, 1.0, 1.0), -15.0))
    points = grid.world_points()
    expected = torch.movedim(transform.map_points(points) - points, -1, 0)

    whole = transform.displacement_on(grid)
    assert whole.shape == (3, *grid.shape) and whole.dtype == torch.float32
    assert torch.allclose(whole, expected, atol=1e-5)

    slabs = []

    def small_chunks(g, max_points=None):
        ranges = sampling.chunk_ranges(g, max_points=2 * g.shape[1] * g.shape[2] + 1)
        slabs.append(ranges)
        return ranges

    monkeypatch.setattr(transform_module, "chunk_ranges", small_chunks)
    chunked = transform.displacement_on(grid)
    assert len(slabs[0]) == 6
    assert torch.allclose(chunked, whole, atol=1e-6)


# ------------------------------------------------------------------------------------- gradients
def test_sample_at_points_gradcheck_in_points_and_volume():
    torch.manual_seed(0)
    grid = Grid.create((3, 4, 5), (0.9, 1.4, 2.1), (1.0, -2.0, 3.0), rotation((2.0, 1.0, -1.0), 33.0))
    volume = torch.randn(2, *grid.shape, dtype=torch.float64, requires_grad=True)
    # interior points, at least 0.2 voxel away from any voxel-centre plane (where linear interpolation
    # has a kink)
    rng = np.random.default_rng(5)
    size = np.array(grid.size_ijk)
    index = rng.integers(0, size - 1, size=(12, 3)) + rng.uniform(0.2, 0.8, size=(12, 3))
    matrix = grid.index_to_world()
    points = torch.tensor(index @ matrix[:3, :3].T + matrix[:3, 3], dtype=torch.float64, requires_grad=True)

    def sample(v, p):
        return sample_at_points(v, grid, p, "linear")

    assert torch.autograd.gradcheck(sample, (volume, points), eps=1e-6, atol=1e-6)
    # the gradient in the points is not trivially zero
    sample(volume, points).sum().backward()
    assert points.grad.abs().max() > 1e-3


def test_affine_inverse_maps_back_exactly():
    rng = np.random.default_rng(3)
    matrix = np.eye(4)
    matrix[:3, :3] = np.eye(3) + 0.1 * rng.normal(size=(3, 3))
    matrix[:3, 3] = rng.normal(size=3) * 50.0
    forward = SpatialTransform.from_affine(matrix)
    points = torch.as_tensor(rng.normal(size=(50, 3)) * 100.0, dtype=torch.float64)
    back = forward.inverse().map_points(forward.map_points(points))
    assert torch.allclose(back, points, atol=1e-9)


def test_inverse_of_a_transform_with_a_field_is_refused():
    grid = Grid.create((4, 4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="affine-only"):
        SpatialTransform(np.eye(4), torch.zeros(3, 4, 4, 4), grid).inverse()
