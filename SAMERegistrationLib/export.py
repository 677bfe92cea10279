"""Transforms to and from ITK files (readable by SimpleITK, ITK, ANTs and 3D Slicer).

Every transform here maps *fixed* LPS mm points to *moving* LPS mm points, exactly like
:meth:`SpatialTransform.map_points` and ITK's resampling convention.

ITK's ``CompositeTransform`` applies the transform added *last* first:
after ``AddTransform(A)`` then ``AddTransform(B)`` it maps ``x`` to ``A(B(x))``.

Displacement fields outside their grid: ITK uses zero displacement, :class:`SpatialTransform` the
nearest edge displacement, so both agree inside the field grid only.

NIfTI displacement fields (intent code 1006, NIFTI_INTENT_DISPVECT) hold *RAS* vectors: ITK converts
them to LPS when it reads such a file, so :func:`write_displacement_field` stores RAS components.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .sitk_geometry import affine_from_sitk, grid_of_sitk, sample_displacement, with_grid_geometry
from .spatial.grid import LPS_TO_RAS, Grid
from .spatial.transform import InverseTransform, SpatialTransform

NIFTI_INTENT_DISPVECT = 1006
_NIFTI1_HEADER_SIZE = 348
_NIFTI1_INTENT_CODE_OFFSET = 68


# --------------------------------------------------------------------------------------- affines
def affine_to_sitk(matrix: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 LPS affine (fixed -> moving) as an ITK ``AffineTransform`` with centre 0."""
    matrix = np.asarray(matrix, dtype=float)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(matrix[:3, :3].ravel()))
    transform.SetTranslation(tuple(matrix[:3, 3]))
    return transform


def write_affine(matrix: np.ndarray, path: str | os.PathLike) -> None:
    """Writes a 4x4 LPS affine (fixed -> moving) as an ITK transform file (``.tfm``/``.txt``/``.h5``)."""
    _write_sitk_transform(affine_to_sitk(matrix), path)


# --------------------------------------------------------------------------------------- fields
def displacement_field_image(displacement: torch.Tensor, grid: Grid) -> sitk.Image:
    """A displacement field as an ITK vector image.

    Args:
        displacement: ``(3, D, H, W)`` LPS mm vectors (x, y, z) on ``grid``; fixed point ``p`` maps to
            ``p + displacement(p)`` in the moving image.
        grid: the field's grid.

    Returns:
        a ``sitkVectorFloat64`` image with 3 LPS components and ``grid``'s geometry.
    """
    if tuple(displacement.shape) != (3, *grid.shape):
        raise ValueError(f"displacement_field_image(): displacement shape {tuple(displacement.shape)} "
                         f"does not match (3, *{grid.shape})")
    vectors = torch.movedim(displacement.detach().cpu().double(), 0, -1).numpy()
    return with_grid_geometry(sitk.GetImageFromArray(np.ascontiguousarray(vectors), isVector=True), grid)


def write_displacement_field(displacement: torch.Tensor, grid: Grid, path: str | os.PathLike) -> None:
    """Writes a displacement field (fixed LPS -> moving LPS offsets) for ITK, ANTs or Slicer.

    ``.nii``/``.nii.gz``: a NIfTI-1 image of float32 vectors with intent code 1006 (displacement
    vectors) and RAS components, as the NIfTI standard and ITK's reader expect (ITK reads them back
    as LPS). float32 holds the library's fields exactly (they are computed in float32).
    ``.h5``/``.hdf5``/``.tfm``/``.txt``: an ITK ``DisplacementFieldTransform``.

    Args:
        displacement: ``(3, D, H, W)`` LPS mm vectors on ``grid``.
        grid: the field's grid (any direction and spacing).
        path: output file; its folder must exist.
    """
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        ras = torch.einsum("rc,c...->r...", torch.as_tensor(LPS_TO_RAS), displacement.detach().cpu().double())
        image = sitk.Cast(displacement_field_image(ras, grid), sitk.sitkVectorFloat32)
        try:
            _write_nifti_with_intent_code(image, Path(path), NIFTI_INTENT_DISPVECT)
        except (RuntimeError, OSError) as error:
            raise InputError(f"{path}: the displacement field cannot be written: check that its folder "
                             "exists and is writable") from error
    elif name.endswith((".h5", ".hdf5", ".tfm", ".txt")):
        _write_sitk_transform(sitk.DisplacementFieldTransform(displacement_field_image(displacement, grid)), path)
    else:
        raise InputError(f"{path}: unknown displacement field format: use .nii.gz, .nii or .h5")


