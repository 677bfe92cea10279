"""Process signals around a registration: SIGTERM handled like Ctrl-C, and held back while a
block that must not be cut short runs (moving a set of outputs into place).

Both change Python signal handlers, which only the main thread may do; in other threads they do
nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

class StopSignalReceived(KeyboardInterrupt):
    """Raised by :func:`terminate_like_ctrl_c` when SIGINT or SIGTERM arrives.

    A subclass, not KeyboardInterrupt itself: CPython (3.11 at least) remembers a KeyboardInterrupt
    of that exact type that left code run by ``exec``/``eval`` of a source string (dataclasses and
    namedtuples build their methods so, when a module is imported) and, under ``python -m``, ends the
    process with SIGINT at exit even after the program caught it and returned its own exit code; the
    cancelled worker then reported -2 instead of its "cancelled" code. Code that catches
    KeyboardInterrupt catches this too.
    """


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _stop_signals_handled_by(handler) -> Iterator[None]:
    """Installs ``handler`` for SIGINT and SIGTERM within the block; restores the previous handlers."""
    previous = {number: signal.signal(number, handler) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, signal.SIG_DFL if old is None else old)


@contextmanager
def terminate_like_ctrl_c(cancel: threading.Event | None = None) -> Iterator[None]:
    """Within the block, SIGTERM (sent by batch systems, ``kill`` and the Slicer module's cancel)
    and SIGINT (Ctrl-C) raise :class:`StopSignalReceived` (a KeyboardInterrupt), so the run stops
    cleanly; the previous handlers are restored afterwards.

    Args:
        cancel: also set on either signal. Python drops an exception raised while it runs a
            finaliser (``__del__``, a weakref or garbage-collector callback) with only an "Exception
            ignored" line, so a signal that lands there would be lost; the registration's progress
            checks see this event at its next step and stop it anyway.
    """
    if not _in_main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def interrupt(number, frame):
        if cancel is not None:
            cancel.set()
        raise StopSignalReceived(f"signal {number}")

    with _stop_signals_handled_by(interrupt):
        yield


@contextmanager
def signals_held() -> Iterator[None]:
    """Delays SIGINT and SIGTERM for the block (in the main thread; elsewhere a no-op): a signal that
    arrives meanwhile is raised again, to the handler of before, when the block ends."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    try:
        with _stop_signals_handled_by(lambda number, frame: received.append(number)):
            yield
    finally:
        for number in received:
            signal.raise_signal(number)
