"""Checking the stored voxels of a NIfTI file: all there (not truncated) and finite.

ITK 5.4 (SimpleITK 2.5) reads a truncated ``.nii`` as an image whose missing part is zeros, reads a
truncated ``.nii.gz`` without complaint, and replaces NaN and Inf by 0; so these checks read the
file's own bytes. The data is streamed in blocks of :data:`BLOCK_BYTES`, so the check needs a few
tens of MiB whatever the image's size (a compressed file is decompressed once, block by block).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

BLOCK_BYTES = 1 << 24
"""Bytes of voxel data examined at a time (16 MiB)."""

_FLOAT_TYPES = {16: "f4", 64: "f8"}
"""NIfTI ``datatype`` codes of the floating-point types that can hold NaN/Inf (float32, float64)."""


@dataclass(frozen=True)
class NiftiLayout:
    """Where a NIfTI file's voxels are and how many bytes they take.

    Attributes:
        data_offset: byte offset of the first voxel (``vox_offset``).
        data_bytes: bytes of voxel data the header announces (product of ``dim`` times ``bitpix / 8``).
        float_dtype: numpy dtype of floating-point voxels (with the file's byte order), or None for
            integer types (which cannot hold NaN/Inf).
    """

    data_offset: int
    data_bytes: int
    float_dtype: np.dtype | None


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))


def check_nifti_voxels(path: Path, role: str) -> None:
    """Refuses a NIfTI file whose voxel data is shorter than its header says, whose compressed
    stream is damaged, or whose floating-point voxels include NaN or Inf.

    Raises:
        InputError: one line naming the file and the problem.
    """
    with open(path, "rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    opener = gzip.open if compressed else open
    def damaged(reason: str) -> InputError:
        return InputError(f"{role} {path}: is damaged or incomplete ({reason}): copy or export the file again")

    try:
        with opener(path, "rb") as stream:
            layout = _layout(stream.read(_NIFTI2_HEADER_BYTES))
            if layout is None:
                return  # not a NIfTI-1/2 header: ITK's reader has its own checks
            if not compressed and layout.float_dtype is None:
                stored, bad, kind = min(path.stat().st_size - layout.data_offset, layout.data_bytes), 0, ""
            else:
                stream.seek(layout.data_offset)
                stored, bad, kind = _scan(stream, layout)
            if compressed:
                while stream.read(BLOCK_BYTES):  # to the end, where gzip checks the stream's length and CRC
                    pass
    except (EOFError, OSError, zlib.error) as error:
        raise damaged(f"the compressed data ends early or is corrupt: {error}") from error
    if stored < layout.data_bytes:
        raise damaged(f"the header announces {layout.data_bytes} bytes of voxels but only {max(stored, 0)} are stored")
    if bad:
        voxels = layout.data_bytes // layout.float_dtype.itemsize
        raise InputError(f"{role} {path}: contains {kind} values (in {bad} of {voxels} voxels): "
                         "replace them with finite numbers")


_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540


def _layout(header: bytes) -> NiftiLayout | None:
    """The voxel layout from a NIfTI-1 or NIfTI-2 header (either byte order); None if it is neither."""
    if len(header) < _NIFTI1_HEADER_BYTES:
        return None
    for order in "<>":
        size = struct.unpack_from(order + "i", header, 0)[0]
        if size == _NIFTI1_HEADER_BYTES:
            dims = struct.unpack_from(order + "8h", header, 40)
            datatype, bitpix = struct.unpack_from(order + "2h", header, 70)
            offset = int(struct.unpack_from(order + "f", header, 108)[0])
            break
        if size == _NIFTI2_HEADER_BYTES and len(header) >= _NIFTI2_HEADER_BYTES:
            datatype, bitpix = struct.unpack_from(order + "2h", header, 12)
            dims = struct.unpack_from(order + "8q", header, 16)
            offset = struct.unpack_from(order + "q", header, 168)[0]
            break
    else:
        return None
    count = 1
    for extent in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        count *= max(int(extent), 1)
    float_dtype = np.dtype(order + _FLOAT_TYPES[datatype]) if datatype in _FLOAT_TYPES else None
    return NiftiLayout(max(int(offset), size), count * max(int(bitpix), 8) // 8, float_dtype)


def _scan(stream, layout: NiftiLayout) -> tuple[int, int, str]:
    """Reads the voxel data block by block: (bytes stored, count of non-finite values, "NaN"/"Inf")."""
    stored, bad, kind = 0, 0, "Inf"
    itemsize = layout.float_dtype.itemsize if layout.float_dtype is not None else 1
    block_bytes = BLOCK_BYTES - BLOCK_BYTES % itemsize
    while stored < layout.data_bytes:
        block = stream.read(min(block_bytes, layout.data_bytes - stored))
        if not block:
            break
        stored += len(block)
        if layout.float_dtype is not None:
            values = np.frombuffer(block, dtype=layout.float_dtype, count=len(block) // itemsize)
            finite = np.isfinite(values)
            if not finite.all():
                bad += int(values.size - np.count_nonzero(finite))
                kind = "NaN" if kind == "NaN" or bool(np.isnan(values).any()) else "Inf"
    return stored, bad, kind
