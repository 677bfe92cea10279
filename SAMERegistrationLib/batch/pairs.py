"""The pairs of a cohort, read from a CSV file.

Columns: ``fixed`` and ``moving`` (required), ``moving_labels``, ``fixed_labels``, ``fixed_mask``,
``moving_mask`` and ``id`` (optional; an empty cell means none). Relative paths are relative to the CSV file's folder.
Without an ``id``, a pair is named after its moving image (``scan07.nii.gz`` -> ``scan07``), or after
both images (``atlas__scan07``) when moving images repeat, as when one atlas is registered to many
fixed scans.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError

REQUIRED_COLUMNS = ("fixed", "moving")
FILE_COLUMNS = ("fixed", "moving", "moving_labels", "fixed_labels", "fixed_mask", "moving_mask")
COLUMNS = (*FILE_COLUMNS, "id")
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
"""A pair id is a plain folder name: letters, digits, ``.``, ``_`` and ``-``, not starting with ``.``."""
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Pair:
    """One row of the CSV: its id and absolute file paths (optional ones None).

    Attributes:
        line: the row's line number in the CSV file (for messages).
    """

    id: str
    fixed: Path
    moving: Path
    moving_labels: Path | None = None
    fixed_labels: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    line: int = 0


def read_pairs(csv_path: str | Path) -> list[Pair]:
    """The pairs of ``csv_path`` in file order (blank rows skipped).

    Raises:
        InputError: the file is missing or unreadable, a required column or cell is missing, a column
            is unknown, an id is not a plain folder name, or two pairs have the same id.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream, skipinitialspace=True)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"PAIRS {csv_path}: cannot be read as a CSV file ({error}): give a CSV file with "
                         "columns fixed,moving") from error
    _check_header(csv_path, header)
    pairs = [_pair(csv_path, line, row) for line, row in rows if any((value or "").strip() for value in row.values())]
    if not pairs:
        raise InputError(f"PAIRS {csv_path}: holds no pairs: add one row per pair below the header fixed,moving")
    return _with_ids(csv_path, pairs)


def _check_header(csv_path: Path, header: list[str]) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise InputError(f"PAIRS {csv_path}: no column {', '.join(missing)}: the first line must name the columns, "
                         f"e.g. fixed,moving (optional: {', '.join(COLUMNS[2:])})")
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise InputError(f"PAIRS {csv_path}: unknown column {', '.join(unknown)}: use {', '.join(COLUMNS)}")
    duplicated = [name for name, count in Counter(header).items() if count > 1]
    if duplicated:
        raise InputError(f"PAIRS {csv_path}: column {', '.join(duplicated)} appears twice: keep one")


def _pair(csv_path: Path, line: int, row: dict) -> Pair:
    cells = {name: (row.get(name) or "").strip() for name in COLUMNS}
    for name in REQUIRED_COLUMNS:
        if not cells[name]:
            raise InputError(f"PAIRS {csv_path}: line {line}: the {name} cell is empty: give the {name} image's path")
    files = {name: (csv_path.parent / cells[name]).absolute() if cells[name] else None for name in FILE_COLUMNS}
    if cells["id"] and not _ID.fullmatch(cells["id"]):
        raise InputError(f"PAIRS {csv_path}: line {line}: id {cells['id']!r} is not a plain folder name: use "
                         "letters, digits, '.', '_' and '-' (not starting with '.')")
    return Pair(id=cells["id"], line=line, **files)


def _with_ids(csv_path: Path, pairs: list[Pair]) -> list[Pair]:
    """Fills in the missing ids (see the module docstring) and checks that ids are unique."""
    moving_counts = Counter(_stem(pair.moving) for pair in pairs)

    def default_id(pair: Pair) -> str:
        moving = _stem(pair.moving)
        return moving if moving_counts[moving] == 1 else f"{_stem(pair.fixed)}__{moving}"

    named = [pair if pair.id else replace(pair, id=default_id(pair)) for pair in pairs]
    lines: dict[str, list[int]] = {}
    for pair in named:
        lines.setdefault(pair.id, []).append(pair.line)
    repeated = {pair_id: found for pair_id, found in lines.items() if len(found) > 1}
    if repeated:
        pair_id, found = next(iter(repeated.items()))
        raise InputError(f"PAIRS {csv_path}: lines {', '.join(map(str, found))} have the same id {pair_id!r}: "
                         "give every pair its own id (column id)")
    return named


def _stem(path: Path) -> str:
    """A file or folder name without its image suffix, as a plain folder name."""
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")
    return name or "pair"
