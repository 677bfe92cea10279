"""The probe process: what the Slicer module learns about PyTorch, the GPU and the modes without
importing torch itself."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from SAMERegistrationLib.modes import AVAILABLE_MODES
from SAMERegistrationLib.probe import Probe


def test_probe_reports_torch_threads_modes_and_the_gpu():
    probe = Probe().start()
    answer = probe.wait(timeout=120)
    assert answer is not None, probe.error
    assert answer["torch"] == torch.__version__.split("+")[0]
    assert answer["modes"] == list(AVAILABLE_MODES)
    assert answer["threads"] >= 1
    assert (answer["gpu"] is None) == (not torch.cuda.is_available())
    assert answer["memory_error"] is None


def test_memory_check_is_answered_on_a_gpu_only():
    """Without a GPU there is nothing to check (the CPU check runs in the worker); with one, a volume
    far too large for it is reported with check_memory's message."""
    huge = {"shape": [4000, 4000, 4000], "ijk_to_ras": np.diag([-1.0, -1.0, 1.0, 1.0]).tolist()}
    answer = Probe(memory_check={"fixed": huge, "moving": huge, "spacing": 0.5}).start().wait(timeout=120)
    assert answer is not None
    if torch.cuda.is_available():
        assert "GPU" in answer["memory_error"]
    else:
        assert answer["memory_error"] is None and answer["gpu"] is None


def test_the_client_does_not_import_torch():
    """The client side (what the Slicer module's own process runs) imports neither torch nor the
    registration code."""
    code = ("import sys; from SAMERegistrationLib.probe import Probe; p = Probe().start(); a = p.wait(120); "
            "assert a is not None, p.error; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