def _write_nifti_with_intent_code(image: sitk.Image, path: Path, code: int) -> None:
    """Writes ``image`` as NIfTI-1 with ``intent_code`` set, then checks it by reading it back.

    SimpleITK cannot set the intent code of a vector image, so the header is patched: in place for
    ``.nii``; for ``.nii.gz`` the image is written uncompressed to a temporary file beside ``path``,
    patched, and compressed once into ``path`` (compressing is most of the cost of writing).
    """
    if not path.name.lower().endswith(".gz"):
        sitk.WriteImage(image, str(path), useCompression=False)
        _set_nifti_intent_code(path, code)
    else:
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".nii")
        os.close(handle)
        try:
            sitk.WriteImage(image, temporary, useCompression=False)
            _set_nifti_intent_code(Path(temporary), code)
            with open(temporary, "rb") as source, gzip.open(path, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target, length=1 << 24)
        finally:
            os.remove(temporary)
    if _read_intent_code(path) != code:
        raise RuntimeError(f"{path}: setting the NIfTI intent code to {code} failed")


def _set_nifti_intent_code(path: Path, code: int) -> None:
    """Sets the intent code in the header of an uncompressed NIfTI-1 file, in place."""
    with open(path, "r+b") as file:
        header = _with_intent_code(file.read(_NIFTI1_HEADER_SIZE), code)
        file.seek(0)
        file.write(header)


def _nifti1_byte_order(header: bytes) -> str:
    """``"<"`` or ``">"``: the byte order for which ``sizeof_hdr`` reads 348 (NIfTI-1)."""
    for order in "<>":
        if struct.unpack(order + "i", header[:4])[0] == _NIFTI1_HEADER_SIZE:
            return order
    raise ValueError("not a NIfTI-1 header (sizeof_hdr is not 348)")


def _with_intent_code(header: bytes, code: int) -> bytes:
    """A copy of a NIfTI-1 header with ``intent_code`` (int16 at byte 68) set to ``code``."""
    patched = bytearray(header)
    struct.pack_into(_nifti1_byte_order(header) + "h", patched, _NIFTI1_INTENT_CODE_OFFSET, code)
    return bytes(patched)


