"""What a Dask worker does with one pair: register it into a staging folder, then move the folder
into place, so that ``OUTROOT/<id>/`` only ever holds a complete output set.

The staging folder is ``OUTROOT/.partial-<id>-<random>/``; it is removed when the pair fails or is
cancelled, and by the client when a worker dies (see :func:`staging_folders`). The registration
runs in the worker's own process with its thread count pinned (PyTorch and SimpleITK, by
:func:`~SAMERegistrationLib.registration.register_files`); the weights it loads stay cached in
that process for the next pairs (see :mod:`SAMERegistrationLib.learning.weights`).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from distributed import Event, get_client, get_worker

from ..errors import InputError, RegistrationCancelled
from ..pipeline.memory import PeakMemory
from ..registration import RegistrationRequest, register_files
from .results import FAILED, OK, PairResult, result_from_summary

STAGING_PREFIX = ".partial-"
_CANCEL_POLL_S = 0.5
"""How often a running pair checks the batch's cancel event."""


def staging_folder(outroot: Path, pair_id: str) -> Path:
    """A new name ``OUTROOT/.partial-<id>-<8 hex digits>`` for a folder of pair ``pair_id``."""
    return Path(outroot) / f"{STAGING_PREFIX}{pair_id}-{uuid.uuid4().hex[:8]}"


def staging_folders(outroot: Path, pair_id: str) -> list[Path]:
    """The staging folders of pair ``pair_id`` under ``outroot`` (left behind only by a worker that
    died, or a batch that was killed); not those of a pair whose id merely starts with ``pair_id``."""
    pattern = re.compile(re.escape(f"{STAGING_PREFIX}{pair_id}-") + "[0-9a-f]{8}")
    return sorted(path for path in Path(outroot).glob(f"{STAGING_PREFIX}*") if pattern.fullmatch(path.name))


def register_pair(request: RegistrationRequest, pair_id: str, replace_existing: bool,
                  cancel_event: str | None = None) -> PairResult:
    """Registers one pair on a Dask worker; never raises for a bad pair.

    Args:
        request: the pair's request; ``request.output_dir`` is its final folder ``OUTROOT/<id>``.
            With ``options.threads`` None the worker's thread count is used.
        pair_id: the pair's id, for its row.
        replace_existing: an existing ``output_dir`` is replaced (``--force``); otherwise an existing
            one makes the pair fail (the client skips complete output sets before submitting).
        cancel_event: name of a :class:`distributed.Event`; once it is set the registration stops at
            its next progress check and writes nothing.

    Returns:
        the pair's row: :data:`OK` with its numbers, or :data:`FAILED` with the reason.
    """
    target = Path(request.output_dir)
    worker = get_worker()
    if request.options.threads is None:
        request = replace(request, options=replace(request.options, threads=worker.state.nthreads))
    started = time.perf_counter()
    staging = staging_folder(target.parent, pair_id)
    staging.mkdir()   # the user's umask applies, as to a folder same-register creates
    cancel, finished = threading.Event(), threading.Event()
    if cancel_event is not None:
        _watch_cancel_event(cancel_event, cancel, finished)
    try:
        with warnings.catch_warnings(record=True) as caught, PeakMemory(torch.device("cpu")) as memory:
            warnings.simplefilter("always")
            summary = register_files(replace(request, output_dir=staging), cancel=cancel)
        _move_into_place(staging, target, replace_existing)
    except InputError as error:
        return PairResult(pair_id, FAILED, worker=worker.address, message=str(error))
    except RegistrationCancelled:
        return PairResult(pair_id, FAILED, worker=worker.address, message="cancelled")
    except MemoryError:
        return PairResult(pair_id, FAILED, worker=worker.address,
                          message="out of memory: use a larger --spacing, or fewer --workers")
    except Exception as error:  # noqa: BLE001 - any other failure of one pair is that pair's row
        return PairResult(pair_id, FAILED, worker=worker.address,
                          message=" ".join(f"{type(error).__name__}: {error}".split()))
    finally:
        finished.set()
        shutil.rmtree(staging, ignore_errors=True)
    messages = dict.fromkeys(f"warning: {warning.message}" for warning in caught)
    return result_from_summary(pair_id, OK, summary, seconds=time.perf_counter() - started,
                               peak_memory_mib=memory.host_peak_mib, worker=worker.address,
                               message="; ".join(messages))


def _move_into_place(staging: Path, target: Path, replace_existing: bool) -> None:
    """Renames the complete ``staging`` folder to ``target`` (same file system, so atomic)."""
    if target.exists():
        if not replace_existing:
            raise InputError(f"output folder {target}: appeared while the pair was registered: "
                             "run one batch per output folder at a time")
        old = staging_folder(target.parent, target.name)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    staging.rename(target)


def _watch_cancel_event(name: str, cancel: threading.Event, finished: threading.Event) -> None:
    """Sets ``cancel`` once the cluster-wide event ``name`` is set (checked until ``finished``)."""
    event = Event(name, client=get_client())   # the worker's client is found on the task's thread only

    def watch() -> None:
        while not finished.is_set():
            try:
                if event.wait(timeout=_CANCEL_POLL_S):
                    cancel.set()
                    return
            except Exception:  # noqa: BLE001 - the scheduler went away: the batch is over
                cancel.set()
                return

    threading.Thread(target=watch, daemon=True, name=f"cancel-{name}").start()
