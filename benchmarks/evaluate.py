"""Evaluation harness: our registration modes and established tools on the same pairs, in one run.

For every pair of a pair list (``benchmarks/pairs/*.json``, format in
``benchmarks/evaluation/pairs.py``) and every method, runs the method in its own worker process
pinned to ``--threads`` threads, samples its result as a displacement field on the fixed grid, and
scores it with the same code: Dice and HD95 per label (moving labels warped by nearest neighbour),
target registration error where a known deformation or landmarks exist, % J <= 0 and std(log J)
inside the fixed body mask, time and peak memory. Writes results.csv, per_label.csv, results.md,
dice_boxplot.png and time_vs_dice.png into ``--output``/<pair-list name>/, and each finished row
into its ``rows/`` folder (``--resume`` reuses them: an interrupted run goes on where it stopped).

Methods (``--methods all`` or a comma-separated list): ``identity`` (no registration); our modes
``intensity``, ``affine``, ``coarse``, ``same``, ``tvf``, ``tvf-lddmm`` (a mode not available in this
version is a row saying so); peers ``elastix``, ``ants``, ``niftyreg``, ``greedy``, ``convexadam``
(install: benchmarks/requirements-peers.txt; a peer that is not installed or fails is a row saying
so); ``ours`` and ``peers`` select the groups; ``module:function`` plugs in any other adapter.

Every image is first resampled to isotropic ``--spacing`` mm (and our modes work at that spacing),
the same for all methods. Derived lung / bone / body labels of the chest CTs: see
``ct_threshold_labels`` in benchmarks/evaluation/pairs.py.

Usage (the README's results: both pair lists, every method, 1 thread, 4 mm; ``--resume`` reuses
finished rows, ``--readme`` rewrites the README's results block):
    python benchmarks/evaluate.py --pairs benchmarks/pairs/sample.json benchmarks/pairs/shared_ct.json \\
        --methods all --threads 1 --spacing 4 --output benchmarks/results --resume --readme README.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import signal
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evaluation.harness import run_benchmark  # noqa: E402  (after making the repository importable)
from benchmarks.evaluation.method import Method  # noqa: E402
from benchmarks.evaluation.pairs import load_pair_list  # noqa: E402
from benchmarks.evaluation.registry import known_methods, resolve_method  # noqa: E402
from benchmarks.evaluation.report import update_readme, write_report  # noqa: E402

GROUPS = {"ours": "ours", "peers": "peer"}


def select_methods(selection: str) -> list[Method]:
    """``all``, ``ours``, ``peers`` or method names / ``module:function`` plug-ins, comma-separated."""
    known = known_methods()
    chosen: list[Method] = []
    for item in (part.strip() for part in selection.split(",") if part.strip()):
        if item == "all":
            chosen += known.values()
        elif item in GROUPS:
            chosen += [method for method in known.values() if method.kind == GROUPS[item]]
        else:
            chosen.append(resolve_method(item))
    return list({method.name: method for method in chosen}.values())


def machine() -> str:
    """One line: CPU, cores, memory, GPU."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{gpu}, load average {os.getloadavg()[0]:.1f} at start")


def evaluate_pair_list(pairs: Path, methods: list[Method], args: argparse.Namespace, command: str) -> list[Path]:
    """Runs one pair list and writes its report into ``args.output / pairs.stem``."""
    description, specs = load_pair_list(pairs)
    started = datetime.datetime.now()
    setting = [f"pairs: `{pairs}` ({description})" if description else f"pairs: `{pairs}`",
               f"date: {started:%Y-%m-%d}; machine: {machine()}",
               f"threads: {args.threads} for every method; working spacing {args.spacing:g} mm; CPU",
               f"command: `{command}`"]
    fields = args.save_fields / pairs.stem if args.save_fields else None
    rows = run_benchmark(specs, methods, args.threads, args.spacing, args.timeout, fields,
                         records=args.output / pairs.stem / "rows", resume=args.resume, run_missing=not args.saved_only)
    reused = sum(row.reused for row in rows)
    setting.append(f"wall time of this run: {(datetime.datetime.now() - started).total_seconds() / 60:.0f} min"
                   + (f"; {reused} of {len(rows)} rows reused from an earlier run (--resume)" if reused else ""))
    return write_report(rows, args.output / pairs.stem, f"Evaluation against established tools: {pairs.stem}", setting)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, nargs="+", required=True, help="pair-list JSON files")
    parser.add_argument("--methods", default="all", help="all, ours, peers, or comma-separated names")
    parser.add_argument("--threads", type=int, default=2, help="threads of every method (default 2)")
    parser.add_argument("--spacing", type=float, default=4.0, help="isotropic working voxel size in mm (default 4)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method and pair (default 1800)")
    parser.add_argument("--output", type=Path, required=True,
                        help="results folder: each pair list's results go into OUTPUT/<pair-list name>/")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rows an earlier run left in OUTPUT/<pair-list name>/rows/ (same threads); "
                             "delete a method's files there to run it again")
    parser.add_argument("--saved-only", action="store_true",
                        help="with --resume: run nothing, only rewrite the tables from the saved rows (a pair and "
                             "method without a saved row is reported as not run yet)")
    parser.add_argument("--readme", type=Path, metavar="FILE",
                        help="also rewrite the evaluation block of FILE (e.g. README.md) with the summary tables")
    parser.add_argument("--save-fields", type=Path, metavar="DIR",
                        help="also write every result as an ITK displacement-field transform (.h5) into DIR")
    args = parser.parse_args(argv)
    if args.saved_only and not args.resume:
        parser.error("--saved-only needs --resume (it reuses the saved rows)")
    # On SIGTERM unwind like on Ctrl-C: the running worker is killed and the scratch folder removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    methods = select_methods(args.methods)
    command = "python benchmarks/evaluate.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    reports = []
    for pairs in args.pairs:
        for path in evaluate_pair_list(pairs, methods, args, command):
            print(path)
            reports += [path] if path.name == "results.md" else []
    if args.readme:
        update_readme(args.readme, reports)
        print(args.readme)


if __name__ == "__main__":
    main()
