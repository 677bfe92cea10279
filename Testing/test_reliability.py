"""Bad input and faults: each gets one clear line, and no input or earlier result is lost.

Each test pins one case of the README's bad-input catalogue: damaged files, headers that promise
more voxels than memory holds (checked before any voxel is read, also under ``ulimit -v``), damaged
or unsafe weights, non-finite similarity weights and results, options that have no effect, label
values beyond 16 bits, an output folder that holds an input, stale outputs, SIGTERM and two runs
into one folder. Registrations use the small 8 mm torso of :mod:`sample_cases` (seconds each).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.cli import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED, main
from SAMERegistrationLib.errors import InputError, RegistrationCancelled
from SAMERegistrationLib.export import read_initial_transform, write_affine
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image, write_image
from SAMERegistrationLib.learning.objective import parse_similarity
from SAMERegistrationLib.learning.training_pairs import TrainingScan
from SAMERegistrationLib.learning.weights import sha256_file
from SAMERegistrationLib.output_folder import locked_output_folder
from SAMERegistrationLib.pipeline.progress import Progress
from SAMERegistrationLib.io import label_pixel_type
from SAMERegistrationLib.outputs import OUTPUT_FILES, WARPED_LABELS_FILE
from SAMERegistrationLib.sam.embedding import load_sam
from SAMERegistrationLib.signals import signals_held, terminate_like_ctrl_c
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.synthetic import make_synthetic_pair
from sample_cases import small_torso, threshold_labels
from test_cli import assert_one_error_line, file_state

REPO = Path(__file__).resolve().parent.parent
FAST = ["--mode", "intensity", "--spacing", "8", "--threads", "1", "--device", "cpu", "--quiet"]
BIG_LABELS = (70_000, 1_000_000, 2**24 + 1, 2**24 + 3)
"""Label values that uint16 wraps (70000 -> 4464, 1000000 -> 16960) and float32 merges (2^24 + 1, + 3)."""


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, Path]:
    """A small fixed/moving CT pair and moving labels with values beyond 16 bits (and 0, 1, 2)."""
    folder = tmp_path_factory.mktemp("reliability_inputs")
    fixed = small_torso(8.0)
    pair = make_synthetic_pair(fixed, translation_mm=(16.0, -8.0, 0.0), field_amplitude_mm=3.0)
    labels = threshold_labels(pair.moving).data.clone()
    body = torch.nonzero(labels == 2)
    for index, value in enumerate(BIG_LABELS):  # blocks of soft tissue relabelled with big values
        k, j, i = body[len(body) * (index + 1) // (len(BIG_LABELS) + 2)].tolist()
        labels[max(k - 1, 0):k + 2, max(j - 2, 0):j + 3, max(i - 2, 0):i + 3] = value
    paths = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving.nii.gz",
             "moving_labels": folder / "moving_labels.nii.gz"}
    write_image(fixed, paths["fixed"])
    write_image(pair.moving, paths["moving"])
    write_image(Image(labels, pair.moving.grid), paths["moving_labels"], sitk.sitkUInt32)
    return paths


def run_cli(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env["PYTHONIOENCODING"] = "utf-8"      # the progress bars' block characters, whatever the locale
    return subprocess.Popen([sys.executable, "-m", "SAMERegistrationLib.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")


# ----------------------------------------------------------------------------------- damaged files
def write_array(path: Path, array: np.ndarray) -> None:
    write_image(Image(torch.from_numpy(array), Grid.create(array.shape, (2.0, 2.0, 2.0))), path)


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz", "bad_crc.nii.gz", "cut.nrrd"])
def test_a_truncated_or_corrupt_nifti_is_refused_as_damaged(tmp_path, name):
    array = np.random.default_rng(0).normal(0, 100, (16, 16, 16)).astype(np.float32)
    path = tmp_path / name
    write_array(path, array)
    stored = path.read_bytes()
    if name.startswith("cut"):
        path.write_bytes(stored[:len(stored) // 2])
    else:  # the CRC of the gzip trailer no longer matches the data
        path.write_bytes(stored[:-8] + bytes(b ^ 0xFF for b in stored[-8:-4]) + stored[-4:])
    with pytest.raises(InputError, match="damaged") as error:
        read_image(path, "moving image")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_header_with_zero_spacing_is_refused(tmp_path):
    path = tmp_path / "flat.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 0 1\n"
                     b"ElementType = MET_FLOAT\nElementDataFile = LOCAL\n" + np.ones(64, np.float32).tobytes())
    with pytest.raises(InputError, match="spacing of 0 or less") as error:
        read_image(path, "fixed image")
    assert str(path) in str(error.value)


def test_a_truncated_nifti_gets_one_line_and_exit_2_from_the_cli(pair_files, tmp_path, capfd):
    cut = tmp_path / "moving.nii.gz"
    stored = pair_files["moving"].read_bytes()
    cut.write_bytes(stored[:len(stored) * 2 // 3])
    code = main([str(pair_files["fixed"]), str(cut), "-o", str(tmp_path / "out"), *FAST])
    assert_one_error_line(capfd.readouterr().err, str(cut), "damaged or incomplete")
    assert code == EXIT_BAD_INPUT


def test_the_nifti_check_streams_within_a_small_memory_cap(tmp_path):
    """A 256 MiB float32 .nii.gz (compressed to a few hundred KiB) with one NaN in its last voxel is
    checked under an address-space cap of 128 MiB more than the process holds: the check reads it
    block by block, so it finds the NaN instead of running out of memory."""
    voxels = 64 * 1024 * 1024
    path = tmp_path / "large.nii.gz"
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 1024, 256, 256, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 16, 32)  # float32
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    block = bytes(16 << 20)
    with gzip.open(path, "wb", compresslevel=1) as stream:
        stream.write(bytes(header))
        for _ in range(voxels * 4 // len(block) - 1):
            stream.write(block)
        stream.write(block[:-4] + np.float32(np.nan).tobytes())
    script = ("import resource, sys, psutil\n"
              "from pathlib import Path\n"
              "from SAMERegistrationLib.nifti import check_nifti_voxels\n"
              "from SAMERegistrationLib.errors import InputError\n"
              "cap = psutil.Process().memory_info().vms + (128 << 20)\n"
              "resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
              "try:\n"
              "    check_nifti_voxels(Path(sys.argv[1]), 'fixed image')\n"
              "except InputError as error:\n"
              "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"contains NaN values (in 1 of {voxels} voxels)" in done.stdout


# ----------------------------------------------------------------------------------- memory check on headers
def huge_header_nifti(path: Path, size: int, sparse: bool) -> Path:
    """A float32 NIfTI-1 whose header says ``size``^3 voxels of 1 mm. ``sparse``: the file has its full
    length (4 GiB for 1000^3) without taking disk space; else it is the bare 4 KiB header."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, size, size, size, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 16, 32)
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<2h", header, 252, 1, 0)  # qform_code scanner, sform_code unset
    header[344:348] = b"n+1\0"
    with open(path, "wb") as stream:
        stream.write(bytes(header) + bytes(4096 - len(header)))
        if sparse:
            stream.truncate(352 + 4 * size**3)
    return path


