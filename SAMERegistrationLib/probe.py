"""What the registration process will find, asked of a separate Python process: PyTorch, its
threads, the GPU with its free memory, the available modes, and whether two volumes fit in GPU
memory. The Slicer module asks here instead of importing torch itself, so that Slicer's own
process never initialises CUDA (a CUDA context costs GPU memory the worker then lacks).

Both ends live in this file:

* the **probe**: ``python -m SAMERegistrationLib.probe [--memory-check CHECK.json]`` prints one
  JSON object ``{"torch": "2.13.0", "threads": 8, "modes": [...], "gpu": {"name", "total_gib",
  "free_gib"} or null, "memory_error": str or null}``. ``CHECK.json`` holds
  ``{"fixed": VOLUME, "moving": VOLUME, "spacing": mm}`` with ``VOLUME = {"shape": [k, j, i],
  "ijk_to_ras": 4x4}`` (a Slicer volume's array shape and IJKToRAS matrix); ``memory_error`` is
  then the message of :func:`~SAMERegistrationLib.registration.check_memory` for the GPU, or null.
* the **client**: :class:`Probe` starts it and, without blocking, tells when its answer is there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def describe(memory_check: dict | None = None) -> dict:
    """The answer of the probe (imports torch; runs in the probe process)."""
    import torch

    from .modes import AVAILABLE_MODES

    answer = {"torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads(),
              "modes": list(AVAILABLE_MODES), "gpu": None, "memory_error": None}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        answer["gpu"] = {"name": properties.name, "total_gib": round(total / 2**30, 2),
                         "free_gib": round(free / 2**30, 2)}
        if memory_check is not None:
            answer["memory_error"] = _memory_error(memory_check)
    return answer


def _memory_error(check: dict) -> str | None:
    import numpy as np
    import torch

    from .errors import InputError
    from .registration import check_memory
    from .spatial.grid import Grid

    grids = [Grid.from_index_to_world_ras(tuple(check[role]["shape"]), np.array(check[role]["ijk_to_ras"]))
             for role in ("fixed", "moving")]
    try:
        check_memory(*grids, float(check["spacing"]), torch.device("cuda"))
    except InputError as error:
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SAMERegistrationLib.probe",
                                     description="Prints what a registration process finds (PyTorch, GPU, modes) as JSON.")
    parser.add_argument("--memory-check", metavar="CHECK.json", help="two volumes' geometry and the working spacing")
    args = parser.parse_args(argv)
    check = None if args.memory_check is None else json.loads(Path(args.memory_check).read_text(encoding="utf-8"))
    print(json.dumps(describe(check)))
    return 0


class Probe:
    """One probe process: :meth:`start` returns at once, :meth:`answer` is None until it has
    answered (or failed: then ``error`` says why). :meth:`wait` blocks.

    Args:
        python: the Python executable (in Slicer ``PythonSlicer``); default ``sys.executable``.
        memory_check: optional ``CHECK.json`` content (see the module docstring).
    """

    def __init__(self, python: str | None = None, memory_check: dict | None = None) -> None:
        self.python = python or sys.executable
        self.memory_check = memory_check
        self.error: str | None = None
        self._process: subprocess.Popen | None = None
        self._answer: dict | None = None
        self._check_file: Path | None = None

    def start(self) -> Probe:
        import tempfile

        from .worker import library_parent

        command = [self.python, "-m", "SAMERegistrationLib.probe"]
        if self.memory_check is not None:
            handle, name = tempfile.mkstemp(prefix="SAMERegistration-memory-", suffix=".json")
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(self.memory_check, stream)
            self._check_file = Path(name)
            command += ["--memory-check", name]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library_parent(), env.get("PYTHONPATH", "")) if p)
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=env, stdin=subprocess.DEVNULL)
        return self

    def answer(self) -> dict | None:
        """The probe's answer once it has ended (None while it runs or when it failed)."""
        if self._answer is None and self.error is None and self._process is not None \
                and self._process.poll() is not None:
            self._finish()
        return self._answer

    def wait(self, timeout: float | None = None) -> dict | None:
        """Blocks until the probe ends; its answer, or None when it failed (see ``error``)."""
        if self._process is not None and self._answer is None and self.error is None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
                self.error = f"the probe did not answer within {timeout:g} s"
                self._cleanup()
                return None
            self._finish()
        return self._answer

    def _finish(self) -> None:
        stdout, stderr = self._process.communicate()
        self._cleanup()
        lines = stdout.strip().splitlines()
        try:
            self._answer = json.loads(lines[-1]) if self._process.returncode == 0 and lines else None
        except json.JSONDecodeError:
            self._answer = None
        if self._answer is None:
            tail = " | ".join(stderr.strip().splitlines()[-3:])
            self.error = f"the probe process ended with code {self._process.returncode}: {tail}"

    def _cleanup(self) -> None:
        if self._check_file is not None:
            self._check_file.unlink(missing_ok=True)
            self._check_file = None


if __name__ == "__main__":
    sys.exit(main())
