"""ITK transform files written and read by SAMERegistrationLib.export map points like SpatialTransform."""

import gzip
import math
import struct

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.errors import InputError
from SAMERegistrationLib.export import (
    affine_from_sitk, affine_to_sitk, read_initial_transform, to_sitk_transform, write_affine,
    write_displacement_field, write_transform,
)
from SAMERegistrationLib.spatial.grid import LPS_TO_RAS, Grid
from SAMERegistrationLib.spatial.transform import SpatialTransform

OBLIQUE = np.array(sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()).reshape(3, 3)
GRID = Grid.create((10, 12, 14), (0.7, 1.3, 2.9), (-12.0, 30.0, 5.0), OBLIQUE)
AFFINE = np.array([[0.97, 0.12, -0.05, 4.0],
                   [-0.10, 1.04, 0.08, -7.5],
                   [0.06, -0.09, 0.95, 2.25],
                   [0.0, 0.0, 0.0, 1.0]])


def smooth_field(grid: Grid) -> torch.Tensor:
    """u(x) = 3 mm * sin(2 pi a_c . x / 80 mm + c): smooth, (3, D, H, W) float32 LPS mm."""
    points = grid.world_points(dtype=torch.float64)
    waves = torch.tensor([[0.8, 0.5, 0.3], [-0.4, 0.9, 0.2], [0.3, -0.2, 0.9]], dtype=torch.float64)
    phase = points @ waves.T * (2 * math.pi / 80.0) + torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    return torch.movedim(3.0 * torch.sin(phase), -1, 0).float()


def interior_points(grid: Grid, count=200, margin_mm=0.0, seed=0) -> torch.Tensor:
    """Random LPS points whose continuous indices lie ``margin_mm`` inside the outer voxel centres."""
    size = np.array(grid.size_ijk, dtype=float)
    margin = np.ceil(margin_mm / np.array(grid.spacing))
    index = np.random.default_rng(seed).uniform(margin, size - 1 - margin, (count, 3))
    return torch.from_numpy(index @ grid.index_to_world()[:3, :3].T + grid.index_to_world()[:3, 3])


def voxel_centres(grid: Grid, count=200, seed=1) -> torch.Tensor:
    points = grid.world_points(dtype=torch.float64).reshape(-1, 3)
    return points[np.random.default_rng(seed).choice(len(points), count, replace=False)]


def sitk_map(transform: sitk.Transform, points: torch.Tensor) -> torch.Tensor:
    return torch.tensor([transform.TransformPoint(tuple(map(float, p))) for p in points], dtype=torch.float64)


def max_error(transform: sitk.Transform, reference: SpatialTransform, points: torch.Tensor) -> float:
    return float((sitk_map(transform, points) - reference.map_points(points)).norm(dim=-1).max())


TRANSFORMS = {
    "affine": SpatialTransform.from_affine(AFFINE),
    "field": SpatialTransform(np.eye(4), smooth_field(GRID), GRID),
    "field+affine": SpatialTransform(AFFINE, smooth_field(GRID), GRID),
}


# ----------------------------------------------------------------------------------- whole results
@pytest.mark.parametrize("name", TRANSFORMS)
def test_written_h5_maps_points_like_the_library(tmp_path, name):
    transform = TRANSFORMS[name]
    write_transform(transform, tmp_path / "transform.h5")
    read = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    at_centres = max_error(read, transform, voxel_centres(GRID))
    inside = max_error(read, transform, interior_points(GRID))
    print(f"{name}: max error {at_centres:.2e} mm at voxel centres, {inside:.2e} mm at interior points")
    assert at_centres < 1e-3
    assert inside < 0.1


def test_to_sitk_transform_kinds():
    assert isinstance(to_sitk_transform(TRANSFORMS["affine"]), sitk.AffineTransform)
    composite = to_sitk_transform(TRANSFORMS["field+affine"])
    assert isinstance(composite, sitk.CompositeTransform) and composite.GetNumberOfTransforms() == 2
    assert not composite.IsLinear()


