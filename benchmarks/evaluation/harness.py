"""Runs every method on every pair and collects one row of metrics per pair and method."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from SAMERegistrationLib.export import write_displacement_field
from SAMERegistrationLib.io import write_image

from .method import NOT_AVAILABLE, NOT_INSTALLED, OK, Method
from .metrics import evaluate
from .pairs import PairSpec, PreparedPair, prepare_pair
from .worker import run_in_worker


@dataclass
class Row:
    """One method on one pair.

    Attributes:
        pair, group, description: the pair's name, group (e.g. "inter-patient", "synthetic") and
            what its images are.
        method: the method (name, label, configuration).
        status: "ok", "not available in this version", "not installed: ..." or "failed: ...".
        threads: the thread count the method was pinned to.
        seconds, cpu_seconds, peak_mib, baseline_mib: see :class:`WorkerResult` (None unless ok).
        metrics: :attr:`Evaluation.summary` (empty unless ok).
        per_label: :attr:`Evaluation.per_label` (empty unless ok).
        reused: the row was read from an earlier run's record (``--resume``), not run now.
        warnings: what the method warned about while it ran (e.g. a SAM stage that fell back).
    """

    pair: str
    group: str
    description: str
    method: Method
    status: str
    threads: int
    seconds: float | None = None
    cpu_seconds: float | None = None
    peak_mib: float | None = None
    baseline_mib: float | None = None
    metrics: dict[str, float | int] = field(default_factory=dict)
    per_label: list[dict] = field(default_factory=list)
    reused: bool = False
    warnings: list[str] = field(default_factory=list)


NOT_RUN = "not run yet (no saved row)"
"""Status of a pair and method that a run with ``run_missing=False`` had no saved row for."""


def method_status(method: Method) -> str | None:
    """Why ``method`` cannot run here ("not available in this version", "not installed: ..."), or None."""
    if method.run is None:
        return NOT_AVAILABLE
    for module in method.modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            hint = f" (pip install {' '.join(method.distributions)})" if method.distributions else ""
            return f"{NOT_INSTALLED}: no module {module}{hint}"
    return None


def save_row(row: Row, path: Path) -> None:
    """Writes ``row`` as JSON (the method by name) so that a later run can reuse it."""
    record = dataclasses.asdict(row) | {"method": row.method.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=lambda value: value.item()))  # numpy scalars


def load_row(path: Path, method: Method) -> Row:
    """The row saved by :func:`save_row` at ``path``, for ``method``."""
    record = json.loads(path.read_text())
    record["method"] = method
    record["per_label"] = [{**entry, "label": int(entry["label"])} for entry in record["per_label"]]
    record["reused"] = True
    return Row(**record)


def run_benchmark(specs: list[PairSpec], methods: list[Method], threads: int, spacing: float,
                  timeout_s: float, fields: Path | None = None, records: Path | None = None,
                  resume: bool = False, run_missing: bool = True,
                  log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> list[Row]:
    """Prepares every pair (so a missing file stops the run before any registration), then runs each
    method on each pair in a worker and evaluates its displacement field.

    Args:
        specs, methods: what to run.
        threads, spacing, timeout_s: see :func:`run_in_worker`.
        fields: if given, a folder that receives every result as an ITK displacement-field transform
            ``PAIR__METHOD.h5`` on the prepared fixed grid.
        records: if given, a folder that receives every row as ``PAIR__METHOD.json`` once it is done.
        resume: reuse the rows already in ``records`` that ran with the same threads (an interrupted
            run goes on where it stopped; delete a method's records to run it again).
        run_missing: run the pairs and methods without a reusable row (False: report them as
            :data:`NOT_RUN` instead, so the tables can be rewritten from the saved rows alone).
        log: receives one progress line per pair and method.
    """
    start = time.perf_counter()
    pairs = [(spec, prepare_pair(spec, spacing)) for spec in specs]
    log(f"prepared {len(pairs)} pairs at {spacing:g} mm in {time.perf_counter() - start:.0f} s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="same-evaluation-") as scratch:
        for index, (spec, pair) in enumerate(pairs):
            folder = Path(scratch) / f"pair{index}"
            folder.mkdir()
            fixed_path, moving_path = folder / "fixed.nii", folder / "moving.nii"
            write_image(pair.fixed, fixed_path, sitk.sitkFloat32)
            write_image(pair.moving, moving_path, sitk.sitkFloat32)
            for method in methods:
                record = records / f"{_safe(pair.name)}__{_safe(method.name)}.json" if records else None
                row = load_row(record, method) if resume and record is not None and record.exists() else None
                if (row is None or row.threads != threads) and not run_missing:
                    row = Row(pair.name, spec.group, pair.description, method, NOT_RUN, threads)
                elif row is None or row.threads != threads:
                    row = _run_one(spec, pair, method, fixed_path, moving_path, folder / _safe(method.name),
                                   threads, spacing, timeout_s, fields)
                    if record is not None:
                        save_row(row, record)
                rows.append(row)
                log(f"[{time.perf_counter() - start:6.0f} s] {pair.name} / {method.name}: "
                    f"{'reused' if row.reused else 'ran'}, {row.status}"
                    + (f", {row.seconds:.1f} s" if row.seconds is not None else ""))
    return rows


def _run_one(spec: PairSpec, pair: PreparedPair, method: Method, fixed_path: Path, moving_path: Path,
             workdir: Path, threads: int, spacing: float, timeout_s: float, fields: Path | None) -> Row:
    row = Row(pair.name, spec.group, pair.description, method, method_status(method) or OK, threads)
    if row.status != OK:
        return row
    result = run_in_worker(method.name, fixed_path, moving_path, workdir, threads, spacing, timeout_s)
    row.status = result.status
    if result.status != OK:
        return row
    if fields is not None:
        fields.mkdir(parents=True, exist_ok=True)
        write_displacement_field(result.displacement, pair.fixed.grid,
                                 fields / f"{_safe(pair.name)}__{_safe(method.name)}.h5")
    evaluation = evaluate(pair, result.displacement)
    row.seconds, row.cpu_seconds = result.seconds, result.cpu_seconds
    row.peak_mib, row.baseline_mib = result.peak_mib, result.baseline_mib
    row.metrics, row.per_label = evaluation.summary, evaluation.per_label
    row.warnings = list(result.warnings)
    return row


def _safe(name: str) -> str:
    """A folder name for a method name (plug-in names hold dots and colons)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)