@pytest.mark.parametrize("role, size, sparse", [("moving", 1000, True), ("fixed", 2000, False)])
def test_a_huge_header_is_refused_on_memory_before_any_voxel_is_read(pair_files, tmp_path, role, size, sparse):
    """Under an address-space cap of 3 GiB more than the process holds (``ulimit -v``), the run is
    refused with the memory message, from the headers alone: reading the 4 GiB (or 32 GiB) image would
    break the cap."""
    huge = huge_header_nifti(tmp_path / "huge.nii", size, sparse)
    images = [str(huge), str(pair_files["moving"])] if role == "fixed" else [str(pair_files["fixed"]), str(huge)]
    script = ("import resource, sys, psutil\n"
              "from SAMERegistrationLib import cli\n"
              "cap = psutil.Process().memory_info().vms + (3 << 30)\n"
              "resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, *images, "-o", str(tmp_path / "out"), *FAST],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    line = assert_one_error_line(done.stderr, "GiB of memory", f"{size}x{size}x{size}")
    assert done.returncode == EXIT_BAD_INPUT, line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- weights
def checked_weights(path: Path, content: bytes) -> Path:
    """``content`` as a weights file with a matching ``.sha256`` (so only the loading can refuse it)."""
    path.write_bytes(content)
    path.with_suffix(".pt.sha256").write_text(f"{sha256_file(path)}  {path.name}\n")
    return path


class _RunsCode:
    def __reduce__(self):
        return (print, ("this code ran while loading",))


def damaged_header(tmp_path: Path) -> Path:
    good = tmp_path / "good.pt"
    torch.save({"config": {}, "state_dict": {"w": torch.zeros(3)}}, good)
    stored = bytearray(good.read_bytes())
    stored[:16] = bytes(16)  # the zip signature and the first fields of its header
    return checked_weights(tmp_path / "damaged.pt", bytes(stored))


def runs_code(tmp_path: Path) -> Path:
    target = tmp_path / "code.pt"
    torch.save({"config": {}, "state_dict": {}, "payload": _RunsCode()}, target)
    return checked_weights(target, target.read_bytes())


def plain_pickle(tmp_path: Path) -> Path:
    return checked_weights(tmp_path / "pickle.pt", pickle.dumps({"config": {}, "state_dict": {}}))


def config_not_a_dict(tmp_path: Path) -> Path:
    target = tmp_path / "list_config.pt"
    torch.save({"config": [1, 2], "state_dict": {}}, target)
    return checked_weights(target, target.read_bytes())


@pytest.mark.parametrize("make, expected", [(damaged_header, "cannot be loaded as plain tensors"),
                                            (runs_code, "cannot be loaded as plain tensors"),
                                            (plain_pickle, "cannot be loaded as plain tensors"),
                                            (config_not_a_dict, "not a weights file of this project")],
                         ids=["damaged header bytes", "pickle that runs code", "bare pickle", "config is a list"])
def test_bad_weights_with_a_matching_checksum_are_one_clear_error(tmp_path, make, expected, capfd):
    path = make(tmp_path)
    with pytest.raises(InputError, match=expected) as error:
        load_sam(path)
    message = str(error.value)
    assert str(path) in message and "--sam-weights" in message
    assert "\n" not in message and "weights_only" not in message
    assert "this code ran" not in capfd.readouterr().out


def test_bad_weights_get_one_line_and_exit_2_from_the_cli(pair_files, tmp_path, capfd):
    path = runs_code(tmp_path)
    code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(tmp_path / "out"),
                 "--mode", "affine", "--sam-weights", str(path), "--device", "cpu", "--quiet"])
    captured = capfd.readouterr()
    assert_one_error_line(captured.err, str(path), "cannot be loaded as plain tensors")
    assert code == EXIT_BAD_INPUT and "this code ran" not in captured.out


