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

_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_like_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM (sent by batch systems, ``kill`` and the Slicer module's cancel)
    raises KeyboardInterrupt like Ctrl-C, so the run stops cleanly; the previous handler is
    restored afterwards."""
    if not _in_main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt(f"signal {number}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """Delays SIGINT and SIGTERM for the block (in the main thread; elsewhere a no-op): a signal that
    arrives meanwhile is raised again, to the handler of before, when the block ends."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in _HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in received:
            signal.raise_signal(number)
