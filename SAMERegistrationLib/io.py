"""Reading, validating and writing the user's images, label maps and masks.

Every problem with a user file is an :class:`InputError` whose one-line message names the file, the
problem and what to do. Images come back as :class:`Image` objects whose grids keep the file's
geometry exactly (LPS mm, see :mod:`SAMERegistrationLib.spatial.grid`); user files are only read.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .image import Image, grid_of_sitk
from .spatial.grid import Grid
from .spatial.warp import resample_labels

_MIN_VOXELS_PER_AXIS = 4
LABEL_NAMES_FILE = "label_names.json"
"""Names of the labels of the label maps in a folder: a JSON object {"1": "spleen", ...}."""


def read_image(path: str | os.PathLike, role: str = "fixed image") -> Image:
    """Reads a scalar 3-D image as float32.

    Args:
        path: a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, or a folder
            holding a DICOM series (the series with most files is used when there are several).
        role: how the message of an :class:`InputError` names the file, e.g. "moving image".

    Returns:
        an :class:`Image` with float32 ``data`` ``(D, H, W)`` on the file's grid (LPS mm).

    Raises:
        InputError: the file is missing or unreadable, is not a single scalar 3-D volume of at least
            4 voxels per axis, or holds NaN/Inf values, only zeros or one constant value.
    """
    image = Image.from_sitk(_read_volume(path, role), dtype=torch.float32)
    _check_intensities(image.data, path, role)
    _check_nifti_finite(Path(path), role)
    return image


def read_labels(path: str | os.PathLike, image: Image, role: str = "moving labels") -> Image:
    """Reads a label map belonging to ``image`` as int64 on ``image.grid``.

    A label file whose voxel centres are those of ``image`` but stored with axes flipped or permuted
    is reoriented exactly (nearest neighbour) onto ``image.grid``, with a warning. An all-zero label
    map is accepted with a warning.

    Args:
        path: label file or DICOM folder (any format :func:`read_image` reads).
        image: the image the labels belong to; its grid is the grid of the result.
        role: how messages name the file.

    Returns:
        an int64 :class:`Image` ``(D, H, W)`` on ``image.grid``.

    Raises:
        InputError: unreadable file, values that are negative or not integers, or a grid that does not
            hold the image's voxel centres.
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


def read_label_names(path: str | os.PathLike, role: str = "label names") -> dict[int, str]:
    """Reads a label-name file: a JSON object mapping label values to names, ``{"1": "spleen"}``.

    Raises:
        InputError: unreadable file, not JSON, or keys that are not non-negative integers or
            values that are not text.
    """
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InputError(f"{role} {source}: does not exist: check the path") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{role} {source}: cannot be read as JSON ({error}): give a JSON object such as "
                         '{"1": "liver", "2": "spleen"}') from error
    if not isinstance(data, dict) or not all(isinstance(key, str) and key.isdigit() and isinstance(name, str)
                                             for key, name in data.items()):
        raise InputError(f"{role} {source}: is not a JSON object of label values and names: give one such as "
                         '{"1": "liver", "2": "spleen"}')
    return {int(key): name for key, name in data.items()}