def test_an_empty_checksum_file_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"config": {}, "state_dict": {}}, path)
    path.with_suffix(".pt.sha256").write_text("")
    with pytest.raises(InputError, match="checksum file weights.pt.sha256 is empty or not text"):
        load_sam(path)


def test_training_cache_round_trips_as_plain_tensors(tmp_path):
    grid = Grid.create((4, 5, 6), (2.0, 2.0, 3.0), (1.0, -2.0, 3.0), np.diag([-1.0, -1.0, 1.0]))
    hu = Image(torch.randn(grid.shape), grid)
    labels = Image(torch.randint(0, 2**30, grid.shape), grid)
    scan = TrainingScan(hu, hu.data > 0, labels, hu, None, "a <- b")
    torch.save([scan.to_plain()], tmp_path / "cache.pt")
    restored = TrainingScan.from_plain(torch.load(tmp_path / "cache.pt", weights_only=True)[0])
    assert restored.hu.grid == grid and restored.labels.grid == grid and restored.moving_labels is None
    assert torch.equal(restored.labels.data, labels.data) and torch.equal(restored.moving_hu.data, hu.data)
    assert torch.equal(restored.body, scan.body) and restored.name == "a <- b"


# ----------------------------------------------------------------------------------- options and results
@pytest.mark.parametrize("spec", ["1e999*lncc", "lncc+1e400*ssd", "1.2.3*lncc"])
def test_a_similarity_weight_must_be_a_finite_number(spec):
    with pytest.raises(ValueError, match="finite number|cannot read the weight"):
        parse_similarity(spec)


def test_an_infinite_similarity_weight_is_refused_by_the_cli(pair_files, tmp_path, capfd):
    code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(tmp_path / "out"),
                 "--mode", "same", "--similarity", "1e999*lncc", "--device", "cpu", "--quiet"])
    assert_one_error_line(capfd.readouterr().err, "--similarity 1e999*lncc", "positive finite number, got inf")
    assert code == EXIT_BAD_INPUT