# ----------------------------------------------------------------------------------- displacement fields
def nifti_intent_code(path) -> int:
    with gzip.open(path, "rb") as file:
        header = file.read(348)
    order = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    return struct.unpack(order + "h", header[68:70])[0]


def test_nifti_displacement_field_has_dispvect_intent_and_maps_like_the_library(tmp_path):
    path = tmp_path / "field.nii.gz"
    transform = TRANSFORMS["field"]
    write_displacement_field(transform.field, GRID, path)
    assert nifti_intent_code(path) == 1006
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(tmp_path / "plain.nii.gz"))
    assert path.stat().st_mode == (tmp_path / "plain.nii.gz").stat().st_mode
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    error = max_error(field, transform, interior_points(GRID))
    print(f"NIfTI displacement field: max error {error:.2e} mm")
    assert error < 0.1


@pytest.mark.parametrize("suffix", [".h5", ".tfm"])
def test_displacement_field_transform_file_maps_like_the_library(tmp_path, suffix):
    path = tmp_path / f"field{suffix}"
    transform = TRANSFORMS["field"]
    write_displacement_field(transform.field, GRID, path)
    error = max_error(sitk.ReadTransform(str(path)), transform, interior_points(GRID))
    print(f"{suffix} displacement field: max error {error:.2e} mm")
    assert error < 0.1


