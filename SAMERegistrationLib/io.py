"""Reading, validating and writing the user's images, label maps and masks.

Every problem with a user file is an :class:`InputError` whose one-line message names the file, the
problem and what to do. Images come back as :class:`Image` objects whose grids keep the file's
geometry exactly (LPS mm, see :mod:`SAMERegistrationLib.spatial.grid`); user files are only read.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .image import Image, grid_of_sitk
from .nifti import check_nifti_voxels, is_nifti
from .spatial.grid import Grid
from .spatial.warp import resample_image, resample_labels

_MIN_VOXELS_PER_AXIS = 4


def read_image(path: str | os.PathLike, role: str = "fixed image") -> Image:
    """Reads a scalar 3-D image as float32.

    Args:
        path: a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, or a folder
            holding a DICOM series (the series with most files is used when there are several).
        role: how the message of an :class:`InputError` names the file, e.g. "moving image".

    Returns:
        an :class:`Image` with float32 ``data`` ``(D, H, W)`` on the file's grid (LPS mm).

    Raises:
        InputError: the file is missing, unreadable, damaged or truncated, is not a single scalar 3-D
            volume of at least 4 voxels per axis, or holds NaN/Inf values, only zeros or one constant
            value.
    """
    image = Image.from_sitk(_read_volume(path, role), dtype=torch.float32)
    _check_intensities(image.data, path, role)
    return image


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, known before any voxel is read.

    Attributes:
        shape: ``(D, H, W)`` voxel counts in array order.
        spacing: ``(sx, sy, sz)`` mm along the index axes (i, j, k).
        bytes_per_voxel: bytes of one stored voxel (all components).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    bytes_per_voxel: int

    @property
    def num_voxels(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def grid(self) -> Grid:
        """A grid of this size and spacing (at the origin, axis-aligned): for memory estimates."""
        return Grid.create(self.shape, self.spacing)


def read_header(path: str | os.PathLike, role: str = "fixed image") -> ImageHeader:
    """Reads only the header of an image file (or of a DICOM series' first file) and checks that it
    describes one scalar 3-D volume of at least 4 voxels per axis; no voxel is read.

    Raises:
        InputError: the file is missing, has no readable header, or is not such a volume.
    """
    source = Path(path)
    if not source.exists():
        raise InputError(f"{role} {source}: does not exist: check the path")
    files = _dicom_series_files(source, role) if source.is_dir() else [str(source)]
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise _unreadable(source, role) from error
    size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
    if len(files) > 1:
        size, spacing = size[:2] + [len(files)], spacing[:2] + [spacing[2] if len(spacing) > 2 else 1.0]
    _check_shape(size, reader.GetNumberOfComponents(), source, role)
    if min(spacing) <= 0:
        raise InputError(f"{role} {source}: has a voxel spacing of 0 or less ({spacing}): fix the file's header")
    return ImageHeader(tuple(size[::-1]), tuple(spacing), _BYTES_PER_VOXEL.get(reader.GetPixelIDValue(), 8))


_BYTES_PER_VOXEL = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
                        sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
                        sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}


def read_labels(path: str | os.PathLike, image: Image, role: str = "moving labels") -> Image:
    """Reads a label map belonging to ``image`` as int64 on ``image.grid``.

    A label file whose voxel centres are those of ``image`` but stored with axes flipped or permuted
    is reoriented exactly (nearest neighbour) onto ``image.grid``, with a warning. Labels on another
    grid that overlaps the image (e.g. a 256^2 label map of a 512^2 CT) are resampled onto
    ``image.grid`` (nearest neighbour, through physical space), with a warning that says how much of
    the image they cover. An all-zero label map is accepted with a warning.

    Args:
        path: label file or DICOM folder (any format :func:`read_image` reads).
        image: the image the labels belong to; its grid is the grid of the result.
        role: how messages name the file.

    Returns:
        an int64 :class:`Image` ``(D, H, W)`` on ``image.grid``.

    Raises:
        InputError: unreadable file, values that are negative or not integers, or a grid that does not
            overlap the image.
    """
    labels = _labels_on_grid(path, image, role)
    if not bool(labels.data.any()):
        warnings.warn(f"{role} {path}: every voxel is 0 (no labels)", stacklevel=2)
    return labels


def read_label_map(path: str | os.PathLike, role: str = "input labels") -> Image:
    """Reads a label map on its own grid (non-negative integers), as int64.

    Raises:
        InputError: unreadable file, or values that are negative or not integers.
    """
    volume = _read_volume(path, role)
    values = sitk.GetArrayFromImage(volume)
    _check_label_values(values, path, role)
    return Image(torch.from_numpy(values.astype(np.int64)), grid_of_sitk(volume))


def read_grid(path: str | os.PathLike, role: str = "reference image") -> Grid:
    """The grid (LPS mm) of an image file or DICOM folder, whatever its values.

    Raises:
        InputError: the file is missing or unreadable or not a single scalar 3-D volume.
    """
    return grid_of_sitk(_read_volume(path, role))


def read_mask(path: str | os.PathLike, image: Image, role: str = "fixed mask") -> Image:
    """Reads a mask belonging to ``image``: like :func:`read_labels`, then binarised.

    Returns:
        an int64 :class:`Image` of 0/1 on ``image.grid`` (1 where the file's value is > 0).

    Raises:
        InputError: as :func:`read_labels`, or when no voxel is inside the mask.
    """
    labels = _labels_on_grid(path, image, role)
    mask = (labels.data > 0).to(torch.int64)
    if not bool(mask.any()):
        raise InputError(f"{role} {path}: the mask is empty (no voxel is > 0): give a mask that covers "
                         "the region to register, or leave the mask out")
    return Image(mask, labels.grid)


def write_image(image: Image, path: str | os.PathLike, pixel_type: int | None = None) -> None:
    """Writes ``image`` with its geometry (format from the file name, compressed where possible).

    Args:
        image: the image to write; its grid becomes the file's origin/spacing/direction (LPS).
        path: output file; its folder must exist (see :func:`check_output_directory`).
        pixel_type: SimpleITK pixel type such as ``sitk.sitkUInt8``; None keeps the data's type.
    """
    try:
        sitk.WriteImage(image.to_sitk(pixel_type), str(path), useCompression=True)
    except RuntimeError as error:
        raise InputError(f"{path}: the image cannot be written: check the file name's extension "
                         "(.nii.gz, .nrrd, .mha) and that its folder exists and is writable") from error


def write_labels(labels: Image, path: str | os.PathLike) -> None:
    """Writes an integer label map in the smallest unsigned type that holds its largest value, so
    every value is kept exactly (:func:`label_pixel_type`)."""
    write_image(labels, path, label_pixel_type(int(labels.data.max())))


def label_pixel_type(largest: int) -> int:
    """The smallest unsigned SimpleITK pixel type that holds label values up to ``largest``."""
    for pixel, bits in ((sitk.sitkUInt8, 8), (sitk.sitkUInt16, 16), (sitk.sitkUInt32, 32)):
        if largest < 2**bits:
            return pixel
    return sitk.sitkUInt64


def check_output_directory(path: str | os.PathLike) -> Path:
    """Creates the output folder if needed and checks that files can be written into it.

    Returns:
        the folder as a :class:`Path`.

    Raises:
        InputError: the path is an existing file, or the folder cannot be created or written to.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output directory {folder}: is an existing file, not a folder: "
                         "choose a folder path for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write_probe_")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise InputError(f"output directory {folder}: cannot be created or written to ({error.strerror}): "
                         "choose a folder you have write permission for") from error
    return folder


# --------------------------------------------------------------------------------------- reading
def _read_volume(path: str | os.PathLike, role: str) -> sitk.Image:
    """Checks the header (and a NIfTI file's stored voxels), then reads a file or DICOM folder."""
    source = Path(path)
    read_header(source, role)
    if is_nifti(source):
        check_nifti_voxels(source, role)
    try:
        if source.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series_files(source, role, warn=True))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(source))
    except RuntimeError as error:
        raise _unreadable(source, role) from error
    _check_shape(list(image.GetSize()), image.GetNumberOfComponentsPerPixel(), source, role)
    _check_direction(image, source, role)
    return image