@pytest.mark.parametrize("option", [["--similarity", "lncc"], ["--refine-iterations", "5"]])
def test_refinement_options_with_a_mode_that_does_not_refine_are_refused(pair_files, tmp_path, capfd, option):
    code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(tmp_path / "out"), *FAST, *option])
    assert_one_error_line(capfd.readouterr().err, option[0], "has no effect with --mode intensity")
    assert code == EXIT_BAD_INPUT


@pytest.mark.parametrize("mode", ["intensity", "tvf"])
def test_a_precision_step_with_a_mode_that_has_none_is_refused(pair_files, tmp_path, capfd, mode):
    code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(tmp_path / "out"), *FAST,
                 "--mode", mode, "--precision-iterations", "10"])
    assert_one_error_line(capfd.readouterr().err, "--precision-iterations 10", f"has no effect with --mode {mode}")
    assert code == EXIT_BAD_INPUT


def test_an_initial_transform_with_nan_parameters_is_refused(tmp_path):
    path = tmp_path / "nan.h5"  # binary floats (ITK's text reader already refuses "nan")
    write_affine(np.diag([1.0, np.nan, 1.0, 1.0]), path)
    with pytest.raises(InputError, match="holds NaN or Inf parameters") as error:
        read_initial_transform(path, Grid.create((4, 4, 4), (8.0, 8.0, 8.0)))
    assert str(path) in str(error.value)


def test_a_non_finite_result_is_an_error_and_never_an_output(pair_files, tmp_path, capfd):
    """An initial transform that scales by 1e30 sends every point to infinity (float32): the run
    ends with one error line and exit 1, and no output file."""
    initial = tmp_path / "explode.tfm"
    write_affine(np.diag([1e30, 1e30, 1e30, 1.0]), initial)
    outdir = tmp_path / "out"
    code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(outdir),
                 "--initial-transform", str(initial), *FAST])
    assert_one_error_line(capfd.readouterr().err, "diverged", "non-finite")
    assert code == EXIT_FAILED
    assert sorted(os.listdir(outdir)) == []


# ----------------------------------------------------------------------------------- labels
def test_nearest_label_resampling_keeps_every_value_exactly():
    grid = Grid.create((3, 4, 5), (1.0, 1.0, 1.0))
    values = torch.tensor([0, 1, 65_535, *BIG_LABELS, 2**40 + 7])
    labels = values[torch.arange(60) % len(values)].reshape(grid.shape)
    same = resample_labels(Image(labels, grid), grid)
    assert same.data.dtype == torch.int64 and torch.equal(same.data, labels)


@pytest.mark.parametrize("largest, pixel", [(255, sitk.sitkUInt8), (65_535, sitk.sitkUInt16),
                                            (1_000_000, sitk.sitkUInt32), (2**40, sitk.sitkUInt64)])
def test_label_files_use_a_pixel_type_wide_enough(largest, pixel):
    assert label_pixel_type(largest) == pixel


@pytest.fixture(scope="module")
def labelled_run(pair_files, tmp_path_factory) -> Path:
    """One run with the big-valued labels into a folder that also holds a file of the user's."""
    outdir = tmp_path_factory.mktemp("labelled_run")
    (outdir / "notes.txt").write_text("mine\n")
    code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(outdir),
                 "--moving-labels", str(pair_files["moving_labels"]), *FAST])
    assert code == 0
    return outdir


def test_warped_labels_keep_values_beyond_16_bits(labelled_run, pair_files):
    given = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(pair_files["moving_labels"]))))
    warped_image = sitk.ReadImage(str(labelled_run / WARPED_LABELS_FILE))
    warped = np.unique(sitk.GetArrayFromImage(warped_image))
    assert warped_image.GetPixelID() == sitk.sitkUInt32
    assert set(BIG_LABELS) <= set(warped.tolist()) <= set(given.tolist())