def test_slicer_convention_lps_vector_moves_points_left(tmp_path):
    """An ITK field of LPS (+5, 0, 0) maps p to p + (5, 0, 0) LPS, i.e. p_RAS to p_RAS + (-5, 0, 0)."""
    grid = Grid.create((5, 6, 7), (2.0, 2.0, 2.0), (-6.0, -5.0, -4.0), OBLIQUE)
    displacement = torch.zeros((3, *grid.shape))
    displacement[0] = 5.0
    path = tmp_path / "field.nii"
    write_displacement_field(displacement, grid, path)
    itk_field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    p_lps = grid.centre_world()
    moved_lps = np.array(itk_field.TransformPoint(tuple(p_lps)))
    np.testing.assert_allclose(moved_lps, p_lps + [5.0, 0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(LPS_TO_RAS @ moved_lps, LPS_TO_RAS @ p_lps + [-5.0, 0.0, 0.0], atol=1e-5)
    library = SpatialTransform(np.eye(4), displacement, grid).map_points(torch.from_numpy(p_lps))
    np.testing.assert_allclose(library.numpy(), moved_lps, atol=1e-5)
    # On disk a NIfTI displacement field (intent 1006) holds RAS vectors: read raw as a plain vector image.
    raw = bytearray(path.read_bytes())
    raw[68:70] = struct.pack("<h", 1007)
    (tmp_path / "raw.nii").write_bytes(raw)
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw.nii")))
    np.testing.assert_allclose(stored[2, 3, 4], [-5.0, 0.0, 0.0])


# ----------------------------------------------------------------------------------- affines
def test_affine_tfm_round_trip(tmp_path):
    write_affine(AFFINE, tmp_path / "affine.tfm")
    np.testing.assert_allclose(affine_from_sitk(sitk.ReadTransform(str(tmp_path / "affine.tfm"))), AFFINE,
                               atol=1e-12)
    np.testing.assert_allclose(affine_from_sitk(affine_to_sitk(AFFINE)), AFFINE, atol=1e-12)


def test_affine_from_euler_with_centre():
    euler = sitk.Euler3DTransform((10.0, -20.0, 35.0), 0.2, -0.4, 0.7, (3.0, -1.0, 2.0))
    points = interior_points(GRID, count=50)
    error = max_error(euler, SpatialTransform.from_affine(affine_from_sitk(euler)), points)
    assert error < 1e-9


def test_composite_applies_last_added_transform_first():
    scale = sitk.ScaleTransform(3, (2.0, 3.0, 0.5))
    euler = sitk.Euler3DTransform((5.0, 0.0, -5.0), 0.3, 0.1, -0.2, (1.0, 2.0, 3.0))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(scale)
    composite.AddTransform(euler)
    matrix = affine_from_sitk(composite)
    np.testing.assert_allclose(matrix, affine_from_sitk(scale) @ affine_from_sitk(euler), atol=1e-12)
    assert max_error(composite, SpatialTransform.from_affine(matrix), interior_points(GRID, 50)) < 1e-9


def test_affine_from_sitk_rejects_non_linear():
    with pytest.raises(ValueError, match="linear"):
        affine_from_sitk(to_sitk_transform(TRANSFORMS["field"]))


# ----------------------------------------------------------------------------------- initial transforms
def test_read_initial_linear_transform(tmp_path):
    composite = sitk.CompositeTransform([affine_to_sitk(AFFINE), sitk.TranslationTransform(3, (1.0, 2.0, 3.0))])
    sitk.WriteTransform(composite, str(tmp_path / "linear.h5"))
    initial = read_initial_transform(tmp_path / "linear.h5", GRID.with_spacing(2.0))
    assert not initial.has_field
    expected = AFFINE @ np.array([[1, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(initial.affine, expected, atol=1e-12)


@pytest.mark.parametrize("name", ["field", "field+affine"])
def test_read_initial_field_transforms_are_taken_over_exactly(tmp_path, name):
    """A displacement field file, or our field-then-affine transform.h5, keeps its own grid and maps
    points exactly like the original (no resampling onto the reference grid)."""
    transform = TRANSFORMS[name]
    path = tmp_path / "initial.h5"
    if name == "field":
        write_displacement_field(transform.field, GRID, path)
    else:
        write_transform(transform, path)
    initial = read_initial_transform(path, GRID.with_spacing(1.0))
    assert initial.field_grid.same_as(GRID)
    assert np.allclose(initial.affine, transform.affine, atol=1e-12)
    points = interior_points(GRID, margin_mm=2.0)
    error = float((initial.map_points(points) - transform.map_points(points)).norm(dim=-1).max())
    assert error < 1e-4


def test_read_initial_bspline_transform_is_sampled(tmp_path):
    reference = sitk.Image(GRID.size_ijk, sitk.sitkUInt8)
    reference.SetSpacing(GRID.spacing)
    reference.SetOrigin(GRID.origin)
    reference.SetDirection(tuple(OBLIQUE.ravel()))
    bspline = sitk.BSplineTransformInitializer(reference, (3, 3, 3))
    bspline.SetParameters(tuple(np.random.default_rng(5).normal(0.0, 2.0, bspline.GetNumberOfParameters())))
    sitk.WriteTransform(bspline, str(tmp_path / "bspline.h5"))
    initial = read_initial_transform(tmp_path / "bspline.h5", GRID)
    error = max_error(bspline, initial, voxel_centres(GRID))
    print(f"initial B-spline at voxel centres: max error {error:.2e} mm")
    assert error < 1e-4


@pytest.mark.parametrize("content", [None, b"#Insight Transform File V1.0\nthis is garbage\n"])
def test_read_initial_transform_missing_or_garbage(tmp_path, content):
    path = tmp_path / "initial.tfm"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as error:
        read_initial_transform(path, GRID)
    assert str(path) in str(error.value)
    assert ("does not exist" if content is None else "cannot be read") in str(error.value)


def test_our_own_transform_file_reads_back_exactly(tmp_path):
    """transform.h5 (field then affine) comes back with the same affine, field and field grid,
    whatever reference grid is passed (no resampling)."""
    grid = Grid.create((6, 7, 8), (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), np.diag([-1.0, -1.0, 1.0]))
    field = torch.randn((3, *grid.shape), generator=torch.Generator().manual_seed(0))
    affine = np.eye(4)
    affine[:3, :3] = [[1.05, 0.02, 0.0], [-0.01, 0.97, 0.03], [0.0, 0.01, 1.0]]
    affine[:3, 3] = [5.0, -7.0, 2.0]
    write_transform(SpatialTransform(affine, field, grid), tmp_path / "transform.h5")
    unrelated = Grid.create((3, 3, 3), (9.0, 9.0, 9.0))
    back = read_initial_transform(tmp_path / "transform.h5", unrelated)
    assert back.field_grid.same_as(grid)
    assert torch.allclose(back.field, field, atol=1e-6)
    assert np.allclose(back.affine, affine, atol=1e-12)
