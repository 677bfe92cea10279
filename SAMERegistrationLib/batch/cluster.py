"""The Dask cluster a batch runs on: a local one sized to this machine, or an existing one.

Each worker offers one unit of the resource :data:`RESOURCE` and every pair asks for one, so a
worker runs one registration at a time (with ``--threads-per-worker`` threads); the batch hands the
scheduler no more pairs than there are units (:func:`registration_slots`), so a worker that dies
takes exactly one pair with it. A local cluster's workers get :func:`worker_environment` (the
thread variables set before the process starts, as the evaluation harness does), a memory limit of
:data:`WORKER_BASELINE_BYTES` plus the largest pair's estimate from the single-run memory pre-check
(:func:`~SAMERegistrationLib.registration.estimated_memory`), and no retries: a pair whose worker
dies is a failed row, not a second crash.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
from dataclasses import dataclass

import dask
import psutil
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import InputError

RESOURCE = "registration"
"""The Dask worker resource a registration holds (start external workers with ``--resources registration=1``)."""
WORKER_BASELINE_BYTES = 3 << 29
"""Memory of a worker process before its registration's own (Python, PyTorch, weights): 1.5 GiB.
A registration of the bundled 8 mm test volumes peaks at about 0.5 GiB in all."""
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
"""Environment variables set to the thread count in every local worker (the evaluation harness's list)."""


@dataclass(frozen=True)
class LocalPlan:
    """The size of a local cluster.

    Attributes:
        workers: worker processes (each runs one registration at a time).
        threads_per_worker: threads of each registration.
        memory_per_worker: each worker's memory limit in bytes (Dask restarts a worker above it).
    """

    workers: int
    threads_per_worker: int
    memory_per_worker: int


def available_cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_local_cluster(pair_bytes: int, pairs: int, workers: int | None = None, threads: int | None = None,
                       cores: int | None = None, available_bytes: int | None = None) -> LocalPlan:
    """Sizes a local cluster for ``pairs`` pairs whose largest needs ``pair_bytes`` of memory.

    Without ``workers``: as many workers as the cores allow at ``threads`` threads each (default 1),
    capped by the memory available and by the number of pairs. Without ``threads``: the cores shared
    among the workers.

    Raises:
        InputError: ``workers`` workers do not fit in the memory available.
    """
    cores = cores or available_cores()
    available_bytes = available_bytes or psutil.virtual_memory().available
    per_worker = WORKER_BASELINE_BYTES + pair_bytes
    fit = max(1, available_bytes // per_worker)
    if workers is not None and workers > fit:
        raise InputError(f"--workers {workers}: each worker needs about {per_worker / 2**30:.1f} GiB of memory for "
                         f"the largest pair but {available_bytes / 2**30:.1f} GiB is available: use --workers {fit} "
                         "or a larger --spacing")
    if workers is None:
        workers = max(1, min(cores // (threads or 1), fit, pairs))
    return LocalPlan(workers, threads or max(1, cores // workers), per_worker)


def worker_environment(threads: int) -> dict[str, str]:
    """Environment of a local worker process: every thread variable at ``threads``, and OpenMP
    threads that sleep when idle (spinning threads slow down the other workers on shared cores)."""
    return {**{name: str(threads) for name in THREAD_VARIABLES},
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def start_local_cluster(plan: LocalPlan):
    """``(cluster, client)``: a :class:`distributed.LocalCluster` of ``plan`` on 127.0.0.1 (dashboard
    on a free port when Bokeh is installed) and a client of it. Its scheduler gives up on a pair the
    first time its worker dies; its workers log errors only and leave Ctrl-C to this process (which
    shuts them down), so that an interrupted batch prints no traceback of theirs."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=plan.workers, threads_per_worker=plan.threads_per_worker,
                               processes=True, memory_limit=plan.memory_per_worker, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", resources={RESOURCE: 1},
                               env=worker_environment(plan.threads_per_worker), silence_logs=logging.ERROR)
    client = Client(cluster)
    client.register_plugin(_IgnoreInterrupt(), name="same-register-batch-ignore-interrupt")
    return cluster, client


class _IgnoreInterrupt(WorkerPlugin):
    """Dask worker plugin: the worker process ignores SIGINT (Ctrl-C in the terminal reaches every
    process of the batch; the batch's own process stops the workers)."""

    def setup(self, worker) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def connect(address: str, timeout_s: float = 30.0):
    """A :class:`distributed.Client` of the scheduler at ``address``.

    Raises:
        InputError: the scheduler cannot be reached, or it has workers and none of them offers
            :data:`RESOURCE`.
    """
    try:
        client = Client(address, timeout=timeout_s)
    except (OSError, TimeoutError, ValueError) as error:
        raise InputError(f"--scheduler {address}: cannot reach a Dask scheduler there ({error}): check the "
                         "address (e.g. tcp://host:8786) and that `dask scheduler` runs") from error
    workers = client.scheduler_info()["workers"].values()
    if workers and not any(worker.get("resources", {}).get(RESOURCE) for worker in workers):
        client.close()
        raise InputError(f"--scheduler {address}: none of its {len(workers)} workers offers the resource "
                         f"{RESOURCE}: start them with `dask worker {address} --nthreads N --resources {RESOURCE}=1`")
    return client


def registration_slots(client: Client) -> int:
    """How many registrations the cluster's workers can run at once (their :data:`RESOURCE` units)."""
    return int(sum(worker.get("resources", {}).get(RESOURCE, 0) for worker in client.scheduler_info()["workers"].values()))


def dashboard_link(client: Client, local: bool) -> str | None:
    """The Dask dashboard's address, or None when there is none: the scheduler serves none, or it is
    a ``local`` cluster's and Bokeh (which draws the dashboard's pages) is not installed."""
    if "dashboard" not in client.scheduler_info().get("services", {}):
        return None
    if local and importlib.util.find_spec("bokeh") is None:
        return None
    return client.dashboard_link
