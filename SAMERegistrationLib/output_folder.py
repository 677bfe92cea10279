"""Writing a set of result files into a user's folder safely.

* One run at a time per folder: :func:`locked_output_folder` holds an exclusive lock on the folder
  for the whole run (``flock`` on the folder itself on Linux and macOS, on a ``.same-register.lock``
  file on Windows); the lock goes with the process, so a killed run never leaves a stale lock.
* Files are written into a hidden ``.partial-*`` folder inside it (:func:`staging_folder`) and moved
  into place by :func:`commit` as one set, with Ctrl-C and SIGTERM held back until every file is in
  place; outputs of an earlier run that this run does not write are removed then, other files are
  left alone. ``.partial-*`` folders left by a run that was killed outright are removed by the next.
* :func:`check_inputs_outside` refuses an output folder where an input would be overwritten or
  removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError
from .signals import signals_held

STAGING_PREFIX = ".partial-"
_WINDOWS_LOCK_FILE = ".same-register.lock"


def check_inputs_outside(outdir: Path, inputs: dict[str, str | os.PathLike], output_names: Iterable[str]) -> None:
    """Refuses ``outdir`` when an input is one of the files a run writes or removes there.

    Args:
        outdir: the output folder.
        inputs: {what the input is, e.g. "moving image": its path}.
        output_names: every file name a run may write (or remove as stale) in ``outdir``.

    Raises:
        InputError: naming the input and the folder.
    """
    managed = {(Path(outdir) / name).resolve() for name in output_names}
    for role, path in inputs.items():
        if Path(path).resolve() in managed:
            raise InputError(f"output directory {outdir}: holds the {role} {Path(path).name}, which the results would "
                             "overwrite: choose another output folder, or move the input out of it")


@contextmanager
def locked_output_folder(outdir: Path) -> Iterator[Path]:
    """Holds an exclusive lock on ``outdir`` while the block runs.

    Raises:
        InputError: another run holds the lock (it is writing into the same folder).
    """
    busy = InputError(f"output directory {outdir}: another registration is writing into it: wait until it has "
                      "finished or choose another output folder")
    if os.name == "nt":
        import msvcrt

        handle = os.open(Path(outdir) / _WINDOWS_LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            try:
                msvcrt.locking(handle, msvcrt.LK_NBLCK, 1)
            except OSError as error:
                raise busy from error
            try:
                yield Path(outdir)
            finally:
                os.lseek(handle, 0, os.SEEK_SET)
                msvcrt.locking(handle, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(handle)
        return
    import fcntl

    handle = os.open(outdir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise busy from error
        yield Path(outdir)  # closing the descriptor releases the lock
    finally:
        os.close(handle)


@contextmanager
def staging_folder(outdir: Path) -> Iterator[Path]:
    """A new hidden folder inside ``outdir`` for the files of one run, removed afterwards (whatever
    happens). Call it with the folder locked: staging folders of killed runs are removed first."""
    for abandoned in Path(outdir).glob(STAGING_PREFIX + "*"):
        shutil.rmtree(abandoned, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=outdir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit(staging: Path, outdir: Path, names: Iterable[str], managed: Iterable[str]) -> None:
    """Moves the files ``names`` from ``staging`` into ``outdir`` and removes the files of
    ``managed`` (every name a run may write) that this run did not write, with Ctrl-C and SIGTERM
    held back until the folder holds the complete new set.
    """
    names = list(names)
    with signals_held():
        for stale in set(managed) - set(names):
            (Path(outdir) / stale).unlink(missing_ok=True)
        for name in names:
            (staging / name).replace(Path(outdir) / name)
