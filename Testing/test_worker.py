"""The worker process (``python -m SAMERegistrationLib.worker``) and its client, for real.

Each test spawns the worker with this interpreter on the tiny torso pair (8 mm, one thread) and reads
its JSON lines: progress, the summary or one error, exit codes, and what is left on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sample_cases import FAST_MODE, FAST_OPTIONS, write_tiny_pair

from SAMERegistrationLib.outputs import (
    AFFINE_FILE, DISPLACEMENT_FILE, JACOBIAN_FILE, SUMMARY_FILE, TRANSFORM_FILE, WARPED_FILE, WARPED_LABELS_FILE,
)
from SAMERegistrationLib.export import write_affine
from SAMERegistrationLib.worker import (EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_INTERNAL_ERROR, EXIT_OK, WorkerProcess,
                                        library_parent)

RESULT_FILES = {TRANSFORM_FILE, AFFINE_FILE, DISPLACEMENT_FILE, WARPED_FILE, JACOBIAN_FILE, WARPED_LABELS_FILE,
                SUMMARY_FILE}
STAGES = ["initial-alignment", "intensity-affine", "intensity-deformable"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_pair(tmp_path_factory.mktemp("worker_inputs"))


def request(pair: dict[str, Path], outdir: Path, **changes) -> dict:
    fields = {"fixed": str(pair["fixed"]), "moving": str(pair["moving"]), "output_dir": str(outdir),
              "fixed_labels": str(pair["fixed_labels"]), "moving_labels": str(pair["moving_labels"]),
              "mode": FAST_MODE, "device": "cpu", "overview": False, "options": FAST_OPTIONS}
    fields.update(changes)
    return fields


def wait_for(worker: WorkerProcess, predicate, timeout: float = 60.0) -> list[dict]:
    """Polls until an event satisfies ``predicate``; returns every event received."""
    received: list[dict] = []
    deadline = time.monotonic() + timeout
    while not any(predicate(e) for e in received):
        assert time.monotonic() < deadline, f"no matching event within {timeout} s: {received[-3:]}"
        assert worker.running or not worker.events.empty(), f"worker ended early: {received[-3:]}"
        received += worker.poll()
        time.sleep(0.02)
    return received


def test_worker_streams_monotonic_progress_then_the_summary(pair, tmp_path):
    outdir = tmp_path / "out"
    start = time.perf_counter()
    worker = WorkerProcess(request(pair, outdir), tmp_path / "request.json").start()
    events = worker.wait(timeout=300)
    seconds = time.perf_counter() - start
    assert worker.returncode == EXIT_OK, events
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "summary" and "error" not in kinds
    assert all(e["stream"] == "stderr" for e in events if e["event"] == "log"), "stdout held a line that is not JSON"
    progress = [e for e in events if e["event"] == "progress"]
    overall = [e["overall_fraction"] for e in progress]
    assert overall == sorted(overall) and overall[0] < 0.1 and overall[-1] == 1.0
    assert [s for i, s in enumerate(e["stage"] for e in progress) if i == 0 or progress[i - 1]["stage"] != s] == STAGES
    assert all(e["stage_count"] == 3 and 0.0 <= e["fraction"] <= 1.0 for e in progress)
    summary = events[-1]["summary"]
    assert json.loads((outdir / SUMMARY_FILE).read_text())["registration_seconds"] == summary["registration_seconds"]
    assert set(summary["files"]) >= {"transform", "warped", "jacobian", "warped_labels", "displacement"}
    assert {Path(p).name for p in summary["files"].values()} == RESULT_FILES
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in summary["files"].values())
    assert set(os.listdir(outdir)) == RESULT_FILES  # no staging folder left
    assert sitk.ReadImage(str(outdir / WARPED_FILE)).GetSize() == sitk.ReadImage(str(pair["fixed"])).GetSize()
    dice = summary["dice"]
    print(f"\nworker run {seconds:.1f} s, {len(progress)} progress events; mean Dice "
          f"{dice['mean_before_registration']:.3f} -> {dice['mean']:.3f}")
    assert dice["mean"] > dice["mean_before_registration"] + 0.3


def test_cancelling_the_worker_during_the_affine_stage_stops_it_cleanly(pair, tmp_path):
    """cancel() sends SIGTERM: the worker reports the cancel, exits with code 3 and leaves nothing
    in the output folder (no result file, no hidden staging folder)."""
    outdir = tmp_path / "out"
    worker = WorkerProcess(request(pair, outdir), tmp_path / "request.json").start()
    wait_for(worker, lambda e: e["event"] == "progress" and e["stage"] == "intensity-affine")
    worker.cancel()
    assert worker.returncode == EXIT_CANCELLED and worker.killed
    events = worker.wait()
    assert not any(e["event"] == "summary" for e in events)
    assert [e["kind"] for e in events if e["event"] == "error"] == ["cancelled"]
    assert (sorted(os.listdir(outdir)) if outdir.exists() else []) == []


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(pair, tmp_path):
    outdir = tmp_path / "out"
    worker = WorkerProcess(request(pair, outdir), tmp_path / "request.json").start()
    wait_for(worker, lambda e: e["event"] == "started")
    os.kill(worker.process.pid, signal.SIGSTOP)  # a stopped process cannot handle SIGTERM
    worker.cancel(grace_s=0.5)
    assert worker.returncode == -signal.SIGKILL and worker.killed
    left = set(os.listdir(outdir)) if outdir.exists() else set()
    assert not left & RESULT_FILES, left


def test_cancel_line_on_stdin_stops_the_run_cleanly(pair, tmp_path):
    outdir = tmp_path / "out"
    worker = WorkerProcess(request(pair, outdir), tmp_path / "request.json").start()
    wait_for(worker, lambda e: e["event"] == "progress" and e["stage"] == "intensity-affine")
    worker.request_cancel()
    events = worker.wait(timeout=60)
    assert worker.returncode == EXIT_CANCELLED
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "cancelled" and "intensity-affine" in errors[0]["message"]
    assert not (set(os.listdir(outdir)) if outdir.exists() else set()) & RESULT_FILES


def test_bad_input_gives_one_error_line_and_exit_code_2(pair, tmp_path):
    missing = tmp_path / "nowhere.nii.gz"
    worker = WorkerProcess(request(pair, tmp_path / "out", moving=str(missing)), tmp_path / "request.json").start()
    events = worker.wait(timeout=120)
    assert worker.returncode == EXIT_BAD_INPUT
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "input"
    assert str(missing) in errors[0]["message"] and "does not exist" in errors[0]["message"]
    assert not any(e["event"] == "summary" for e in events)
    assert not (tmp_path / "out").exists()


def test_a_diverged_result_is_a_failed_run_without_outputs(pair, tmp_path):
    """An initial transform scaling by 1e30 makes every mapped point infinite: the worker reports
    one error of kind "failed" (not an internal error with a traceback) and writes nothing."""
    initial = tmp_path / "explode.tfm"
    write_affine(np.diag([1e30, 1e30, 1e30, 1.0]), initial)
    worker = WorkerProcess(request(pair, tmp_path / "out", initial_transform=str(initial)),
                           tmp_path / "request.json").start()
    events = worker.wait(timeout=120)
    assert worker.returncode == EXIT_INTERNAL_ERROR
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "failed" and "diverged" in errors[0]["message"]
    assert not any(e["event"] == "log" and "Traceback" in e["message"] for e in events)
    assert sorted(os.listdir(tmp_path / "out")) == []


def test_unknown_request_field_is_refused_before_any_work(pair, tmp_path):
    (tmp_path / "request.json").write_text(json.dumps({**request(pair, tmp_path / "out"), "colour": "blue"}))
    env = {**os.environ, "PYTHONPATH": library_parent()}
    done = subprocess.run([sys.executable, "-m", "SAMERegistrationLib.worker", str(tmp_path / "request.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == [{"event": "error", "kind": "input",
                      "message": lines[0]["message"]}] and "unknown fields ['colour']" in lines[0]["message"]
