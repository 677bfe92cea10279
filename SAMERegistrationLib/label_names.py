"""The names of label values: a JSON file beside the label maps (no torch: the Slicer module's own
process writes it beside the segments it hands to the worker)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError

LABEL_NAMES_FILE = "label_names.json"
"""Names of the labels of the label maps in a folder: a JSON object {"1": "spleen", ...}."""


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