def _read_intent_code(path: Path) -> int:
    """The ``intent_code`` of a NIfTI-1 file (gzipped or not)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as file:
        header = file.read(_NIFTI1_HEADER_SIZE)
    return struct.unpack_from(_nifti1_byte_order(header) + "h", header, _NIFTI1_INTENT_CODE_OFFSET)[0]


# --------------------------------------------------------------------------------------- whole results
def to_sitk_transform(transform: SpatialTransform) -> sitk.Transform:
    """The whole registration result as one ITK transform (fixed LPS -> moving LPS).

    Returns:
        an ``AffineTransform`` when there is no field, else a ``CompositeTransform`` holding the
        affine and then a ``DisplacementFieldTransform``; ITK applies the last added transform first,
        so it maps ``x`` to ``A @ (x + w(x))`` like :meth:`SpatialTransform.map_points` (inside the
        field grid; outside it ITK uses zero displacement).
    """
    affine = affine_to_sitk(transform.affine)
    if not transform.has_field:
        return affine
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(
        displacement_field_image(transform.field, transform.field_grid)))
    return composite


def inverse_to_sitk_transform(inverse: InverseTransform) -> sitk.CompositeTransform:
    """The moving -> fixed inverse of a result as one ITK transform (moving LPS -> fixed LPS).

    Returns:
        a ``CompositeTransform`` holding a ``DisplacementFieldTransform`` and then the affine; ITK
        applies the last added transform first, so it maps ``y`` to ``z + w(z)`` with
        ``z = B @ y`` like :meth:`InverseTransform.map_points` (inside the field grid).
    """
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.DisplacementFieldTransform(displacement_field_image(inverse.field, inverse.field_grid)))
    composite.AddTransform(affine_to_sitk(inverse.affine))
    return composite


def write_transform(transform: SpatialTransform | InverseTransform, path: str | os.PathLike) -> None:
    """Writes the whole result (see :func:`to_sitk_transform`), or its inverse (see
    :func:`inverse_to_sitk_transform`), as an ITK transform file, normally ``.h5``."""
    if isinstance(transform, InverseTransform):
        _write_sitk_transform(inverse_to_sitk_transform(transform), path)
    else:
        _write_sitk_transform(to_sitk_transform(transform), path)


def read_initial_transform(path: str | os.PathLike, reference_grid: Grid) -> SpatialTransform:
    """Reads an ITK transform file (fixed LPS -> moving LPS) as a :class:`SpatialTransform`.

    Linear transforms (including composites of linear ones) become an affine. A displacement field,
    alone or applied before linear parts (the form :func:`write_transform` writes), is taken over
    exactly on its own grid. Any other transform (B-spline, other composites) is sampled at the
    voxel centres of ``reference_grid`` into a displacement field on that grid.

    Args:
        path: ``.tfm``, ``.txt``, ``.mat`` or ``.h5`` ITK transform file.
        reference_grid: the fixed working grid that non-linear transforms are sampled on.

    Raises:
        InputError: the file is missing, unreadable, not a 3-D transform, or holds NaN/Inf.
    """
    result = _as_spatial_transform(_read_itk_transform(path, "initial transform"), reference_grid)
    if not np.isfinite(np.asarray(result.affine)).all() or (
            result.has_field and not bool(torch.isfinite(result.field).all())):
        raise InputError(f"initial transform {path}: holds NaN or Inf parameters: give a valid transform")
    return result


def read_transform(path: str | os.PathLike, reference_grid: Grid,
                   role: str = "transform") -> SpatialTransform | InverseTransform:
    """Reads any ITK transform file for resampling (maps output-grid points to input points).

    Exact for the two forms this package writes: ``transform.h5`` (a field applied first, then
    linear parts) becomes a :class:`SpatialTransform` and ``inverse_transform.h5`` (linear parts
    applied first, then a field) an :class:`InverseTransform`; otherwise as
    :func:`read_initial_transform` (linear: exact; other: sampled on ``reference_grid``).

    Raises:
        InputError: the file is missing, unreadable or not a 3-D transform (named as ``role``).
    """
    transform = _read_itk_transform(path, role)
    inverse = _linear_then_field(transform)
    return inverse if inverse is not None else _as_spatial_transform(transform, reference_grid)


def _read_itk_transform(path: str | os.PathLike, role: str) -> sitk.Transform:
    """A 3-D ITK transform read from a file; InputError naming ``role`` otherwise."""
    source = Path(path)
    if not source.is_file():
        raise InputError(f"{role} {source}: does not exist: check the path")
    try:
        transform = sitk.ReadTransform(str(source))
    except RuntimeError as error:
        raise InputError(f"{role} {source}: cannot be read as an ITK transform: give a .tfm, "
                         ".txt, .mat or .h5 transform file") from error
    if transform.GetDimension() != 3:
        raise InputError(f"{role} {source}: is {transform.GetDimension()}-D: a 3-D transform is needed")
    return transform


def _as_spatial_transform(transform: sitk.Transform, reference_grid: Grid) -> SpatialTransform:
    """Linear: the affine; a field applied before linear parts: exact; other: sampled on ``reference_grid``."""
    if transform.IsLinear():
        result = SpatialTransform.from_affine(affine_from_sitk(transform))
    else:
        result = _field_then_linear(transform)
        if result is None:
            result = SpatialTransform(np.eye(4), _sample_displacement(transform, reference_grid), reference_grid)
    return result


def _parts(transform: sitk.Transform) -> list[sitk.Transform]:
    """The transforms of a composite in the order they were added (the last acts first), or [transform]."""
    if transform.GetName() != "CompositeTransform":
        return [transform]
    composite = sitk.CompositeTransform(transform)
    return [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]


def _field_then_linear(transform: sitk.Transform) -> SpatialTransform | None:
    """The exact :class:`SpatialTransform` of a displacement field applied first, then linear parts
    (a lone field, or a composite whose last added transform is the field); None otherwise."""
    *linear, last = _parts(transform)
    if last.GetName() != "DisplacementFieldTransform" or not all(part.IsLinear() for part in linear):
        return None
    field, grid = _field_of(last)
    return SpatialTransform(_linear_chain(linear), field, grid)


def _linear_then_field(transform: sitk.Transform) -> InverseTransform | None:
    """The exact :class:`InverseTransform` of linear parts applied first, then a displacement field
    (a composite whose first added transform is the field, followed by at least one linear one,
    as :func:`inverse_to_sitk_transform` writes); None otherwise."""
    first, *linear = _parts(transform)
    if first.GetName() != "DisplacementFieldTransform" or not linear or not all(part.IsLinear() for part in linear):
        return None
    field, grid = _field_of(first)
    return InverseTransform(_linear_chain(linear), field, grid)


def _field_of(transform: sitk.Transform) -> tuple[torch.Tensor, Grid]:
    """The ``(3, D, H, W)`` float32 LPS mm displacement of a DisplacementFieldTransform, and its grid."""
    field_image = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    field = torch.movedim(torch.from_numpy(sitk.GetArrayFromImage(field_image)).float(), -1, 0).contiguous()
    return field, grid_of_sitk(field_image)


def _linear_chain(linear: list[sitk.Transform]) -> np.ndarray:
    """The 4x4 LPS matrix of linear transforms in composite order (identity for none)."""
    if not linear:
        return np.eye(4)
    chain = sitk.CompositeTransform(3)
    for part in linear:
        chain.AddTransform(part)
    return affine_from_sitk(chain)


def _sample_displacement(transform: sitk.Transform, grid: Grid) -> torch.Tensor:
    """``transform(x) - x`` at the voxel centres of ``grid``: ``(3, D, H, W)`` float32 LPS mm."""
    return torch.from_numpy(sample_displacement(transform, grid)).float().contiguous()


def _write_sitk_transform(transform: sitk.Transform, path: str | os.PathLike) -> None:
    try:
        sitk.WriteTransform(transform, str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: the transform cannot be written: use a .h5 (or, for an affine, .tfm) "
                         "file name in a writable folder") from error
