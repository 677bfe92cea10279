"""``same-register-batch``: register every pair of a CSV file, on this machine or a Dask cluster.

Each pair's output set goes to ``OUTROOT/<id>/`` (the files of ``same-register``), and the results
table ``OUTROOT/results.csv`` / ``results.json`` grows as pairs finish. A rerun skips the pairs
whose complete output set exists (``--force`` registers them again). Exit code 0 when every pair is
registered or skipped, 1 when some failed, 2 for bad input, 130 after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from distributed import Client, Event, Future, KilledWorker, wait
from tqdm import tqdm

from ..cli import add_registration_options, registration_request
from ..errors import InputError
from ..io import check_output_directory, read_header
from ..outputs import read_complete_output
from ..registration import RegistrationRequest, check_request, estimated_memory
from ..signals import StopSignalReceived, terminate_like_ctrl_c
from .cluster import RESOURCE, connect, dashboard_link, plan_local_cluster, registration_slots, start_local_cluster
from .pairs import Pair, read_pairs
from .results import FAILED, OK, SKIPPED, PairResult, ResultsTable, result_from_summary
from .task import register_pair, staging_folders

PROG = "same-register-batch"
EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130
_TOP_UP_INTERVAL_S = 1.0
"""How often the batch looks for finished pairs and free worker slots."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Register every pair of PAIRS (a CSV file with columns fixed, moving and optionally "
                    "moving_labels, fixed_labels, fixed_mask, moving_mask, id; paths relative to the CSV file) on a Dask "
                    "cluster: a local one by default. Each pair's outputs go to OUTROOT/<id>/, the results "
                    "table to OUTROOT/results.csv and results.json. A rerun skips finished pairs.")
    parser.add_argument("pairs", metavar="PAIRS", help="CSV file of the pairs")
    parser.add_argument("-o", "--output", required=True, metavar="OUTROOT", help="output folder (created if needed)")
    add_registration_options(parser)
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run on the existing Dask cluster of this scheduler (e.g. tcp://host:8786); its "
                             f"workers must offer the resource {RESOURCE}=1 (default: a local cluster)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="local cluster: worker processes, each registering one pair at a time "
                             "(default: as many as the cores and memory allow)")
    parser.add_argument("--threads-per-worker", type=int, metavar="N",
                        help="threads of each registration (default: local cluster, the cores shared among the "
                             "workers; --scheduler, each worker's thread count)")
    parser.add_argument("--force", action="store_true", help="register pairs again whose output set exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


@dataclass(frozen=True)
class Job:
    """A pair to register now, and its request (``output_dir`` is ``OUTROOT/<id>``)."""

    pair: Pair
    request: RegistrationRequest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = read_pairs(args.pairs)
        _check_options(args, pairs[0])
        outroot = check_output_directory(args.output)
        table = ResultsTable(outroot, [pair.id for pair in pairs])
        jobs = _jobs(args, pairs, outroot, table)
        table.write()   # the header (and the rows of skipped pairs) from the start
        if not jobs:
            return _report(table, outroot)
        cluster, client = _cluster(args, jobs)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: cancelled before any pair was registered", file=sys.stderr)
        return EXIT_CANCELLED
    interrupted = threading.Event()
    try:
        with terminate_like_ctrl_c(interrupted):
            _run(client, jobs, table, outroot, args.force, args.quiet, interrupted)
    except KeyboardInterrupt:
        logging.getLogger("distributed").setLevel(logging.CRITICAL)   # the workers' ends are expected now
        _close(client, cluster)
        for job in jobs:
            for folder in staging_folders(outroot, job.pair.id):
                shutil.rmtree(folder, ignore_errors=True)
        print(f"{PROG}: cancelled: {len(table.rows)} of {len(pairs)} pairs are in {outroot / 'results.csv'}; "
              "run the same command again to go on", file=sys.stderr)
        return EXIT_CANCELLED
    _close(client, cluster)
    return _report(table, outroot)


def _check_options(args: argparse.Namespace, pair: Pair) -> None:
    """Raises InputError for a bad option, before anything is written."""
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be at least 1")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise InputError(f"--threads-per-worker {args.threads_per_worker}: must be at least 1")
    if args.scheduler is not None and args.workers is not None:
        raise InputError(f"--workers {args.workers}: sizes the local cluster only: with --scheduler, start "
                         "as many workers on the cluster as you want")
    check_request(registration_request(args, pair.fixed, pair.moving, args.output, args.threads_per_worker))


def _jobs(args: argparse.Namespace, pairs: list[Pair], outroot: Path, table: ResultsTable) -> list[Job]:
    """The pairs to register now; the others get their row in ``table`` (a complete output set is
    skipped, a folder without one fails unless ``--force``). Removes stale staging folders."""
    jobs = []
    for pair in pairs:
        folder = outroot / pair.id
        summary = read_complete_output(folder) if folder.exists() else None
        if folder.exists() and not args.force:
            if summary is not None:
                table.add(result_from_summary(pair.id, SKIPPED, summary))
            else:
                table.add(PairResult(pair.id, FAILED, message=f"output folder {folder}: exists without a complete "
                                                              "output set: move it away, or use --force to replace it"))
            continue
        for stale in staging_folders(outroot, pair.id):
            shutil.rmtree(stale, ignore_errors=True)
        request = registration_request(args, pair.fixed, pair.moving, folder, args.threads_per_worker,
                                       moving_labels=pair.moving_labels, fixed_labels=pair.fixed_labels,
                                       fixed_mask=pair.fixed_mask, moving_mask=pair.moving_mask)
        jobs.append(Job(pair, request))
    return jobs


def _cluster(args: argparse.Namespace, jobs: list[Job]):
    """``(cluster, client)``: the local cluster (None with ``--scheduler``) and a client of it."""
    if args.scheduler is not None:
        client = connect(args.scheduler)
        workers = len(client.scheduler_info()["workers"])
        _announce(f"Dask scheduler {args.scheduler}: {workers} workers", client, args.quiet, local=False)
        return None, client
    plan = plan_local_cluster(max(_pair_bytes(job.pair, args.spacing) for job in jobs), len(jobs),
                              args.workers, args.threads_per_worker)
    cluster, client = start_local_cluster(plan)
    _announce(f"Local Dask cluster: {plan.workers} workers x {plan.threads_per_worker} threads, "
              f"{plan.memory_per_worker / 2**30:.1f} GiB each", client, args.quiet, local=True)
    return cluster, client


def _pair_bytes(pair: Pair, spacing: float) -> int:
    """The memory pre-check's estimate for ``pair`` (0 when an image cannot be read: that pair fails
    in its worker with the reason)."""
    try:
        fixed, moving = read_header(pair.fixed, "fixed image").grid, read_header(pair.moving, "moving image").grid
    except InputError:
        return 0
    return sum(estimated_memory(fixed, moving, spacing))


def _announce(line: str, client, quiet: bool, local: bool) -> None:
    if quiet:
        return
    link = dashboard_link(client, local)
    print(line + (f"; dashboard {link}" if link else ""), file=sys.stderr)


def _run(client: Client, jobs: list[Job], table: ResultsTable, outroot: Path, force: bool, quiet: bool,
         interrupted: threading.Event) -> None:
    """Registers every job and records each row as it finishes.

    At most as many pairs are handed to the scheduler as its workers offer :data:`RESOURCE` slots
    (re-counted every second, at least one): Dask assigns a task to a worker before the worker has
    a free slot, and a worker that dies takes every task assigned to it, so this keeps a crash to
    the one pair it was registering. On Ctrl-C (KeyboardInterrupt) the running pairs are told to
    stop and the rest are cancelled before it propagates; ``interrupted`` (set by the signal handler)
    raises it here too when Python dropped the interrupt in a finaliser.
    """
    cancel_name = f"same-register-batch-cancel-{uuid.uuid4().hex}"
    cancel = Event(cancel_name, client=client)
    waiting = list(jobs)
    running: dict[Future, Job] = {}
    bar = tqdm(total=len(jobs), desc="pairs", unit="pair", file=sys.stderr, disable=quiet)
    try:
        while waiting or running:
            if interrupted.is_set():
                raise StopSignalReceived("interrupted")
            for job in waiting[:max(1, registration_slots(client)) - len(running)]:
                future = client.submit(register_pair, job.request, job.pair.id, force, cancel_name, pure=False,
                                       key=f"register-{job.pair.id}-{uuid.uuid4().hex[:8]}", resources={RESOURCE: 1})
                running[future] = job
                waiting.remove(job)
            try:
                finished, _ = wait(list(running), timeout=_TOP_UP_INTERVAL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            for future in finished:
                table.add(_result(future, running.pop(future), outroot))
                bar.set_postfix_str(f"{table.count(OK)} ok, {table.count(FAILED)} failed", refresh=False)
                bar.update(1)
    except KeyboardInterrupt:
        cancel.set()
        client.cancel(list(running))
        raise
    finally:
        bar.close()


def _result(future: Future, job: Job, outroot: Path) -> PairResult:
    """The row of a finished task (a lost worker or a task that could not run is a failed row)."""
    try:
        return future.result()
    except KilledWorker as error:
        for folder in staging_folders(outroot, job.pair.id):
            shutil.rmtree(folder, ignore_errors=True)
        lost = getattr(getattr(error, "last_worker", None), "address", "")
        return PairResult(job.pair.id, FAILED, worker=lost or "",
                          message="the worker registering this pair died (a crash, or it exceeded its memory "
                                  "limit): see the worker's log")
    except Exception as error:  # noqa: BLE001 - e.g. the worker cannot import the library
        return PairResult(job.pair.id, FAILED, message=" ".join(f"{type(error).__name__}: {error}".split()))


def _close(client, cluster) -> None:
    client.close()
    if cluster is not None:
        cluster.close()


def _report(table: ResultsTable, outroot: Path) -> int:
    summary = table.summary()
    print(f"Pairs: {summary['pairs']}, {summary[OK]} registered, {summary[SKIPPED]} skipped (already done), "
          f"{summary[FAILED]} failed.")
    for row in table.ordered():
        if row.status == FAILED:
            print(f"  failed {row.id}: {row.message}")
    if "dice" in summary:
        dice = summary["dice"]
        print(f"Mean Dice over {dice['pairs']} pairs: {dice['mean']:.3f} (sd {dice['sd']:.3f}, min {dice['min']:.3f})")
    print(f"Results in {outroot / 'results.csv'}")
    return EXIT_SOME_FAILED if summary[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
