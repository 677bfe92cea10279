"""One method on one pair in its own process: pinned threads, own peak memory, crashes contained.

The harness calls :func:`run_in_worker`, which starts ``python -m benchmarks.evaluation.worker
REQUEST.json`` with the thread environment variables set (so OpenMP, MKL, ITK and NiftyReg see them
before they start; OpenMP waits passively, see :data:`OMP_WAIT_POLICY`), in a fresh scratch folder
as current directory, in its own process group (a timeout kills the whole group, executables
included). The worker pins PyTorch and SimpleITK to the
same count, imports the tool, reads the prepared images, then measures only the method call:

* time: wall-clock seconds from the images in memory to the result sampled as a displacement field
  on the fixed grid (the tool's own file input/output included; interpreter start-up, imports and
  reading the prepared images excluded), and the CPU time (user + system, all threads and the
  executables the method started) over the same span, which other jobs on a shared machine do not
  inflate;
* memory: the peak resident set size of the worker process during the call (``PeakMemory``: Python,
  PyTorch and the images included, reported separately as the baseline), plus the peak of the
  largest executable the method started (NiftyReg runs executables).

It writes the field (``(3, D, H, W)`` float32 LPS mm, ``.npy``) and a JSON result; an exception
becomes the JSON result's error.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk
import torch

from SAMERegistrationLib.io import read_image
from SAMERegistrationLib.pipeline.memory import PeakMemory

from .method import FAILED, OK, RunContext
from .pairs import REPOSITORY
from .registry import resolve_method

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
"""Environment variables set to the thread count in every worker."""
OMP_WAIT_POLICY = "PASSIVE"
"""Idle OpenMP threads sleep instead of spinning (unless the caller's environment says otherwise). On a
shared machine a spinning thread competes with the other jobs: PyTorch with 2 threads on 2 busy cores
ran the intensity mode 8x slower (256 s instead of 29 s) with the default (active) policy."""

FIELD_FILE = "displacement.npy"
RESULT_FILE = "result.json"
LOG_FILE = "worker.log"
MESSAGE_CHARACTERS = 300
"""Failure messages are cut to this length (the worker log in the scratch folder has everything)."""


@dataclass(frozen=True)
class WorkerResult:
    """What one worker run gave.

    Attributes:
        status: "ok" or "failed: <reason>".
        displacement: ``(3, D, H, W)`` LPS mm on the fixed grid (None unless ok).
        seconds: wall time of the method call (None unless ok).
        cpu_seconds: CPU time of the method call, all threads and child processes (None unless ok).
        peak_mib: peak resident memory during the call, MiB (None unless ok).
        baseline_mib: the worker's resident memory just before the call, MiB (None unless ok).
        warnings: the distinct warnings the method gave (e.g. a SAM stage that fell back), in order.
    """

    status: str
    displacement: torch.Tensor | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None
    peak_mib: float | None = None
    baseline_mib: float | None = None
    warnings: tuple[str, ...] = ()


def run_in_worker(method: str, fixed_path: Path, moving_path: Path, workdir: Path, threads: int, spacing: float,
                  timeout_s: float) -> WorkerResult:
    """Runs ``method`` on the prepared images in a worker process (``workdir`` must be new and empty)."""
    workdir.mkdir(parents=True)
    request = workdir / "request.json"
    request.write_text(json.dumps({"method": method, "fixed": str(fixed_path), "moving": str(moving_path),
                                   "threads": threads, "spacing": spacing}))
    environment = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    environment.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.evaluation.worker", str(request)]
    with open(workdir / LOG_FILE, "w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if process.poll() is None:   # timed out, or the harness itself was interrupted
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if timed_out:
        return WorkerResult(f"{FAILED}: timed out after {timeout_s:.0f} s")
    result_path = workdir / RESULT_FILE
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result["status"] != OK:
            return WorkerResult(result["status"])
        displacement = torch.from_numpy(np.load(workdir / FIELD_FILE))
        return WorkerResult(OK, displacement, result["seconds"], result["cpu_seconds"], result["peak_mib"],
                            result["baseline_mib"], tuple(result.get("warnings", ())))
    if process.returncode < 0:
        return WorkerResult(f"{FAILED}: killed by {signal.Signals(-process.returncode).name}")
    lines = (workdir / LOG_FILE).read_text().strip().splitlines()
    last = lines[-1][:MESSAGE_CHARACTERS] if lines else "no output"
    return WorkerResult(f"{FAILED}: exit code {process.returncode}: {last}")


def main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    threads = int(request["threads"])
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    workdir = Path.cwd()
    try:
        method = resolve_method(request["method"])
        for module in method.modules:
            importlib.import_module(module)
        fixed, moving = read_image(request["fixed"]), read_image(request["moving"], "moving image")
        context = RunContext(threads, float(request["spacing"]), workdir, Path(request["fixed"]),
                             Path(request["moving"]))
        baseline_mib = psutil.Process().memory_info().rss / 2**20
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        with PeakMemory(torch.device("cpu")) as memory, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            displacement = method.run(fixed, moving, context).displacement_on(fixed.grid)
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
        bad = int((~torch.isfinite(displacement)).any(dim=0).sum())
        if bad:
            raise RuntimeError(f"the result has {bad} of {displacement[0].numel()} voxels with a non-finite "
                               "displacement")
    except Exception as error:   # the method failed: its row says why
        traceback.print_exc()
        message = " ".join(f"{type(error).__name__}: {error}".split())[:MESSAGE_CHARACTERS]
        (workdir / RESULT_FILE).write_text(json.dumps({"status": f"{FAILED}: {message}"}))
        return 1
    executables_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024   # KiB on Linux
    np.save(workdir / FIELD_FILE, displacement.numpy())
    (workdir / RESULT_FILE).write_text(json.dumps({
        "status": OK, "seconds": seconds, "cpu_seconds": cpu_seconds, "baseline_mib": baseline_mib,
        "peak_mib": memory.host_peak_mib + executables_mib,
        "warnings": list(dict.fromkeys(str(w.message)[:MESSAGE_CHARACTERS] for w in caught))}))
    return 0


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its finished child processes."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
