"""Running a registration in a separate Python process that streams JSON lines.

The Slicer module runs the backend here so that Slicer stays responsive and a run can be cancelled
by killing a process tree. Both ends of the protocol live in this file:

* the **worker**: ``python -m SAMERegistrationLib.worker [--stdin-control] REQUEST.json`` reads a
  request (the fields of :class:`~SAMERegistrationLib.registration.RegistrationRequest`, with
  ``options`` a dict of :class:`~SAMERegistrationLib.pipeline.problem.RegistrationOptions`
  fields), calls :func:`~SAMERegistrationLib.registration.register_files` and writes one JSON
  object per line on stdout:

  - ``{"event": "started", "pid": ..., "device": ...}``
  - ``{"event": "progress", "stage", "stage_index", "stage_count", "fraction", "overall_fraction", "message"}``
  - ``{"event": "warning", "message": ...}``
  - ``{"event": "summary", "summary": {...}}`` (the run succeeded; outputs are complete), or
  - ``{"event": "error", "kind": "input" | "cancelled" | "failed" | "internal", "message": ...}``
    (``failed``: the result was unusable, e.g. NaN; ``internal``: a bug, traceback on stderr)

  A request may also hold ``extra_moving_labels``: more label files on the moving grid (the
  segments of a Slicer segmentation that overlap those of ``moving_labels``); each is warped like
  ``moving_labels`` (same transform and label interpolation, as ``same-apply`` does) into
  ``warped_labels_layer<N>.nii.gz`` (N = 1, 2, ...) of the output folder.

  Exit code 0 after a summary, 2 for bad input, 3 when cancelled, 1 for anything else. Anything
  else the process prints goes to stderr. With ``--stdin-control`` a line ``cancel`` on stdin, or
  stdin closing (the parent died), cancels the run cleanly; so does SIGTERM (or Ctrl-C).
* the **client**: :class:`WorkerProcess` starts the worker, reads its stdout and stderr on threads
  into a queue, and :meth:`~WorkerProcess.poll` returns the events without blocking (the Slicer
  module polls from a QTimer); :meth:`~WorkerProcess.cancel` stops the whole process tree (SIGTERM,
  then SIGKILL for what is still running after a grace period).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
EXTRA_LABEL_LAYERS = "extra_moving_labels"
"""Request field: label files warped like ``moving_labels`` (see the module docstring)."""
_PROGRESS_INTERVAL_S = 0.1
"""Progress events of one stage are sent at most this often (a stage's first and last always)."""
TERMINATE_GRACE_S = 5.0
"""How long :meth:`WorkerProcess.cancel` lets the worker clean up after SIGTERM before killing it."""


# =========================================================================================== worker
class _Emitter:
    """Writes JSON lines to the real stdout, one whole line at a time (thread-safe)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._last_progress: tuple[str, float] | None = None

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def progress(self, progress_event) -> None:
        now = time.monotonic()
        previous = self._last_progress
        if (previous is not None and previous[0] == progress_event.stage and progress_event.fraction < 1.0
                and now - previous[1] < _PROGRESS_INTERVAL_S):
            return
        self._last_progress = (progress_event.stage, now)
        self.emit("progress", stage=progress_event.stage, stage_index=progress_event.stage_index,
                  stage_count=progress_event.stage_count, fraction=round(float(progress_event.fraction), 5),
                  overall_fraction=round(float(progress_event.overall_fraction), 5), message=progress_event.message)


def warped_layer_file(index: int) -> str:
    """The output file of the ``index``-th (1, 2, ...) extra label layer."""
    return f"warped_labels_layer{index}.nii.gz"


def request_from_dict(data: dict):
    """A :class:`RegistrationRequest` from the request file's JSON object.

    Raises:
        InputError: unknown fields or options.
    """
    from dataclasses import fields

    from .errors import InputError
    from .pipeline.problem import RegistrationOptions
    from .registration import RegistrationRequest

    data = dict(data)
    option_values = data.pop("options", None) or {}
    known = {f.name for f in fields(RegistrationRequest)} - {"options"}
    unknown = set(data) - known
    if unknown:
        raise InputError(f"request: unknown fields {sorted(unknown)}: use {sorted(known)}")
    option_names = {f.name for f in fields(RegistrationOptions)}
    if set(option_values) - option_names:
        raise InputError(f"request options: unknown {sorted(set(option_values) - option_names)}: use {sorted(option_names)}")
    option_values = {k: tuple(v) if isinstance(v, list) else v for k, v in option_values.items()}
    return RegistrationRequest(options=RegistrationOptions(**option_values), **data)


def _watch_stdin(cancel: threading.Event) -> None:
    """Sets ``cancel`` on a line ``cancel`` or when stdin closes."""
    for line in sys.stdin:
        if line.strip() == "cancel":
            break
    cancel.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SAMERegistrationLib.worker",
                                     description="Runs one registration and reports it as JSON lines on stdout.")
    parser.add_argument("request", help="JSON file with the request's fields")
    parser.add_argument("--stdin-control", action="store_true",
                        help="cancel on a line 'cancel' on stdin or when stdin closes")
    args = parser.parse_args(argv)

    # Only JSON lines go to the real stdout; everything else printed in this process goes to stderr.
    sys.stdout.flush()
    json_stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    emitter = _Emitter(json_stream)
    try:
        return _run(args, emitter)
    finally:
        json_stream.flush()


def _run(args, emitter: _Emitter) -> int:
    import warnings

    cancel = threading.Event()
    if args.stdin_control:
        threading.Thread(target=_watch_stdin, args=(cancel,), daemon=True, name="stdin-control").start()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        emitter.emit("warning", message=str(message))

    warnings.showwarning = show_warning
    from .signals import terminate_like_ctrl_c

    with terminate_like_ctrl_c(cancel):
        return _register(args, emitter, cancel)


def _register(args, emitter: _Emitter, cancel: threading.Event) -> int:
    """Reads the request, runs it and reports the outcome as one final event; returns the exit code."""
    try:
        from .errors import InputError, RegistrationCancelled, RegistrationFailed
        from .registration import register_files

        try:
            data = json.loads(Path(args.request).read_text(encoding="utf-8"))
            extra_layers = list(data.pop(EXTRA_LABEL_LAYERS, None) or [])
            request = request_from_dict(data)
        except (OSError, ValueError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"request {args.request}: cannot be read as JSON ({error})") from error
        emitter.emit("started", pid=os.getpid(), device=request.device, mode=request.mode)
        summary = register_files(request, emitter.progress, cancel)
        if extra_layers:
            from .apply import apply_transform

            for index, layer in enumerate(extra_layers, start=1):
                name = warped_layer_file(index)
                apply_transform(summary["files"]["transform"], layer, request.fixed,
                                Path(request.output_dir) / name, request.label_method)
                summary["files"][f"warped_labels_layer{index}"] = str(Path(request.output_dir) / name)
    except InputError as error:
        emitter.emit("error", kind="input", message=str(error))
        return EXIT_BAD_INPUT
    except (RegistrationCancelled, KeyboardInterrupt) as error:
        emitter.emit("error", kind="cancelled", message=str(error) if isinstance(error, RegistrationCancelled)
                     else "registration cancelled (interrupted); no output written")
        return EXIT_CANCELLED
    except RegistrationFailed as error:
        emitter.emit("error", kind="failed", message=str(error))
        return EXIT_INTERNAL_ERROR
    except Exception as error:  # noqa: BLE001 - reported to the parent, which shows it to the user
        import traceback

        traceback.print_exc()
        emitter.emit("error", kind="internal", message=f"{type(error).__name__}: {error}")
        return EXIT_INTERNAL_ERROR
    emitter.emit("summary", summary=summary)
    return EXIT_OK


# =========================================================================================== client
def library_parent() -> str:
    """The folder that holds the ``SAMERegistrationLib`` package (put on the worker's PYTHONPATH)."""
    return str(Path(__file__).resolve().parent.parent)


class WorkerProcess:
    """A running worker: start it, poll its events, wait for it or kill it.

    Args:
        request: the request's fields (JSON-serialisable); written to ``request_path``.
        request_path: where the request file is written.
        python: the Python executable (in Slicer: ``PythonSlicer``); default ``sys.executable``.
        env: extra environment variables for the worker.
    """

    def __init__(self, request: dict, request_path: str | os.PathLike, python: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.request = request
        self.request_path = Path(request_path)
        self.python = python or sys.executable
        self.extra_env = dict(env or {})
        self.events: queue.Queue[dict] = queue.Queue()
        self.process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []
        self.killed = False

    def start(self) -> WorkerProcess:
        self.request_path.write_text(json.dumps(self.request, indent=2, default=str), encoding="utf-8")
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library_parent(), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        command = [self.python, "-m", "SAMERegistrationLib.worker", "--stdin-control", str(self.request_path)]
        options: dict = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            options["start_new_session"] = True  # its own process group: cancel kills the whole tree
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, **options)
        self._readers = [threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True)]
        for reader in self._readers:
            reader.start()
        return self

    def _read(self, stream, is_stdout: bool) -> None:
        for line in iter(stream.readline, ""):
            line = line.rstrip("\n")
            if not line:
                continue
            event = None
            if is_stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
            self.events.put(event if isinstance(event, dict) and "event" in event
                            else {"event": "log", "message": line, "stream": "stdout" if is_stdout else "stderr"})
        stream.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def finished(self) -> bool:
        """True once the process has exited and both of its output streams have been read."""
        return (self.process is not None and self.process.poll() is not None
                and not any(reader.is_alive() for reader in self._readers))

    def poll(self) -> list[dict]:
        """The events received since the last call (never blocks)."""
        received = []
        while True:
            try:
                received.append(self.events.get_nowait())
            except queue.Empty:
                return received

    def wait(self, timeout: float | None = None) -> list[dict]:
        """Blocks until the worker exits (or ``timeout`` seconds; then it is killed) and returns the
        events not yet polled."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            self.process.wait()
        for reader in self._readers:
            reader.join()
        return self.poll()

    def request_cancel(self) -> None:
        """Asks the worker to stop at its next progress check (it exits with code 3, no outputs)."""
        try:
            self.process.stdin.write("cancel\n")
            self.process.stdin.flush()
        except (OSError, ValueError):
            pass

    def cancel(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """Stops the worker and every process it started: SIGTERM first, so the worker removes its
        staging folder and exits, then SIGKILL after ``grace_s`` seconds (on Windows: at once)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.killed = True
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True, check=False)
            self.process.wait()
            return
        for number, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
            try:
                os.killpg(self.process.pid, number)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever the worker started and left behind
        except ProcessLookupError:
            pass
        self.process.wait()


if __name__ == "__main__":
    sys.exit(main())
