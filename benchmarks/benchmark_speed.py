"""Speed and peak memory of our modes and peers on one pair, repeated: the median of N runs (not a
test; the output is committed and quoted in the README).

Two measurements per method and run, each in a fresh process:

* **harness** — the evaluation harness's worker (``benchmarks/evaluation``), the same for every
  method: wall time and peak resident memory from the prepared images in memory to the result as a
  displacement field on the fixed grid, with Dice of the pair's labels; the images are first
  resampled to ``--spacing`` for every method alike.
* **end to end** (our modes only) — ``same-register FIXED MOVING --mode M`` on the original files,
  as a user runs it: reading the inputs, the working grids, the stages, and writing every output
  file (overview.png included); wall time, and the peak resident memory of the process polled every
  20 ms.

Run it on a quiet machine (nothing else heavy running): times of methods and runs are only
comparable within one run of this script.

Usage:
    python benchmarks/benchmark_speed.py --pairs benchmarks/pairs/cross_patient.json \\
        --pair 'radiomicsE->radiomicsD' --methods same,tvf,tvf-lddmm,greedy --repeats 3 --threads 2 \\
        --output benchmarks/results/speed/radiomicsE-radiomicsD.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evaluate import select_methods  # noqa: E402
from benchmarks.evaluation.harness import run_benchmark  # noqa: E402
from benchmarks.evaluation.pairs import PairSpec, load_pair_list  # noqa: E402

POLL_SECONDS = 0.02


def end_to_end(spec: PairSpec, mode: str, threads: int, spacing: float) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one ``same-register`` run on the pair's original files."""
    with tempfile.TemporaryDirectory(prefix="same-speed-") as folder:
        command = [sys.executable, "-m", "SAMERegistrationLib.cli", str(spec.fixed), str(spec.moving),
                   "-o", str(Path(folder) / "out"), "--mode", mode, "--threads", str(threads),
                   "--spacing", f"{spacing:g}", "--quiet"]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - start
        errors = process.stderr.read()
        if process.returncode != 0:
            raise RuntimeError(f"same-register --mode {mode} failed ({process.returncode}): {errors[-2000:]}")
    return seconds, peak / 2**20


def median_cell(values: list[float], digits: int = 1) -> str:
    """``median (run1, run2, ...)``."""
    return f"{statistics.median(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, required=True, help="a pair-list JSON file")
    parser.add_argument("--pair", required=True, help="the name of the pair in it")
    parser.add_argument("--methods", default="same,tvf,tvf-lddmm,greedy", help="comma-separated method names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per method and run")
    parser.add_argument("--output", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args(argv)

    _, specs = load_pair_list(args.pairs)
    chosen = [spec for spec in specs if spec.name == args.pair]
    if not chosen:
        parser.error(f"no pair {args.pair!r} in {args.pairs}: choose from {', '.join(s.name for s in specs)}")
    spec = chosen[0]
    methods = select_methods(args.methods)
    load = os.getloadavg()[0]
    started = datetime.datetime.now()
    harness: dict[str, list] = {method.name: [] for method in methods}
    cli: dict[str, list[tuple[float, float]]] = {method.name: [] for method in methods if method.kind == "ours"}
    for repeat in range(args.repeats):
        for row in run_benchmark([spec], methods, args.threads, args.spacing, args.timeout):
            harness[row.method.name].append(row)
        for mode in cli:
            cli[mode].append(end_to_end(spec, mode, args.threads, args.spacing))
            print(f"run {repeat + 1}: same-register --mode {mode}: {cli[mode][-1][0]:.1f} s", file=sys.stderr)

    lines = [f"# Speed and memory: {spec.name}", "",
             f"- date: {started:%Y-%m-%d}; machine: {platform.machine()}, {psutil.cpu_count()} cores, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB; load average {load:.1f} at start",
             f"- {args.threads} threads per method, working spacing {args.spacing:g} mm, {args.repeats} runs each "
             "(median, then every run)",
             f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
             "| method | harness: time (s) | harness: peak memory (MiB) | mean Dice | end to end: time (s) "
             "| end to end: peak memory (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for method in methods:
        rows = harness[method.name]
        ok = [row for row in rows if row.status == "ok"]
        if len(ok) < len(rows):
            lines.append(f"| {method.label} | {rows[0].status if rows else 'not run'} | | | | |")
            continue
        dice = statistics.median(row.metrics.get("mean_dice", float("nan")) for row in ok)
        total = [seconds for seconds, _ in cli.get(method.name, [])]
        peaks = [peak for _, peak in cli.get(method.name, [])]
        lines.append(f"| {method.label} | {median_cell([row.seconds for row in ok])} | "
                     f"{median_cell([row.peak_mib for row in ok], 0)} | {dice:.3f} | "
                     f"{median_cell(total) if total else '-'} | {median_cell(peaks, 0) if peaks else '-'} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
