"""Grid: index <-> world conventions checked against SimpleITK, RAS/LPS, working grids, relations."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.spatial.grid import Grid


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    return np.array(sitk.VersorTransform(tuple(axis), float(np.deg2rad(degrees))).GetMatrix()).reshape(3, 3)


SPACING = (0.7, 1.3, 2.9)
ORIGIN = (12.5, -40.25, 7.0)
SHAPE = (6, 7, 9)  # (D, H, W): all different so any axis mix-up shows
DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation((1.0, 2.0, 3.0), 25.0),
}


def make_grid(direction_name: str, shape=SHAPE, spacing=SPACING, origin=ORIGIN) -> Grid:
    return Grid.create(shape, spacing, origin, DIRECTIONS[direction_name])


def sitk_image_of(grid: Grid) -> sitk.Image:
    return Image(torch.zeros(grid.shape), grid).to_sitk()


def grid_of(image: sitk.Image) -> Grid:
    return Grid.create(image.GetSize()[::-1], image.GetSpacing(), image.GetOrigin(), image.GetDirection())


# ------------------------------------------------------------------------------------- points vs ITK
@pytest.mark.parametrize("direction_name", sorted(DIRECTIONS))
def test_world_points_match_sitk_index_to_physical(direction_name):
    grid = make_grid(direction_name)
    image = sitk_image_of(grid)
    points = grid.world_points(dtype=torch.float64).numpy()
    assert points.shape == (*SHAPE, 3)
    w, h, d = grid.size_ijk
    voxels_ijk = [(0, 0, 0), (w - 1, h - 1, d - 1), (3, 1, 4), (8, 0, 5), (0, 6, 2), (w - 1, 0, 0)]
    for i, j, k in voxels_ijk:
        expected = image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
        np.testing.assert_allclose(points[k, j, i], expected, atol=1e-9)
        np.testing.assert_allclose(points[k, j, i], image.TransformIndexToPhysicalPoint((i, j, k)), atol=1e-9)
    # the 4x4 matrix itself, at a continuous index
    index = (2.25, 5.5, 1.75)
    mapped = grid.index_to_world() @ np.array([*index, 1.0])
    np.testing.assert_allclose(mapped[:3], image.TransformContinuousIndexToPhysicalPoint(index), atol=1e-9)


@pytest.mark.parametrize("direction_name", sorted(DIRECTIONS))
def test_world_to_index_points_matches_sitk_and_inverts_index_to_world(direction_name):
    grid = make_grid(direction_name)
    image = sitk_image_of(grid)
    rng = np.random.default_rng(0)
    index = rng.uniform(-3.0, 12.0, size=(50, 3))
    world = index @ grid.index_to_world()[:3, :3].T + grid.index_to_world()[:3, 3]
    back = grid.world_to_index_points(torch.from_numpy(world)).numpy()
    np.testing.assert_allclose(back, index, atol=1e-5)
    for point, expected in zip(world[:5], back[:5]):
        np.testing.assert_allclose(expected, image.TransformPhysicalPointToContinuousIndex(tuple(point)), atol=1e-6)
    np.testing.assert_allclose(grid.world_to_index() @ grid.index_to_world(), np.eye(4), atol=1e-12)


def test_world_points_k_range_pieces_equal_the_full_grid():
    grid = make_grid("oblique")
    full = grid.world_points()
    pieces = [grid.world_points(k_range=(k0, k1)) for k0, k1 in [(0, 1), (1, 4), (4, 6)]]
    assert [p.shape[0] for p in pieces] == [1, 3, 2]
    assert torch.equal(torch.cat(pieces, dim=0), full)
    assert full.dtype == torch.float32


def test_index_to_sampling_maps_outer_voxel_centres_to_plus_minus_one():
    grid = Grid.create((1, 5, 9), (1.0, 2.0, 3.0))  # size_ijk = (9, 5, 1)
    index = torch.tensor([[0.0, 0.0, 0.0], [8.0, 4.0, 0.0], [4.0, 2.0, 0.0], [2.0, 1.0, 0.0]])
    expected = torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-0.5, -0.5, 0.0]])
    assert torch.allclose(grid.index_to_sampling(index), expected, atol=1e-7)


# ------------------------------------------------------------------------------------- RAS
@pytest.mark.parametrize("direction_name", sorted(DIRECTIONS))
def test_index_to_world_ras_is_lps_to_ras_times_index_to_world(direction_name):
    grid = make_grid(direction_name)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.index_to_world()
    np.testing.assert_allclose(grid.index_to_world_ras(), expected, atol=1e-12)
    # the RAS origin is the LPS origin with x and y negated
    np.testing.assert_allclose(grid.index_to_world_ras()[:3, 3], [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]], atol=1e-12)


@pytest.mark.parametrize("direction_name", sorted(DIRECTIONS))
def test_from_index_to_world_ras_round_trips_the_grid(direction_name):
    grid = make_grid(direction_name)
    back = Grid.from_index_to_world_ras(grid.shape, grid.index_to_world_ras())
    assert back.shape == grid.shape
    np.testing.assert_allclose(back.spacing, grid.spacing, atol=1e-12)
    np.testing.assert_allclose(back.origin, grid.origin, atol=1e-12)
    np.testing.assert_allclose(back.direction_matrix, grid.direction_matrix, atol=1e-12)
    assert back.same_as(grid)


# ------------------------------------------------------------------------------------- working grid
def test_with_spacing_is_an_isotropic_axis_aligned_grid_covering_the_source():
    source = Grid.create((12, 30, 20), (0.7, 1.3, 2.9), (5.0, -3.0, 11.0), rotation((1.0, -2.0, 0.5), 37.0))
    spacing = 1.5
    working = source.with_spacing(spacing)
    np.testing.assert_array_equal(working.direction_matrix, np.eye(3))
    assert working.spacing == (spacing, spacing, spacing)

    corners = source.corners_world()
    index = working.world_to_index_points(torch.from_numpy(corners)).numpy()
    last = np.array(working.size_ijk) - 1
    assert (index >= -1e-6).all() and (index <= last + 1e-6).all()

    low, high = corners.min(axis=0), corners.max(axis=0)
    np.testing.assert_allclose(working.centre_world(), (low + high) / 2.0, atol=1e-9)
    # as small as possible: one voxel fewer along any axis could not span the bounding box
    extent_voxels = (high - low) / spacing
    assert (last >= extent_voxels - 1e-6).all()
    assert (last - 1 < extent_voxels).all()
    # the bounding box is much longer along one axis: shape must be in (D, H, W) = (z, y, x) order
    assert working.shape == tuple(int(n) for n in (last + 1)[::-1])


# ------------------------------------------------------------------------------------- relations
def test_same_voxels_as_accepts_a_flipped_copy_but_same_as_does_not():
    grid = make_grid("oblique")
    flipped_image = sitk.Flip(sitk_image_of(grid), [True, False, True])
    flipped = grid_of(flipped_image)
    # sanity: sitk.Flip keeps physical space, so both hold the same set of voxel centres
    mine = np.sort(grid.world_points(torch.float64).reshape(-1, 3).numpy().round(6), axis=0)
    theirs = np.sort(flipped.world_points(torch.float64).reshape(-1, 3).numpy().round(6), axis=0)
    np.testing.assert_allclose(mine, theirs, atol=1e-6)

    assert grid.same_voxels_as(flipped)
    assert flipped.same_voxels_as(grid)
    assert not grid.same_as(flipped)
    assert grid.same_as(grid_of(sitk_image_of(grid)))


def test_same_voxels_as_accepts_an_axis_permuted_grid_with_the_same_voxel_centres():
    grid = make_grid("oblique")
    columns = grid.direction_matrix
    # swap index axes i and k: array shape (D, H, W) -> (W, H, D)
    permuted = Grid.create(grid.shape[::-1], grid.spacing[::-1], grid.origin, columns[:, ::-1])
    assert not permuted.same_as(grid)
    assert grid.same_voxels_as(permuted)
    assert permuted.same_voxels_as(grid)


def test_same_voxels_as_rejects_shifted_or_resampled_grids():
    grid = make_grid("oblique")
    shifted = Grid.create(grid.shape, grid.spacing, np.add(grid.origin, (1.0, 0.0, 0.0)), grid.direction_matrix)
    assert not grid.same_voxels_as(shifted)
    assert not grid.same_as(shifted)
    # same bounding corners but twice as many voxels along i
    finer = Grid.create((grid.shape[0], grid.shape[1], 2 * grid.shape[2] - 1),
                        (grid.spacing[0] / 2, grid.spacing[1], grid.spacing[2]), grid.origin, grid.direction_matrix)
    assert not grid.same_voxels_as(finer)


def test_same_voxels_as_rejects_a_mirrored_oblique_grid():
    """Mirroring an oblique grid through a plane at its centre keeps, coordinate by coordinate, the
    sorted lists of corner positions, but the voxel centres are elsewhere."""
    grid = Grid.create((5, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), rotation((0.0, 0.0, 1.0), 30.0))
    centre = grid.centre_world()
    mirror = np.eye(4)
    mirror[0, 0] = -1.0
    mirror[0, 3] = 2.0 * centre[0]  # x -> 2 c_x - x
    mirrored_matrix = mirror @ grid.index_to_world()
    columns = mirrored_matrix[:3, :3]
    mirrored = Grid.create(grid.shape, np.linalg.norm(columns, axis=0), mirrored_matrix[:3, 3],
                           columns / np.linalg.norm(columns, axis=0))
    # its corner voxel centres are 1.65 mm away from every voxel centre of the original grid
    centres = grid.world_points(torch.float64).reshape(-1, 3).numpy()
    distance = np.linalg.norm(mirrored.corners_world()[:, None] - centres[None], axis=-1).min(axis=1)
    assert distance.min() > 1.0
    assert not grid.same_voxels_as(mirrored)


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, argument", [
    (dict(shape=(4, 5), spacing=(1, 1, 1)), "shape"),
    (dict(shape=(4, 0, 5), spacing=(1, 1, 1)), "shape"),
    (dict(shape=(4, 4, 5), spacing=(1, 0, 1)), "spacing"),
    (dict(shape=(4, 4, 5), spacing=(1, -2, 1)), "spacing"),
    (dict(shape=(4, 4, 5), spacing=(1, 1)), "spacing"),
    (dict(shape=(4, 4, 5), spacing=(1, 1, 1), direction=np.diag([2.0, 1.0, 1.0])), "direction"),
    (dict(shape=(4, 4, 5), spacing=(1, 1, 1), direction=np.zeros((3, 3))), "direction"),
])
def test_invalid_grid_raises_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"'{argument}'"):
        Grid.create(**kwargs)


@pytest.mark.parametrize("direction", [
    np.diag([2.0, 0.5, 1.0]),                              # unit determinant, columns not unit length
    np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),  # unit determinant, shear
], ids=["scaled", "sheared"])
def test_non_orthonormal_direction_with_unit_determinant_is_rejected(direction):
    with pytest.raises(ValueError, match="'direction'"):
        Grid.create((4, 4, 5), (1, 1, 1), direction=direction)


def test_valid_grid_accepts_a_left_handed_orthonormal_direction():
    grid = Grid.create((4, 4, 5), (1, 1, 1), direction=np.diag([-1.0, 1.0, 1.0]))
    assert np.linalg.det(grid.direction_matrix) == pytest.approx(-1.0)
