"""``same-register-batch``: a cohort of tiny pairs on a local Dask cluster and on a separately started one.

The pairs are the bundled torso CT at 8 mm (``sample_cases``) and two synthetic moving images made
from it with known deformations, registered with ``--mode intensity --spacing 8`` (seconds each).
One batch of three pairs (two good, one with a truncated moving image) on a local cluster of two
workers is shared by the tests of its outputs and its rerun (module-scoped fixture). The external
cluster is a ``dask scheduler`` and a ``dask worker`` on 127.0.0.1, stopped at the end; its worker
is killed in the middle of a pair to check that a crash is one failed row.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.batch.cluster import WORKER_BASELINE_BYTES, plan_local_cluster
from SAMERegistrationLib.batch.pairs import read_pairs
from SAMERegistrationLib.batch.task import staging_folder, staging_folders
from SAMERegistrationLib.errors import InputError
from SAMERegistrationLib.io import read_image, write_image
from SAMERegistrationLib.learning.weights import MODELS, load_checked, save_weights
from SAMERegistrationLib.metrics import dice_per_label
from SAMERegistrationLib.outputs import (AFFINE_FILE, DISPLACEMENT_FILE, JACOBIAN_FILE, SUMMARY_FILE, TRANSFORM_FILE,
                                         WARPED_FILE, WARPED_LABELS_FILE)
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.synthetic import make_synthetic_pair
from sample_cases import REPO, threshold_labels, tiny_pair

OPTIONS = ["--mode", "intensity", "--spacing", "8", "--no-overview"]
OUTPUT_SET = (TRANSFORM_FILE, AFFINE_FILE, DISPLACEMENT_FILE, WARPED_FILE, JACOBIAN_FILE, WARPED_LABELS_FILE,
              SUMMARY_FILE)
TIMEOUT_S = 400


def batch(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Runs ``same-register-batch`` (from this checkout) and returns the finished process."""
    return subprocess.run([sys.executable, "-m", "SAMERegistrationLib.batch.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=_environment())


def _environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1")


def read_table(outroot: Path) -> dict[str, dict]:
    with open(outroot / "results.csv", newline="") as stream:
        return {row["id"]: row for row in csv.DictReader(stream)}


@dataclass(frozen=True)
class Cohort:
    folder: Path
    csv: Path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    """fixed.nii.gz + labels; moving_a, moving_b (two known deformations of it, with labels); a
    truncated copy of moving_a; pairs.csv with paths relative to itself."""
    folder = tmp_path_factory.mktemp("cohort")
    images = folder / "images"
    images.mkdir()
    data = tiny_pair()
    write_image(data.fixed, images / "fixed.nii.gz")
    write_image(data.fixed_labels, images / "fixed_labels.nii.gz", sitk.sitkUInt8)
    write_image(data.moving, images / "moving_a.nii.gz")
    write_image(data.moving_labels, images / "moving_a_labels.nii.gz", sitk.sitkUInt8)
    other = make_synthetic_pair(data.fixed, translation_mm=(-30.0, 10.0, -10.0), field_amplitude_mm=4.0, seed=3)
    write_image(other.moving, images / "moving_b.nii.gz")
    write_image(resample_labels(threshold_labels(data.fixed), other.moving.grid, other.psi),
                images / "moving_b_labels.nii.gz", sitk.sitkUInt8)
    whole = (images / "moving_a.nii.gz").read_bytes()
    (images / "moving_broken.nii.gz").write_bytes(whole[: len(whole) // 3])
    rows = ["fixed,moving,moving_labels,fixed_labels",
            "images/fixed.nii.gz,images/moving_a.nii.gz,images/moving_a_labels.nii.gz,images/fixed_labels.nii.gz",
            "images/fixed.nii.gz,images/moving_broken.nii.gz,,",
            "images/fixed.nii.gz,images/moving_b.nii.gz,images/moving_b_labels.nii.gz,images/fixed_labels.nii.gz"]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return Cohort(folder, folder / "pairs.csv")


@pytest.fixture(scope="module")
def first_run(cohort):
    """The cohort on a local cluster of 2 workers with 1 thread each."""
    outroot = cohort.folder / "out"
    done = batch(str(cohort.csv), "-o", str(outroot), *OPTIONS, "--workers", "2", "--threads-per-worker", "1")
    return outroot, done


def test_every_pair_is_registered_into_its_folder_and_the_table_matches_its_summary(cohort, first_run):
    outroot, done = first_run
    assert done.returncode == 1, done.stderr   # one pair failed
    assert "Local Dask cluster: 2 workers x 1 threads" in done.stderr
    table = read_table(outroot)
    assert list(table) == ["moving_a", "moving_broken", "moving_b"]   # ids from the moving images, CSV order
    fixed_labels = read_image(cohort.folder / "images" / "fixed_labels.nii.gz").data.to(torch.int64)
    for pair_id in ("moving_a", "moving_b"):
        folder = outroot / pair_id
        assert sorted(p.name for p in folder.iterdir()) == sorted(OUTPUT_SET)
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        assert Path(summary["moving"]).name == f"{pair_id}.nii.gz"
        assert summary["threads"] == 1
        row = table[pair_id]
        assert row["status"] == "ok" and row["message"] == ""
        assert float(row["percent_jacobian_nonpositive"]) == summary["jacobian"]["percent_nonpositive"]
        assert float(row["mean_dice"]) == summary["dice"]["mean"]
        assert float(row["mean_dice_before"]) == summary["dice"]["mean_before_registration"]
        assert float(row["mean_dice"]) > float(row["mean_dice_before"]) + 0.2   # the registration did its job
        assert float(row["seconds"]) >= summary["registration_seconds"] > 0
        assert 100 < float(row["peak_memory_mib"]) < WORKER_BASELINE_BYTES / 2**20
        assert row["worker"].startswith("tcp://127.0.0.1:")
        # The warped label file is the one the Dice in the table was computed from.
        warped = read_image(folder / WARPED_LABELS_FILE).data.to(torch.int64)
        dice = dice_per_label(fixed_labels, warped, [1, 2])
        assert sum(dice.values()) / 2 == pytest.approx(float(row["mean_dice"]), abs=1e-4)
    assert table["moving_a"]["mean_dice"] != table["moving_b"]["mean_dice"]   # two different pairs
    assert not list(outroot.glob(".*"))                                        # no staging folder left
    results = json.loads((outroot / "results.json").read_text())
    assert results["summary"]["ok"] == 2 and results["summary"]["failed"] == 1
    assert results["summary"]["dice"]["pairs"] == 2
    assert [row["id"] for row in results["rows"]] == list(table)


def test_a_corrupted_input_is_a_failed_row_with_its_message(cohort, first_run):
    outroot, done = first_run
    row = read_table(outroot)["moving_broken"]
    assert row["status"] == "failed"
    assert row["message"].startswith(f"moving image {cohort.folder / 'images' / 'moving_broken.nii.gz'}: "
                                     "is damaged or incomplete")
    assert not (outroot / "moving_broken").exists()
    assert "failed moving_broken: moving image" in done.stdout


def test_a_rerun_skips_finished_pairs(cohort, first_run):
    outroot, _ = first_run
    before = {pair_id: (outroot / pair_id / SUMMARY_FILE).stat().st_mtime_ns for pair_id in ("moving_a", "moving_b")}
    first = read_table(outroot)
    done = batch(str(cohort.csv), "-o", str(outroot), *OPTIONS, "--workers", "1", "--threads-per-worker", "1",
                 "--quiet")
    assert done.returncode == 1, done.stderr   # the broken pair is tried again and fails again
    table = read_table(outroot)
    for pair_id in ("moving_a", "moving_b"):
        assert (outroot / pair_id / SUMMARY_FILE).stat().st_mtime_ns == before[pair_id]
        assert table[pair_id]["status"] == "skipped"
        for column in ("percent_jacobian_nonpositive", "mean_dice", "mean_dice_before"):
            assert table[pair_id][column] == first[pair_id][column]
    assert table["moving_broken"]["status"] == "failed"
    assert "Pairs: 3, 0 registered, 2 skipped (already done), 1 failed." in done.stdout


def test_a_folder_without_a_complete_output_set_is_a_failed_row_and_kept(cohort, tmp_path):
    (tmp_path / "pairs.csv").write_text(f"fixed,moving,id\n{cohort.folder}/images/fixed.nii.gz,"
                                        f"{cohort.folder}/images/moving_a.nii.gz,mine\n")
    (tmp_path / "out" / "mine").mkdir(parents=True)
    (tmp_path / "out" / "mine" / "notes.txt").write_text("my notes")
    done = batch(str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "out"), *OPTIONS)
    assert done.returncode == 1
    row = read_table(tmp_path / "out")["mine"]
    assert row["status"] == "failed"
    assert row["message"] == (f"output folder {tmp_path / 'out' / 'mine'}: exists without a complete output set: "
                              "move it away, or use --force to replace it")
    assert (tmp_path / "out" / "mine" / "notes.txt").read_text() == "my notes"


def test_bad_pairs_file_is_a_one_line_error(tmp_path):
    (tmp_path / "pairs.csv").write_text("fixed,moving_image\na.nii.gz,b.nii.gz\n")
    done = batch(str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"same-register-batch: error: PAIRS {tmp_path / 'pairs.csv'}: no column moving: "
                                   "the first line must name the columns, e.g. fixed,moving (optional: "
                                   "moving_labels, fixed_labels, fixed_mask, moving_mask, id)")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the pairs file
def test_pairs_resolve_relative_to_the_csv_and_name_themselves(tmp_path):
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / "pairs.csv"
    path.write_text("moving, fixed ,fixed_labels\n"
                    "atlas.nii.gz,scans/s1.nii.gz,\n"
                    "\n"
                    "atlas.nii.gz,/data/s2.nrrd,/data/s2_labels.nrrd\n")
    pairs = read_pairs(path)
    assert [pair.id for pair in pairs] == ["s1__atlas", "s2__atlas"]   # the moving atlas repeats
    assert pairs[0].fixed == tmp_path / "lists" / "scans" / "s1.nii.gz"
    assert pairs[0].moving == tmp_path / "lists" / "atlas.nii.gz"
    assert pairs[0].fixed_labels is None and pairs[1].fixed_labels == Path("/data/s2_labels.nrrd")
    assert pairs[0].moving_mask is None
    assert [pair.line for pair in pairs] == [2, 4]


@pytest.mark.parametrize("text, message", [
    ("fixed,moving,id\na,b,x\nc,d,x\n", "lines 2, 3 have the same id 'x': give every pair its own id (column id)"),
    ("fixed,moving\natlas,s1.nii.gz\natlas,s1.nii.gz\n", "lines 2, 3 have the same id 'atlas__s1'"),
    ("fixed,moving,id\na,b,../x\n", "line 2: id '../x' is not a plain folder name"),
    ("fixed,moving\na,\n", "line 2: the moving cell is empty: give the moving image's path"),
    ("fixed,moving,weight\na,b,1\n", "unknown column weight: use fixed, moving, moving_labels, fixed_labels, "
                                     "fixed_mask, moving_mask, id"),
    ("fixed,moving\n", "holds no pairs"),
])
def test_bad_pairs_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(InputError) as raised:
        read_pairs(path)
    assert str(raised.value).startswith(f"PAIRS {path}: {message}")


# ------------------------------------------------------------------------------ local cluster size
def test_the_local_cluster_fits_the_cores_the_memory_and_the_pairs():
    gib = 2**30
    one_gib_pairs = gib - WORKER_BASELINE_BYTES % gib   # baseline + this = a whole number of GiB
    per_worker = WORKER_BASELINE_BYTES + one_gib_pairs
    plan = plan_local_cluster(one_gib_pairs, pairs=100, cores=16, available_bytes=4 * per_worker)
    assert (plan.workers, plan.threads_per_worker, plan.memory_per_worker) == (4, 4, per_worker)   # memory-bound
    assert plan_local_cluster(0, pairs=3, cores=16, available_bytes=64 * gib).workers == 3            # pair-bound
    plan = plan_local_cluster(0, pairs=100, threads=4, cores=16, available_bytes=64 * gib)
    assert (plan.workers, plan.threads_per_worker) == (4, 4)                                            # core-bound
    with pytest.raises(InputError, match=r"--workers 5: each worker needs about .* GiB of memory for the largest "
                                         r"pair but .* GiB is available: use --workers 4 or a larger --spacing"):
        plan_local_cluster(one_gib_pairs, pairs=100, workers=5, cores=16, available_bytes=4 * per_worker)


# ------------------------------------------------------------------------------ weights
def test_weights_are_read_once_per_process_and_again_when_replaced(tmp_path):
    path = tmp_path / "w.pt"
    save_weights(path, torch.nn.Linear(2, 1), {"size": 2})
    first = load_checked(path, "test weights", "--w")
    assert load_checked(path, "test weights", "--w") is first
    save_weights(path, torch.nn.Linear(3, 1), {"size": 3})
    second = load_checked(path, "test weights", "--w")
    assert second is not first and second["config"] == {"size": 3}
    shipped = MODELS / "sam_small.pt"
    assert load_checked(shipped, "SAM weights", "--sam-weights") is load_checked(shipped, "SAM weights",
                                                                                 "--sam-weights")


# ------------------------------------------------------------------------------ external cluster
def _start(command: list[str], log: Path) -> subprocess.Popen:
    """A ``dask`` command in its own process group (so that it can be stopped with its children)."""
    with open(log, "w") as stream:
        return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=_environment(),
                                start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_scheduler_option_runs_on_a_separate_cluster_and_a_killed_worker_is_a_failed_row(cohort, first_run, tmp_path):
    """A ``dask scheduler`` (no retries) and one ``dask worker`` on 127.0.0.1. Pair ``b`` is new;
    pair ``a`` already has a complete output set (copied from the first run) and is redone with
    ``--force``. The worker process is killed as soon as the first pair starts (``b``: with one
    worker slot the batch hands the scheduler one pair at a time, in CSV order): that pair is a
    failed row (were it ``a``, its earlier output set would still be there), the nanny restarts the
    worker and the other pair is registered."""
    outroot = tmp_path / "out"
    outroot.mkdir()
    shutil.copytree(first_run[0] / "moving_a", outroot / "a")
    old_a = (outroot / "a").stat().st_ino
    images = cohort.folder / "images"
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels,id\n"
        f"{images}/fixed.nii.gz,{images}/moving_b.nii.gz,,,b\n"
        f"{images}/fixed.nii.gz,{images}/moving_a.nii.gz,{images}/fixed_labels.nii.gz,{images}/moving_a_labels.nii.gz,a\n")
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler.json"
    os.environ["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "0"
    try:
        scheduler = _start([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")
    finally:
        del os.environ["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"]
    worker = None
    try:
        address = _wait_for(lambda: scheduler_file.exists() and json.loads(scheduler_file.read_text())["address"],
                            60, "the scheduler")
        worker = _start([dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                         "--resources", "registration=1", "--no-dashboard"], tmp_path / "worker.log")
        _wait_for(lambda: "Registered to" in (tmp_path / "worker.log").read_text(), 60, "the worker")
        run = subprocess.Popen([sys.executable, "-m", "SAMERegistrationLib.batch.cli", str(tmp_path / "pairs.csv"),
                                "-o", str(outroot), *OPTIONS, "--scheduler", address, "--force"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
        staging = _wait_for(lambda: list(outroot.glob(".partial-*")), 120, "the first pair to start")
        killed = staging[0].name.split("-")[1]
        worker_process, = [child for child in psutil.Process(worker.pid).children()   # the nanny's worker
                           if "spawn_main" in " ".join(child.cmdline())]
        worker_process.kill()
        stdout, stderr = run.communicate(timeout=TIMEOUT_S)
        assert run.returncode == 1, stderr
        table = read_table(outroot)
        survivor = ({"a", "b"} - {killed}).pop()
        assert table[killed]["status"] == "failed"
        assert table[killed]["message"].startswith("the worker registering this pair died")
        assert table[survivor]["status"] == "ok", table[survivor]["message"]
        assert table[survivor]["worker"].startswith("tcp://127.0.0.1:")
        assert f"Dask scheduler {address}: 1 workers" in stderr
        assert sorted(p.name for p in outroot.iterdir() if p.name.startswith(".")) == []
        if killed == "a":
            assert (outroot / "a").stat().st_ino == old_a          # the earlier output set is untouched
        else:
            assert (outroot / "a").stat().st_ino != old_a          # replaced (--force) by a complete new set
            assert not (outroot / "b").exists()
        summary = json.loads((outroot / survivor / SUMMARY_FILE).read_text())
        assert float(table[survivor]["percent_jacobian_nonpositive"]) == summary["jacobian"]["percent_nonpositive"]
    finally:
        if worker is not None:
            _stop(worker)
        _stop(scheduler)


def test_the_staging_folders_of_a_pair_are_not_those_of_a_longer_id(tmp_path):
    mine, longer = staging_folder(tmp_path, "a"), staging_folder(tmp_path, "a-b")
    mine.mkdir()
    longer.mkdir()
    (tmp_path / "a").mkdir()
    assert staging_folders(tmp_path, "a") == [mine]
    assert staging_folders(tmp_path, "a-b") == [longer]


@pytest.mark.parametrize("number, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_batch_and_leaves_no_partial_output(cohort, tmp_path, number, to_group):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it, or SIGTERM to the batch's
    own process (``kill``), once a pair has started."""
    images = cohort.folder / "images"
    (tmp_path / "pairs.csv").write_text(f"fixed,moving\n{images}/fixed.nii.gz,{images}/moving_a.nii.gz\n"
                                        f"{images}/fixed.nii.gz,{images}/moving_b.nii.gz\n")
    outroot = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "SAMERegistrationLib.batch.cli", str(tmp_path / "pairs.csv"),
                            "-o", str(outroot), *OPTIONS, "--workers", "1", "--threads-per-worker", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
                           start_new_session=True)
    try:
        _wait_for(lambda: list(outroot.glob(".partial-*")), 120, "the first pair to start")
        workers = psutil.Process(run.pid).children(recursive=True)
        (os.killpg if to_group else os.kill)(run.pid, number)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (f"same-register-batch: cancelled: 0 of 2 pairs are in "
                                               f"{outroot / 'results.csv'}; run the same command again to go on")
    assert "Traceback" not in stderr
    assert sorted(p.name for p in outroot.iterdir()) == ["results.csv", "results.json"]
    _wait_for(lambda: not any(worker.is_running() for worker in workers), 30, "the workers to end")
