"""The results table of a cohort: one row per finished pair, rewritten as each pair finishes.

``results.csv`` has the columns of :data:`CSV_COLUMNS`; ``results.json`` holds the same rows (with
Dice per label) and a summary over the cohort. Both files are replaced atomically, so a reader never
sees half a table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK = "ok"
"""Registered by this run."""
SKIPPED = "skipped"
"""A complete output set from an earlier run was kept (its numbers are read from its summary.json)."""
FAILED = "failed"
"""The pair could not be registered; ``message`` says why."""
CSV_FILE = "results.csv"
JSON_FILE = "results.json"
CSV_COLUMNS = ("id", "status", "seconds", "peak_memory_mib", "percent_jacobian_nonpositive", "mean_dice",
               "mean_dice_before", "worker", "message")


@dataclass(frozen=True)
class PairResult:
    """What became of one pair.

    Attributes:
        id: the pair's id (its output folder's name).
        status: :data:`OK`, :data:`SKIPPED` or :data:`FAILED`.
        seconds: wall time of the registration with its inputs and outputs (None when failed).
        peak_memory_mib: peak resident memory of the worker process during the pair, MiB (None when
            failed or skipped).
        percent_jacobian_nonpositive: % of fixed body voxels with J <= 0 (None when failed).
        mean_dice, mean_dice_before: mean Dice over the labels of both maps after and before
            registration (None without both label maps).
        dice_per_label: Dice after registration per label value.
        worker: address of the Dask worker that registered (or lost) the pair ("" when none did).
        message: the error of a failed pair, or the warnings of a registered one ("" when none).
    """

    id: str
    status: str
    seconds: float | None = None
    peak_memory_mib: float | None = None
    percent_jacobian_nonpositive: float | None = None
    mean_dice: float | None = None
    mean_dice_before: float | None = None
    dice_per_label: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    message: str = ""


def result_from_summary(pair_id: str, status: str, summary: dict, seconds: float | None = None,
                        peak_memory_mib: float | None = None, worker: str = "", message: str = "") -> PairResult:
    """The row of a pair from its ``summary.json`` (``seconds`` defaults to its registration time)."""
    dice = summary.get("dice") or {}
    return PairResult(
        id=pair_id, status=status,
        seconds=round(summary["registration_seconds"] if seconds is None else seconds, 3),
        peak_memory_mib=None if peak_memory_mib is None else round(peak_memory_mib, 1),
        percent_jacobian_nonpositive=summary["jacobian"]["percent_nonpositive"],
        mean_dice=_finite(dice.get("mean")), mean_dice_before=_finite(dice.get("mean_before_registration")),
        dice_per_label=dict(dice.get("per_label", {})), worker=worker, message=message)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


class ResultsTable:
    """The rows found so far, kept in the order of the pairs, written to ``folder`` on every change."""

    def __init__(self, folder: Path, pair_ids: list[str]) -> None:
        self.folder = Path(folder)
        self._order = {pair_id: index for index, pair_id in enumerate(pair_ids)}
        self.rows: dict[str, PairResult] = {}

    def add(self, result: PairResult) -> None:
        """Records ``result`` (replacing an earlier row of the same pair) and rewrites both files."""
        self.rows[result.id] = result
        self.write()

    def ordered(self) -> list[PairResult]:
        return sorted(self.rows.values(), key=lambda row: self._order[row.id])

    def count(self, status: str) -> int:
        return sum(row.status == status for row in self.rows.values())

    def summary(self) -> dict:
        """Counts per status, and Dice over the registered pairs that have it (mean, sd, min, and
        the mean per label)."""
        rows = [row for row in self.ordered() if row.status != FAILED]
        dice = [row.mean_dice for row in rows if row.mean_dice is not None]
        per_label: dict[str, list[float]] = {}
        for row in rows:
            for label, value in row.dice_per_label.items():
                per_label.setdefault(label, []).append(value)
        summary: dict = {"pairs": len(self._order), **{status: self.count(status) for status in (OK, SKIPPED, FAILED)}}
        if dice:
            summary["dice"] = {"pairs": len(dice), "mean": round(statistics.fmean(dice), 4),
                               "sd": round(statistics.pstdev(dice), 4), "min": round(min(dice), 4),
                               "mean_per_label": {label: round(statistics.fmean(values), 4)
                                                  for label, values in sorted(per_label.items(), key=_label_order)}}
        return summary

    def write(self) -> None:
        rows = self.ordered()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({name: "" if value is None else value for name, value in asdict(row).items()})
        _replace_text(self.folder / CSV_FILE, text.getvalue())
        _replace_text(self.folder / JSON_FILE, json.dumps({"summary": self.summary(),
                                                           "rows": [asdict(row) for row in rows]}, indent=1) + "\n")


def _label_order(item: tuple[str, list[float]]) -> tuple[int, str]:
    label = item[0]
    return (int(label), label) if label.isdigit() else (1 << 30, label)


def _replace_text(path: Path, text: str) -> None:
    """Writes ``text`` to a new file beside ``path`` (the user's umask applies) and moves it into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