def _unreadable(source: Path, role: str) -> InputError:
    return InputError(f"{role} {source}: cannot be read as an image (damaged, truncated or not an image file): "
                      "give a NIfTI, NRRD or MHA file or a DICOM series folder")


def _dicom_series_files(folder: Path, role: str, warn: bool = False) -> list[str]:
    """The files of the DICOM series of ``folder`` (the one with most files when there are several)."""
    series = _dicom_series(str(folder), folder.stat().st_mtime_ns)
    if not series:
        raise InputError(f"{role} {folder}: is a folder without a DICOM series: give an image file or a "
                         "folder holding one DICOM series")
    uid = max(series, key=lambda key: len(series[key]))
    if warn and len(series) > 1:
        warnings.warn(f"{role} {folder}: holds {len(series)} DICOM series; using {uid} "
                      f"({len(series[uid])} files, the largest)", stacklevel=4)
    return list(series[uid])


@functools.lru_cache(maxsize=8)
def _dicom_series(folder: str, modified_ns: int) -> dict[str, tuple[str, ...]]:
    """{series UID: its files} of a folder; cached while the folder is unchanged (``modified_ns``), as
    the header check and the reading both need it and scanning every file takes time."""
    return {uid: tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)}


def _check_shape(size: list[int], components: int, path: Path, role: str) -> None:
    """A single scalar 3-D volume with at least 4 voxels along every axis (``size`` in ITK order)."""
    text = "x".join(map(str, size))
    if len(size) == 2 or (len(size) == 3 and 1 in size):
        raise InputError(f"{role} {path}: is 2-D ({text}): a 3-D volume is needed "
                         "(for DICOM, give the folder of the whole series)")
    if len(size) != 3:
        raise InputError(f"{role} {path}: is {len(size)}-D ({text}): a single 3-D volume is needed, "
                         "extract one volume first")
    if components != 1:
        raise InputError(f"{role} {path}: has {components} components per voxel "
                         "(vector or colour image): a scalar (grey-value) 3-D volume is needed")
    if min(size) < _MIN_VOXELS_PER_AXIS:
        raise InputError(f"{role} {path}: has too few voxels ({text}): at least {_MIN_VOXELS_PER_AXIS} "
                         "voxels along every axis are needed")


