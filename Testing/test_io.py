"""Reading and validating user images, labels and masks (SAMERegistrationLib.io)."""

import os
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.errors import InputError
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import check_output_directory, read_image, read_labels, read_mask, write_image
from SAMERegistrationLib.spatial.grid import Grid

SPACING = (0.7, 1.3, 2.9)
FLIPPED = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = np.array(sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()).reshape(3, 3)


def random_volume(shape=(6, 7, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 30.0, shape).astype(np.float32)


def write_array(path, array, spacing=SPACING, origin=(10.0, -20.0, 30.0), direction=OBLIQUE, is_vector=False):
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(tuple(np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))
    return path


def image_on_grid(shape=(6, 7, 8), direction=OBLIQUE) -> Image:
    grid = Grid.create(shape, SPACING, (10.0, -20.0, 30.0), direction)
    return Image(torch.from_numpy(random_volume(shape)), grid)


# ----------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("direction", [FLIPPED, OBLIQUE], ids=["flipped", "oblique"])
def test_write_then_read_keeps_geometry_and_values(tmp_path, suffix, direction):
    image = image_on_grid(direction=direction)
    path = tmp_path / f"volume{suffix}"
    write_image(image, path)
    read = read_image(path)
    assert read.data.dtype == torch.float32
    assert torch.equal(read.data, image.data)
    assert read.grid.shape == image.grid.shape
    np.testing.assert_allclose(read.grid.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(read.grid.origin, image.grid.origin, atol=1e-5)
    np.testing.assert_allclose(read.grid.direction_matrix, direction, atol=1e-6)


def write_dicom_series(folder, volume: np.ndarray, spacing, origin, direction, uid):
    """One CT series, written slice by slice as in SimpleITK's 'Dicom Series From Array' example."""
    folder.mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    d = image.GetDirection()
    tags = [("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".0"),
            ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
            ("0028|1053", "1"), ("0028|1052", "0"), ("0028|0100", "16"), ("0028|0101", "16"),
            ("0028|0102", "15"), ("0028|0103", "1")]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in tags:
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder(tmp_path):
    volume = np.random.default_rng(1).integers(-1000, 2000, (6, 10, 12))
    origin = (-40.0, 12.5, 100.0)
    write_dicom_series(tmp_path / "ct", volume, (0.7, 1.3, 2.9), origin, OBLIQUE, "1.2.826.0.1.3680043.2.1125.1.101")
    read = read_image(tmp_path / "ct")
    assert read.grid.shape == (6, 10, 12)
    np.testing.assert_allclose(read.grid.spacing, (0.7, 1.3, 2.9), atol=1e-4)
    np.testing.assert_allclose(read.grid.origin, origin, atol=1e-4)
    np.testing.assert_allclose(read.grid.direction_matrix, OBLIQUE, atol=1e-5)
    np.testing.assert_array_equal(read.numpy(), volume.astype(np.float32))


def test_dicom_folder_with_two_series_uses_the_larger_and_warns(tmp_path):
    folder = tmp_path / "ct"
    write_dicom_series(folder, np.random.default_rng(2).integers(0, 500, (5, 8, 8)), (1.0, 1.0, 2.0),
                       (0.0, 0.0, 0.0), np.eye(3), "1.2.826.0.1.3680043.2.1125.1.201")
    write_dicom_series(folder, np.random.default_rng(3).integers(0, 500, (7, 8, 8)), (1.0, 1.0, 2.0),
                       (0.0, 0.0, 0.0), np.eye(3), "1.2.826.0.1.3680043.2.1125.1.202")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        read = read_image(folder)
    assert read.grid.shape == (7, 8, 8)


# ----------------------------------------------------------------------------------- bad images
def bad_image(tmp_path, kind):
    """Writes one kind of invalid image and returns its path and the key word its error must contain."""
    volume = random_volume()
    if kind == "missing":
        return tmp_path / "nope.nii.gz", "does not exist"
    if kind == "garbage":
        path = tmp_path / "garbage.nii.gz"
        path.write_bytes(b"this is not an image" * 10)
        return path, "cannot be read"
    if kind == "empty folder":
        (tmp_path / "folder").mkdir()
        return tmp_path / "folder", "without a DICOM series"
    if kind == "2-D":
        return write_array(tmp_path / "flat.nii.gz", volume[0]), "is 2-D (8x7)"
    if kind == "size-1 axis":
        return write_array(tmp_path / "slab.mha", volume[:1]), "is 2-D (8x7x1)"
    if kind == "4-D":
        return write_array(tmp_path / "series.nii.gz", np.stack([volume, volume])), "is 4-D"
    if kind == "vector":
        return write_array(tmp_path / "rgb.mha", np.stack([volume] * 3, -1), is_vector=True), "3 components"
    if kind == "too small":
        return write_array(tmp_path / "thin.nii.gz", volume[:3]), "too few voxels"
    if kind in ("NaN", "Inf"):
        volume[2, 3, 4] = np.nan if kind == "NaN" else np.inf
        return write_array(tmp_path / "bad_values.nrrd", volume), kind
    if kind in ("NaN in NIfTI", "Inf in NIfTI"):
        # ITK reads NaN/Inf in NIfTI as 0: the raw-value check must catch them.
        volume[2, 3, 4] = np.nan if kind.startswith("NaN") else -np.inf
        return write_array(tmp_path / "bad_values.nii.gz", volume), kind.split()[0]
    if kind == "sheared":
        shear = [[1.0, 0.5, 0.0], [0.0, 0.866, 0.0], [0.0, 0.0, 1.0]]
        return write_array(tmp_path / "sheared.nrrd", volume, direction=shear), "sheared"
    if kind == "constant":
        return write_array(tmp_path / "constant.mha", np.full((6, 7, 8), 7.0, np.float32)), "constant"
    if kind == "all zero":
        return write_array(tmp_path / "zeros.mha", np.zeros((6, 7, 8), np.float32)), "empty"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "garbage", "empty folder", "2-D", "size-1 axis", "4-D", "vector",
                                  "too small", "sheared", "NaN", "Inf", "NaN in NIfTI", "Inf in NIfTI", "constant",
                                  "all zero"])
def test_bad_images_are_rejected_with_path_and_reason(tmp_path, kind):
    path, key = bad_image(tmp_path, kind)
    with pytest.raises(InputError) as error:
        read_image(path, role="moving image")
    message = str(error.value)
    assert str(path) in message and key in message and "moving image" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------- labels and masks
def labels_array(shape=(6, 7, 8)) -> np.ndarray:
    return np.random.default_rng(4).integers(0, 4, shape).astype(np.uint8)


def test_labels_on_the_image_grid_are_used_directly(tmp_path):
    image = image_on_grid()
    labels = labels_array()
    path = write_array(tmp_path / "labels.nii.gz", labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = read_labels(path, image)
    assert read.data.dtype == torch.int64 and read.grid == image.grid
    np.testing.assert_array_equal(read.numpy(), labels)


@pytest.mark.parametrize("layout", ["flip y", "swap x and y"])
def test_labels_stored_flipped_or_permuted_are_reoriented_exactly(tmp_path, layout):
    image = image_on_grid()
    labels = labels_array()
    grid = image.grid
    if layout == "flip y":
        stored = labels[:, ::-1, :]
        direction = grid.direction_matrix @ np.diag([1.0, -1.0, 1.0])
        origin = (grid.index_to_world() @ [0, grid.shape[1] - 1, 0, 1])[:3]
        spacing = SPACING
    else:
        stored = np.swapaxes(labels, 1, 2)
        direction = grid.direction_matrix[:, [1, 0, 2]]
        origin = grid.origin
        spacing = (SPACING[1], SPACING[0], SPACING[2])
    path = write_array(tmp_path / "labels.nrrd", np.ascontiguousarray(stored), spacing, origin, direction)
    with pytest.warns(UserWarning, match="reoriented"):
        read = read_labels(path, image)
    assert read.grid == image.grid
    np.testing.assert_array_equal(read.numpy(), labels)


def test_labels_on_a_coarser_grid_of_the_same_space_are_resampled_with_a_note(tmp_path):
    """A 4x4x4 label map of 2 mm voxels covering the same box as an 8x8x8 image of 1 mm voxels
    (like a 256^2 label map of a 512^2 CT): each label voxel becomes the 2x2x2 image voxels inside it."""
    image = Image(torch.from_numpy(random_volume((8, 8, 8))), Grid.create((8, 8, 8), (1.0, 1.0, 1.0)))
    coarse = np.arange(64, dtype=np.uint16).reshape(4, 4, 4) * 1000  # values up to 63000
    path = write_array(tmp_path / "labels.nii.gz", coarse, spacing=(2.0, 2.0, 2.0), origin=(0.5, 0.5, 0.5),
                       direction=np.eye(3))
    with pytest.warns(UserWarning, match=r"on another grid than its image.*resampled.*covering 100.0 %"):
        read = read_labels(path, image)
    assert read.grid == image.grid
    expected = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(read.numpy(), expected)


def test_labels_that_do_not_overlap_their_image_are_rejected(tmp_path):
    path = write_array(tmp_path / "labels.nii.gz", labels_array(), origin=(500.0, -20.0, 30.0))
    with pytest.raises(InputError, match="does not overlap its image") as error:
        read_labels(path, image_on_grid())
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("value, key", [(-1.0, "negative"), (1.5, "non-integer"), (np.nan, "non-integer")])
def test_labels_must_be_non_negative_integers(tmp_path, value, key):
    labels = labels_array().astype(np.float32)
    labels[1, 2, 3] = value
    path = write_array(tmp_path / "labels.nrrd", labels)
    with pytest.raises(InputError, match=key) as error:
        read_labels(path, image_on_grid())
    assert str(path) in str(error.value)


def test_all_zero_labels_are_accepted_with_a_warning(tmp_path):
    path = write_array(tmp_path / "labels.nii.gz", np.zeros((6, 7, 8), np.uint8))
    with pytest.warns(UserWarning, match="every voxel is 0"):
        read = read_labels(path, image_on_grid())
    assert not read.data.any()


def test_mask_is_binarised(tmp_path):
    labels = labels_array() * 3
    path = write_array(tmp_path / "mask.nii.gz", labels)
    mask = read_mask(path, image_on_grid())
    np.testing.assert_array_equal(mask.numpy(), (labels > 0).astype(np.int64))


def test_empty_mask_is_rejected(tmp_path):
    path = write_array(tmp_path / "mask.nii.gz", np.zeros((6, 7, 8), np.uint8))
    with pytest.raises(InputError, match="mask is empty") as error:
        read_mask(path, image_on_grid(), role="fixed mask")
    assert str(path) in str(error.value)


# ----------------------------------------------------------------------------------- output folder
def test_output_directory_is_created(tmp_path):
    folder = check_output_directory(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_output_directory_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "results"
    path.write_text("x")
    with pytest.raises(InputError, match="existing file") as error:
        check_output_directory(path)
    assert str(path) in str(error.value)


def test_output_directory_that_cannot_be_created_is_rejected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot be created or written") as error:
        check_output_directory(tmp_path / "file" / "results")
    assert str(tmp_path / "file" / "results") in str(error.value)


def test_unwritable_output_directory_is_rejected(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0o500 folder stays writable")
        with pytest.raises(InputError, match="cannot be created or written") as error:
            check_output_directory(folder)
        assert str(folder) in str(error.value)
    finally:
        folder.chmod(0o700)