def test_a_rerun_without_labels_removes_the_stale_outputs_only(labelled_run, pair_files, tmp_path):
    outdir = tmp_path / "rerun"
    outdir.mkdir()
    for entry in labelled_run.iterdir():
        (outdir / entry.name).write_bytes(entry.read_bytes())
    (outdir / ".partial-killed").mkdir()  # left by a run that was killed outright
    assert (outdir / WARPED_LABELS_FILE).is_file()
    code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(outdir), *FAST])
    assert code == 0
    summary = json.loads((outdir / "summary.json").read_text())
    assert sorted(os.listdir(outdir)) == sorted([*summary["files"].values(), "notes.txt"])
    assert WARPED_LABELS_FILE not in summary["files"].values()
    assert (outdir / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("name", [n for n in OUTPUT_FILES if n.endswith(".nii.gz")][:2] + [WARPED_LABELS_FILE])
def test_an_output_folder_that_holds_an_input_is_refused(pair_files, tmp_path, capfd, name):
    outdir = tmp_path / "out"
    outdir.mkdir()
    moving = outdir / name
    moving.write_bytes(pair_files["moving"].read_bytes())
    before = file_state(moving)
    code = main([str(pair_files["fixed"]), str(moving), "-o", str(outdir), *FAST])
    assert_one_error_line(capfd.readouterr().err, f"output directory {outdir}", f"holds the moving image {name}")
    assert code == EXIT_BAD_INPUT
    assert file_state(moving) == before and sorted(os.listdir(outdir)) == [name]


# ----------------------------------------------------------------------------------- SIGTERM and the lock
def test_held_signals_arrive_after_the_block():
    steps = []
    with pytest.raises(KeyboardInterrupt), terminate_like_ctrl_c():
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            steps.append("the block ran to its end")
        steps.append("not reached")
    assert steps == ["the block ran to its end"]


class _SignalledWhileCollected:
    """Sends SIGTERM to this process from its finaliser, where Python drops any exception."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt
def test_a_signal_whose_interrupt_python_drops_still_cancels_the_run():
    """A SIGTERM handled inside a finaliser loses its KeyboardInterrupt ("Exception ignored"), which
    let a cancelled worker run to its end; the cancel event is set all the same, and the next
    progress check raises RegistrationCancelled."""
    cancel = threading.Event()
    progress = Progress("test-stage", 0, 1, None, cancel)
    with terminate_like_ctrl_c(cancel):
        _SignalledWhileCollected()  # collected at once: the interrupt is raised in __del__ and dropped
        assert cancel.is_set()
        with pytest.raises(RegistrationCancelled, match="test-stage"):
            progress.update(0.5)


def test_a_signal_that_lands_in_exec_code_still_ends_with_the_programs_own_exit_code(tmp_path):
    """CPython remembers a plain KeyboardInterrupt that left ``exec``'d source code (as dataclasses
    run when a module is imported) and, under ``python -m``, ended the process with SIGINT after it
    had caught the interrupt: the cancelled worker exited -2 instead of 3. The handler's own
    exception type avoids that."""
    (tmp_path / "signalled_in_exec.py").write_text(
        "import os, signal, sys, threading\n"
        "from SAMERegistrationLib.signals import terminate_like_ctrl_c\n"
        "def main():\n"
        "    with terminate_like_ctrl_c(threading.Event()):\n"
        "        try:\n"
        "            exec('os.kill(os.getpid(), signal.SIGTERM)\\nfor _ in range(10**7): pass')\n"
        "        except KeyboardInterrupt:\n"
        "            return 3\n"
        "    return 0\n"
        "sys.exit(main())\n")
    library = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-m", "signalled_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([library, str(tmp_path)])}, timeout=120)
    assert done.returncode == 3, done.stderr


def test_sigterm_stops_the_run_cleanly_and_keeps_the_earlier_results(labelled_run, pair_files, tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    for entry in labelled_run.iterdir():
        (outdir / entry.name).write_bytes(entry.read_bytes())
    before = file_state(*outdir.iterdir())
    process = run_cli(str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(outdir),
                      *[a for a in FAST if a != "--quiet"])
    seen = ""
    while "intensity-affine" not in seen:  # progress bars on stderr
        character = process.stderr.read(1)
        assert character, f"the run ended before its affine stage:\n{seen}"
        seen += character
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == EXIT_CANCELLED, seen + rest
    assert "same-register: cancelled" in rest
    assert file_state(*outdir.iterdir()) == before  # nothing added, removed or changed, no .partial-*


def test_a_second_run_into_a_folder_in_use_is_refused(pair_files, tmp_path, capfd):
    outdir = tmp_path / "out"
    outdir.mkdir()
    with locked_output_folder(outdir):  # as a run in another process holds it
        code = main([str(pair_files["fixed"]), str(pair_files["moving"]), "-o", str(outdir), *FAST])
    assert_one_error_line(capfd.readouterr().err, f"output directory {outdir}", "another registration is writing")
    assert code == EXIT_BAD_INPUT and sorted(os.listdir(outdir)) == []