def _check_direction(image: sitk.Image, path: Path, role: str) -> None:
    """An orthonormal direction matrix (no shear), as :class:`Grid` requires."""
    try:
        grid_of_sitk(image)
    except ValueError as error:
        raise InputError(f"{role} {path}: has a sheared or degenerate voxel grid ({error}): resample it "
                         "onto a grid with orthogonal axes first") from error


def _check_intensities(data: torch.Tensor, path: str | os.PathLike, role: str) -> None:
    """Finite values that are not all equal."""
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        kind = "NaN" if bool(torch.isnan(data).any()) else "Inf"
        raise InputError(f"{role} {path}: contains {kind} values (in {int((~finite).sum())} of "
                         f"{data.numel()} voxels): replace them with finite numbers")
    low, high = float(data.min()), float(data.max())
    if low == high == 0.0:
        raise InputError(f"{role} {path}: is empty (all voxels are 0): check that the right file was given")
    if low == high:
        raise InputError(f"{role} {path}: is constant (every voxel is {low:g}): an image with contrast is needed")


# --------------------------------------------------------------------------------------- labels
def _labels_on_grid(path: str | os.PathLike, image: Image, role: str) -> Image:
    """Reads non-negative integer labels and puts them exactly on ``image.grid``."""
    labels = read_label_map(path, role)
    if labels.grid.same_as(image.grid):
        return Image(labels.data, image.grid)
    if labels.grid.same_voxels_as(image.grid):
        warnings.warn(f"{role} {path}: stored with flipped or permuted axes relative to its image; "
                      "reoriented onto the image grid (exact, nearest neighbour)", stacklevel=3)
        return resample_labels(labels, image.grid, method="nearest")
    covered = float(resample_image(Image(torch.ones(labels.grid.shape), labels.grid), image.grid,
                                   interpolation="nearest").data.mean())
    if covered == 0.0:
        raise InputError(f"{role} {path}: label grid ({labels.grid.describe()}) does not overlap its image "
                         f"({image.grid.describe()}): give the label map of this image")
    warnings.warn(f"{role} {path}: on another grid than its image ({labels.grid.describe()}); resampled onto "
                  f"the image grid (nearest neighbour), covering {100 * covered:.1f} % of the image", stacklevel=3)
    return resample_labels(labels, image.grid, method="nearest")


def _check_label_values(values: np.ndarray, path: str | os.PathLike, role: str) -> None:
    """Label values must be non-negative integers that fit int64."""
    if values.dtype == np.uint64 and int(values.max()) > np.iinfo(np.int64).max:
        raise InputError(f"{role} {path}: has label values above {np.iinfo(np.int64).max}: renumber the labels")
    if values.dtype.kind == "f" and (not bool(np.isfinite(values).all())
                                     or not bool((values == np.round(values)).all())):
        raise InputError(f"{role} {path}: has non-integer values: labels must be whole numbers "
                         "(0 = background); save the label map with an integer pixel type")
    if values.min() < 0:
        raise InputError(f"{role} {path}: has negative values (minimum {values.min():g}): labels must be "
                         "non-negative integers (0 = background)")

