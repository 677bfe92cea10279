"""Writes the results: ``results.csv``, ``per_label.csv``, ``results.md`` and two plots.

* ``results.csv``: one row per pair and method (columns :data:`CSV_COLUMNS`; empty cells where a
  metric does not apply or the method did not run).
* ``per_label.csv``: Dice and HD95 per label, pair and method.
* ``results.md``: the run's setting, a summary table per pair group (means over the group's pairs
  where the method ran; peak memory: the largest), the full table, the pairs, the methods'
  configurations and the metrics' definitions.
* ``dice_boxplot.png``: per-label Dice, one panel per pair group, one box per method.
* ``time_vs_dice.png``: registration time against mean Dice, one point per pair and method.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

from .harness import Row  # noqa: E402
from .method import OK, Method  # noqa: E402

CSV_COLUMNS = ("pair", "group", "method", "label", "kind", "status", "threads", "labels", "mean_dice",
               "mean_hd95_mm", "tre_median_mm", "tre_p90_mm", "tre_points", "percent_nonpositive_jacobian",
               "std_log_jacobian", "seconds", "cpu_seconds", "peak_mib", "baseline_mib")
PER_LABEL_COLUMNS = ("pair", "method", "label", "name", "dice", "hd95_mm")
TABLE_COLUMNS = (("mean Dice", "mean_dice", 3), ("HD95 (mm)", "mean_hd95_mm", 1),
                 ("TRE median (mm)", "tre_median_mm", 2), ("TRE p90 (mm)", "tre_p90_mm", 2),
                 ("% J<=0", "percent_nonpositive_jacobian", 3), ("std(log J)", "std_log_jacobian", 3),
                 ("time (s)", "seconds", 1), ("CPU time (s)", "cpu_seconds", 1), ("peak memory (MiB)", "peak_mib", 0))
"""(heading, key, decimals) of the metric columns of the markdown tables."""

METRIC_NOTES = """\
Metrics, computed by the same code for every method from its displacement field on the prepared
fixed grid (LPS mm, fixed point x -> moving point x + u(x)):
mean Dice over the labels present in both label maps (moving labels warped by nearest neighbour; a
lost label scores 0); HD95 = the larger of the two directed 95th-percentile surface distances,
averaged over labels present after warping; TRE = |error| at the ground-truth points (known
deformation: |psi(phi(x)) - x| at body points; landmarks: |phi(f) - m|), median and 90th percentile;
% J<=0 and std(log J) (over J > 0; plain log, not Learn2Reg's log(J+3)) of det(d phi/dx) inside the
fixed body mask; time = wall time of the method call in its worker process (start-up, imports and
reading the inputs excluded); CPU time = user + system time of all its threads and executables over
the same span (on a shared machine wall time grows with the other jobs' load, CPU time hardly);
peak memory = peak resident memory of the worker during the call (Python and PyTorch included, see
`baseline_mib` in results.csv) plus the largest executable it ran.
Summary tables: means over the group's pairs where the method ran (peak memory: the largest)."""


def write_report(rows: Sequence[Row], folder: Path, title: str, setting: Sequence[str]) -> list[Path]:
    """Writes every output file into ``folder`` (created if needed); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_write_csv(rows, folder / "results.csv"), _write_per_label(rows, folder / "per_label.csv"),
             _write_markdown(rows, folder / "results.md", title, setting)]
    return paths + _plots(rows, folder)


def summary_table(rows: Sequence[Row], group: str) -> str:
    """Markdown table: one line per method, means over the pairs of ``group`` where it ran."""
    lines = ["| method | pairs run | " + " | ".join(heading for heading, _, _ in TABLE_COLUMNS) + " |",
             "|---|---|" + "---:|" * len(TABLE_COLUMNS)]
    members = [row for row in rows if row.group == group]
    for method in _methods(members):
        mine = [row for row in members if row.method.name == method.name]
        done = [row for row in mine if row.status == OK]
        if not done:
            lines.append(f"| {method.label} | {_short(mine[0].status)} |" + " |" * len(TABLE_COLUMNS))
            continue
        cells = []
        for _, key, decimals in TABLE_COLUMNS:
            values = [value for value in (_value(row, key) for row in done) if not math.isnan(value)]
            combined = (max(values) if key == "peak_mib" else sum(values) / len(values)) if values else math.nan
            cells.append(_format(combined, decimals))
        lines.append(f"| {method.label} | {len(done)} of {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(rows: Sequence[Row]) -> str:
    """Markdown table: one line per pair and method."""
    lines = ["| pair | method | status | labels | " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|---|---|---|---:|" + "---:|" * len(TABLE_COLUMNS)]
    for row in rows:
        labels = _format(_value(row, "labels"), 0)
        cells = " | ".join(_format(_value(row, key), decimals) for _, key, decimals in TABLE_COLUMNS)
        lines.append(f"| {row.pair} | {row.method.label} | {_short(row.status)} | {labels} | {cells} |")
    return "\n".join(lines)


def tool_versions(methods: Sequence[Method]) -> str:
    """``distribution version`` of PyTorch, SimpleITK and every peer (or "not installed")."""
    names = ["torch", "SimpleITK", *[name for method in methods for name in method.distributions]]
    return ", ".join(f"{name} {_version(name)}" for name in dict.fromkeys(names))


def _write_csv(rows: Sequence[Row], path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            record = {"pair": row.pair, "group": row.group, "method": row.method.name, "label": row.method.label,
                      "kind": row.method.kind, "status": row.status, "threads": row.threads,
                      "seconds": row.seconds, "cpu_seconds": row.cpu_seconds, "peak_mib": row.peak_mib,
                      "baseline_mib": row.baseline_mib,
                      **row.metrics}
            writer.writerow({key: _csv_value(value) for key, value in record.items()})
    return path


def _write_per_label(rows: Sequence[Row], path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, PER_LABEL_COLUMNS)
        writer.writeheader()
        for row in rows:
            for entry in row.per_label:
                record = {"pair": row.pair, "method": row.method.name, **entry}
                writer.writerow({key: _csv_value(value) for key, value in record.items()})
    return path


def _write_markdown(rows: Sequence[Row], path: Path, title: str, setting: Sequence[str]) -> Path:
    methods = _methods(rows)
    parts = [f"# {title}", "", *[f"- {line}" for line in setting], f"- versions: {tool_versions(methods)}", ""]
    for group in dict.fromkeys(row.group for row in rows):
        parts += [f"## Summary: {group}", "", summary_table(rows, group), ""]
    parts += ["## Every pair and method", "", full_table(rows), "", "## Pairs", ""]
    parts += [f"- {name}: {description}" for name, description in {row.pair: row.description for row in rows}.items()]
    warned = [row for row in rows if row.warnings]
    if warned:
        parts += ["", "## What the methods warned about", ""]
        parts += [f"- {row.pair} / {row.method.name}: " + "; ".join(row.warnings) for row in warned]
    parts += ["", "## Methods", ""]
    parts += [f"- `{method.name}` ({method.label}): {method.configuration}" for method in methods]
    parts += ["", "## Metrics", "", METRIC_NOTES, ""]
    path.write_text("\n".join(parts))
    return path


README_START = "<!-- evaluation results: written by benchmarks/evaluate.py --readme; do not edit by hand -->"
README_END = "<!-- end of evaluation results -->"


def update_readme(readme: Path, reports: Sequence[Path]) -> None:
    """Replaces the block between :data:`README_START` and :data:`README_END` in ``readme`` by the
    setting and summary tables of each ``results.md`` in ``reports`` (headings moved down two levels,
    a link to the full report and its plots).

    Raises:
        ValueError: ``readme`` lacks the two marker lines.
    """
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: add the lines {README_START!r} and {README_END!r} where the results go")
    block = [README_START, ""]
    for report in reports:
        summary = report.read_text().split("\n## Every pair and method")[0].strip().splitlines()
        folder = Path(os.path.relpath(report.parent.resolve(), readme.parent.resolve())).as_posix()
        block += [("##" + line) if line.startswith("#") else line for line in summary]
        block += ["", f"Every pair and method, the methods' configurations and the metrics: "
                      f"[`{folder}/results.md`]({folder}/results.md); plots: `{folder}/dice_boxplot.png`, "
                      f"`{folder}/time_vs_dice.png`; CSV: `{folder}/results.csv`, `{folder}/per_label.csv`.", ""]
    start, end = text.index(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n".join(block) + "\n" + text[end:])


def _plots(rows: Sequence[Row], folder: Path) -> list[Path]:
    """The Dice box plots and the time-vs-Dice scatter, over the pair groups that have labels.

    Box plots: one panel per group, one box per method of the Dice of every label of every pair the
    method ran on; the tick label says on how many of the group's labelled pairs it ran. Scatter:
    one colour per method, one marker per group.
    """
    pairs = {row.pair for row in rows if row.metrics.get("labels")}
    labelled = [row for row in rows if row.pair in pairs]
    groups = list(dict.fromkeys(row.group for row in labelled))
    if not groups:
        return []
    methods = _methods(rows)
    # tab20's dark shades first (ten distinct hues), then its light ones.
    colours = {method.name: plt.get_cmap("tab20")((2 * index) % 20 + (2 * index // 20) % 2)
               for index, method in enumerate(methods)}
    figure, panels = plt.subplots(len(groups), 1, figsize=(max(6.0, 0.9 * len(methods) + 2), 3.6 * len(groups)),
                                  squeeze=False)
    for panel, group in zip(panels[:, 0], groups):
        ticks, boxes = [], []
        for method in methods:
            mine = [row for row in labelled if row.group == group and row.method.name == method.name]
            done = [row for row in mine if row.status == OK]
            ticks.append(f"{method.name}\n{len(done)}/{len(mine)} pairs")
            boxes.append([entry["dice"] for row in done for entry in row.per_label])
        panel.boxplot(boxes, tick_labels=ticks)
        panel.set_title(group, fontsize=10)
        panel.set_ylabel("Dice per label")
        panel.set_ylim(0, 1)
        panel.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    box_path = folder / "dice_boxplot.png"
    figure.savefig(box_path, dpi=100)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(8, 5))
    shown: set[str] = set()
    for group, marker in zip(groups, "os^vDP*X"):
        for method in methods:
            done = [row for row in labelled if row.group == group and row.method.name == method.name
                    and row.status == OK]
            label = method.name if done and method.name not in shown else None
            shown.update([method.name] if done else [])
            axes.scatter([max(row.seconds, 1e-2) for row in done], [row.metrics["mean_dice"] for row in done],
                         color=colours[method.name], marker=marker, label=label)
    for group, marker in zip(groups, "os^vDP*X"):
        axes.scatter([], [], facecolors="none", edgecolors="black", marker=marker, label=f"pairs: {group}")
    axes.set_xscale("log")
    axes.set_xlabel("registration wall time (s)")
    axes.set_ylabel("mean Dice")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    scatter_path = folder / "time_vs_dice.png"
    figure.savefig(scatter_path, dpi=100)
    plt.close(figure)
    return [box_path, scatter_path]


def _methods(rows: Sequence[Row]) -> list[Method]:
    """The distinct methods of ``rows`` in first-seen order."""
    return list({row.method.name: row.method for row in rows}.values())


def _value(row: Row, key: str) -> float:
    measured = {"seconds": row.seconds, "cpu_seconds": row.cpu_seconds, "peak_mib": row.peak_mib}
    value = measured.get(key, row.metrics.get(key))
    return math.nan if value is None else float(value)


def _format(value: float, decimals: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{decimals}f}"


def _short(status: str, characters: int = 110) -> str:
    """A status for a table cell: cut (results.csv keeps it whole), without table-breaking bars."""
    status = status.replace("|", "/")
    return status if len(status) <= characters else status[:characters - 3] + "..."


def _csv_value(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(value, 6) if isinstance(value, float) else value


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"