def label_names_beside(*label_paths: str | os.PathLike | None) -> dict[int, str]:
    """The names in the :data:`LABEL_NAMES_FILE` beside the first of ``label_paths`` that has one
    (files, or DICOM folders whose parent holds it); empty when none has."""
    for path in label_paths:
        candidate = None if path is None else Path(path).parent / LABEL_NAMES_FILE
        if candidate is not None and candidate.is_file():
            return read_label_names(candidate)
    return {}


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
    """Writes an integer label map as uint8 (values below 256) or uint16."""
    write_image(labels, path, sitk.sitkUInt8 if int(labels.data.max()) < 256 else sitk.sitkUInt16)


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
    """Reads a file or DICOM folder and checks it is one scalar 3-D volume."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"{role} {source}: does not exist: check the path")
    try:
        image = _read_dicom_series(source, role) if source.is_dir() else sitk.ReadImage(str(source))
    except RuntimeError as error:
        raise InputError(f"{role} {source}: cannot be read as an image: give a NIfTI, NRRD or MHA file "
                         "or a DICOM series folder") from error
    _check_shape(image, source, role)
    _check_direction(image, source, role)
    return image


def _read_dicom_series(folder: Path, role: str) -> sitk.Image:
    """Reads the DICOM series of ``folder`` (the one with most files when there are several)."""
    series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
              for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    if not series:
        raise InputError(f"{role} {folder}: is a folder without a DICOM series: give an image file or a "
                         "folder holding one DICOM series")
    uid = max(series, key=lambda key: len(series[key]))
    if len(series) > 1:
        warnings.warn(f"{role} {folder}: holds {len(series)} DICOM series; using {uid} "
                      f"({len(series[uid])} files, the largest)", stacklevel=3)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[uid])
    return reader.Execute()


def _check_shape(image: sitk.Image, path: Path, role: str) -> None:
    """A single scalar 3-D volume with at least 4 voxels along every axis."""
    size = "x".join(map(str, image.GetSize()))
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and 1 in image.GetSize()):
        raise InputError(f"{role} {path}: is 2-D ({size}): a 3-D volume is needed "
                         "(for DICOM, give the folder of the whole series)")
    if image.GetDimension() != 3:
        raise InputError(f"{role} {path}: is {image.GetDimension()}-D ({size}): a single 3-D volume is needed, "
                         "extract one volume first")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} {path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(vector or colour image): a scalar (grey-value) 3-D volume is needed")
    if min(image.GetSize()) < _MIN_VOXELS_PER_AXIS:
        raise InputError(f"{role} {path}: has too few voxels ({size}): at least {_MIN_VOXELS_PER_AXIS} "
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


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _check_nifti_finite(path: Path, role: str) -> None:
    """NaN/Inf check on the raw voxels of a floating-point NIfTI file.

    ITK 5.4 (SimpleITK 2.5) replaces NaN and Inf by 0 when it reads NIfTI, so the check on the
    loaded image cannot see them; this one reads the stored values.
    """
    if not path.is_file() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as stream:
        content = stream.read()
    for order in ("<", ">"):
        size = int(np.frombuffer(content[:4], dtype=f"{order}i4")[0])
        if size == 348:
            datatype = int(np.frombuffer(content[70:72], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(content[108:112], dtype=f"{order}f4")[0])
            break
        if size == 540:
            datatype = int(np.frombuffer(content[12:14], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(content[168:176], dtype=f"{order}i8")[0])
            break
    else:
        return
    if datatype not in _NIFTI_FLOAT_TYPES:
        return
    dtype = np.dtype(f"{order}{_NIFTI_FLOAT_TYPES[datatype]}")
    count = (len(content) - offset) // dtype.itemsize
    values = np.frombuffer(content, dtype=dtype, count=count, offset=offset)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        kind = "NaN" if bool(np.isnan(values).any()) else "Inf"
        raise InputError(f"{role} {path}: contains {kind} values (in {bad} of {values.size} voxels): "
                         "replace them with finite numbers")


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
    raise InputError(f"{role} {path}: label grid ({labels.grid.describe()}) does not match its image "
                     f"({image.grid.describe()}): resample the labels onto the image grid first")


def _check_label_values(values: np.ndarray, path: str | os.PathLike, role: str) -> None:
    """Label values must be non-negative integers."""
    if not bool(np.isfinite(values).all()) or not bool((values == np.round(values)).all()):
        raise InputError(f"{role} {path}: has non-integer values: labels must be whole numbers "
                         "(0 = background); save the label map with an integer pixel type")
    if values.min() < 0:
        raise InputError(f"{role} {path}: has negative values (minimum {values.min():g}): labels must be "
                         "non-negative integers (0 = background)")

