"""The ``same-register`` command line and ``register_files``: outputs, exit codes, error messages.

Registrations here are deliberately tiny (the bundled torso CT resampled to 6 mm and cropped to a
slab of about 240 x 192 x 96 mm, registered at ``--spacing 8``) so each run takes seconds. One
successful run with labels is shared by the tests of the output folder (module-scoped fixture).

Ground truth comes from :func:`make_synthetic_pair`: ``psi`` maps moving points to fixed points, so
a perfect result ``phi`` (fixed -> moving, read back from ``transform.h5`` with SimpleITK) has
``psi(phi(x)) = x``; ``|psi(phi(x)) - x|`` is the error in mm at fixed point ``x``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.cli import EXIT_BAD_INPUT, main
from SAMERegistrationLib.errors import RegistrationCancelled
from SAMERegistrationLib.export import write_affine
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import write_image
from SAMERegistrationLib.outputs import (
    AFFINE_FILE, DISPLACEMENT_FILE, JACOBIAN_FILE, OVERVIEW_FILE, SUMMARY_FILE, TRANSFORM_FILE, WARPED_FILE,
    WARPED_LABELS_FILE,
)
from SAMERegistrationLib.pipeline.problem import RegistrationOptions
from SAMERegistrationLib.preprocess import body_mask
from SAMERegistrationLib.registration import RegistrationRequest, register_files
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.synthetic import SyntheticPair, make_synthetic_pair
from sample_cases import LABEL_NAMES, small_torso, threshold_labels

REPO = Path(__file__).resolve().parent.parent
TORSO = REPO / "Resources" / "SampleData" / "patientA_torso_ct.nii.gz"

VOXEL_MM = 6.0
CROP_MM = (240.0, 192.0, 96.0)
"""Physical size (x, y, z) of the test image: registration time grows with it (working grids are in mm)."""
FAST = ["--mode", "intensity", "--spacing", "8", "--threads", "1", "--device", "cpu"]
"""One thread: on the 2 shared cores of the test machines, 2 PyTorch threads next to any other busy
process run several times slower (measured 13 s instead of 4-5 s per registration), 1 does not."""

RESULT_FILES = {TRANSFORM_FILE, AFFINE_FILE, DISPLACEMENT_FILE, WARPED_FILE, JACOBIAN_FILE,
                WARPED_LABELS_FILE, SUMMARY_FILE, OVERVIEW_FILE}
ALL_STAGES = ["initial-alignment", "intensity-affine", "intensity-deformable"]


# ----------------------------------------------------------------------------------- data
def file_state(*paths: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of each file, to prove inputs are left untouched."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


@dataclass(frozen=True)
class Inputs:
    folder: Path
    fixed: Path
    moving: Path
    fixed_labels: Path
    moving_labels: Path
    initial_transform: Path
    pair: SyntheticPair
    body_points: torch.Tensor
    """(N, 3) float64 LPS voxel centres of the fixed body mask."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    folder = tmp_path_factory.mktemp("cli_inputs")
    fixed = small_torso(VOXEL_MM, CROP_MM)
    pair = make_synthetic_pair(fixed, translation_mm=(60.0, -20.0, 10.0), field_amplitude_mm=4.0)
    labels = threshold_labels(fixed)
    moving_labels = resample_labels(labels, pair.moving.grid, pair.psi)
    paths = {name: folder / f"{name}.nii.gz" for name in ("fixed", "moving", "fixed_labels", "moving_labels")}
    write_image(fixed, paths["fixed"])
    write_image(pair.moving, paths["moving"])
    write_image(labels, paths["fixed_labels"], sitk.sitkUInt8)
    write_image(moving_labels, paths["moving_labels"], sitk.sitkUInt8)
    (folder / "label_names.json").write_text(json.dumps({str(k): v for k, v in LABEL_NAMES.items()}))
    initial = folder / "initial.tfm"
    write_affine(np.linalg.inv(pair.psi.affine), initial)  # psi.affine is moving -> fixed
    body = body_mask(fixed, True).data.bool()
    points = fixed.grid.world_points(dtype=torch.float64)[body]
    return Inputs(folder, initial_transform=initial, pair=pair, body_points=points, **paths)


def run_main(argv: list[str]) -> tuple[int, str, str, float]:
    """main(argv) in-process: (exit code, stdout, stderr, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def sitk_map(transform: sitk.Transform, points: torch.Tensor) -> torch.Tensor:
    return torch.tensor([transform.TransformPoint(tuple(p)) for p in points.tolist()], dtype=torch.float64)


def errors_mm(pair: SyntheticPair, transform: sitk.Transform | None, points: torch.Tensor) -> np.ndarray:
    """``|psi(phi(x)) - x|`` with phi a SimpleITK transform (None: identity, i.e. before registration)."""
    mapped = points if transform is None else sitk_map(transform, points)
    with torch.no_grad():
        return (pair.psi.map_points(mapped) - points).norm(dim=-1).numpy()


def result_entries(folder: Path) -> list[str]:
    """Everything (hidden entries included) in an output folder; [] when it does not exist."""
    return sorted(os.listdir(folder)) if folder.is_dir() else []


# ----------------------------------------------------------------------------------- one successful run
@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    outdir: Path
    inputs_before: dict
    inputs_after: dict


@pytest.fixture(scope="module")
def registered(inputs, tmp_path_factory) -> Run:
    outdir = tmp_path_factory.mktemp("cli_run") / "results"  # created by the CLI
    given = (inputs.fixed, inputs.moving, inputs.fixed_labels, inputs.moving_labels)
    before = file_state(*given)
    code, stdout, stderr, seconds = run_main(
        [str(inputs.fixed), str(inputs.moving), "-o", str(outdir), "--fixed-labels", str(inputs.fixed_labels),
         "--moving-labels", str(inputs.moving_labels), *FAST])
    return Run(code, stdout, stderr, seconds, outdir, before, file_state(*given))


def test_run_succeeds_and_writes_exactly_the_result_files(registered):
    assert registered.code == 0, registered.stderr
    assert "Registered in" in registered.stdout and str(registered.outdir) in registered.stdout
    assert "same-register: error" not in registered.stderr
    # exactly the documented files: no leftover .partial-* staging folder or write probe
    assert set(result_entries(registered.outdir)) == RESULT_FILES
    assert all((registered.outdir / name).stat().st_size > 0 for name in RESULT_FILES)
    assert (registered.outdir / OVERVIEW_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert registered.inputs_after == registered.inputs_before, "a user input file was modified"
    print(f"\nregistration run: {registered.seconds:.1f} s")


def test_output_images_are_on_the_fixed_grid(registered, inputs):
    assert registered.code == 0
    fixed = sitk.ReadImage(str(inputs.fixed))
    for name, components in ((WARPED_FILE, 1), (JACOBIAN_FILE, 1), (WARPED_LABELS_FILE, 1), (DISPLACEMENT_FILE, 3)):
        image = sitk.ReadImage(str(registered.outdir / name))
        assert image.GetDimension() == 3, name
        assert image.GetSize() == fixed.GetSize(), name
        assert image.GetNumberOfComponentsPerPixel() == components, name
        np.testing.assert_allclose(image.GetSpacing(), fixed.GetSpacing(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-3, err_msg=name)
        np.testing.assert_allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-6, err_msg=name)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(registered.outdir / WARPED_LABELS_FILE)))
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(registered.outdir / JACOBIAN_FILE)))).all()


def test_transform_file_and_displacement_field_agree(registered, inputs):
    """transform.h5 (affine + field) and displacement.nii.gz (x + d(x)) map fixed points alike."""
    assert registered.code == 0
    whole = sitk.ReadTransform(str(registered.outdir / TRANSFORM_FILE))
    field = sitk.ReadImage(str(registered.outdir / DISPLACEMENT_FILE))
    as_field = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    chosen = np.random.default_rng(0).choice(len(inputs.body_points), 100, replace=False)
    points = inputs.body_points[chosen]  # voxel centres of the fixed grid, inside the body
    gap = (sitk_map(whole, points) - sitk_map(as_field, points)).norm(dim=-1)
    moved = (sitk_map(whole, points) - points).norm(dim=-1)
    print(f"\ntransform.h5 vs displacement.nii.gz at 100 body voxels: max {float(gap.max()):.2e} mm "
          f"(points move {float(moved.median()):.1f} mm median)")
    assert float(gap.max()) < 0.1
    assert float(moved.median()) > 10.0  # not trivially the identity


def test_transform_file_reproduces_the_warped_image(registered, inputs):
    assert registered.code == 0
    moving = sitk.ReadImage(str(inputs.moving))
    warped = sitk.ReadImage(str(registered.outdir / WARPED_FILE))
    transform = sitk.ReadTransform(str(registered.outdir / TRANSFORM_FILE))
    resampled = sitk.Resample(moving, warped, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    difference = np.abs(sitk.GetArrayFromImage(resampled) - sitk.GetArrayFromImage(warped))
    body = body_mask(Image.from_sitk(sitk.ReadImage(str(inputs.fixed))), True).numpy().astype(bool)
    inside = float(difference[body].mean())
    print(f"\n|Resample(moving, transform.h5) - warped|: mean {inside:.4f} HU inside the body, "
          f"max {float(difference[body].max()):.4f} HU, mean {float(difference.mean()):.4f} HU overall")
    assert inside < 5.0
    assert float(np.percentile(difference[body], 99)) < 50.0


def test_summary_reports_stages_jacobian_and_dice(registered, inputs):
    assert registered.code == 0
    summary = json.loads((registered.outdir / SUMMARY_FILE).read_text())
    assert summary["mode"] == "intensity"
    assert summary["device"] == "cpu"
    assert summary["working_spacing_mm"] == 8.0
    assert summary["threads"] == 1  # --threads reached PyTorch
    assert [stage["name"] for stage in summary["stages"]] == ALL_STAGES
    for stage in summary["stages"]:
        assert stage["seconds"] > 0.0, stage["name"]
        assert stage["peak_host_memory_mib"] > 0.0, stage["name"]
    jacobian = summary["jacobian"]
    for key in ("percent_nonpositive", "std_jacobian", "std_log_jacobian"):
        assert np.isfinite(jacobian[key]), key
    assert 0.0 <= jacobian["percent_nonpositive"] <= 100.0
    assert jacobian["std_jacobian"] >= 0.0 and jacobian["std_log_jacobian"] >= 0.0
    dice = summary["dice"]
    assert set(dice["per_label"]) == {"1", "2"}
    assert all(0.0 <= value <= 1.0 for value in dice["per_label"].values())
    assert dice["mean"] == pytest.approx(np.mean(list(dice["per_label"].values())), abs=1e-3)
    assert dice["mean"] > dice["mean_before_registration"]
    # names from the label_names.json beside the label maps
    assert dice["label_names"] == {"1": "bone", "2": "soft tissue"}
    assert set(summary["files"]) >= {"transform", "affine", "displacement", "warped", "jacobian",
                                     "warped_labels", "summary", "overview"}
    # the Dice in the summary is the Dice of the written warped labels
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs.fixed_labels)))
    warped_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(registered.outdir / WARPED_LABELS_FILE)))
    for label, value in dice["per_label"].items():
        a, b = fixed_labels == int(label), warped_labels == int(label)
        assert 2.0 * (a & b).sum() / (a.sum() + b.sum()) == pytest.approx(value, abs=1e-3)
    print(f"\nstages: {[(s['name'], s['seconds'], s['peak_host_memory_mib']) for s in summary['stages']]}\n"
          f"jacobian: {jacobian}\ndice: {dice}")


def test_registration_recovers_the_known_deformation(registered, inputs):
    """Median |psi(phi(x)) - x| over the fixed body, phi read back from transform.h5 by SimpleITK."""
    assert registered.code == 0
    transform = sitk.ReadTransform(str(registered.outdir / TRANSFORM_FILE))
    before = errors_mm(inputs.pair, None, inputs.body_points)
    after = errors_mm(inputs.pair, transform, inputs.body_points)
    print(f"\nerror over {len(after)} body voxels: median {np.median(before):.2f} mm before, "
          f"{np.median(after):.2f} mm after (95th percentile {np.percentile(after, 95):.2f} mm)")
    assert np.median(before) > 40.0
    assert np.median(after) < 4.0
    assert np.median(after) < np.median(before) / 10.0


# ----------------------------------------------------------------------------------- initial transform
def test_initial_transform_skips_the_initial_alignment(inputs, tmp_path):
    outdir = tmp_path / "results"
    code, _, stderr, seconds = run_main([str(inputs.fixed), str(inputs.moving), "-o", str(outdir),
                                         "--initial-transform", str(inputs.initial_transform), "--quiet",
                                         "--no-overview", *FAST])
    assert code == 0, stderr
    summary = json.loads((outdir / SUMMARY_FILE).read_text())
    assert [stage["name"] for stage in summary["stages"]] == ["intensity-affine", "intensity-deformable"]
    assert "initial-alignment" not in {stage["name"] for stage in summary["stages"]}
    assert set(result_entries(outdir)) == RESULT_FILES - {WARPED_LABELS_FILE, OVERVIEW_FILE}
    transform = sitk.ReadTransform(str(outdir / TRANSFORM_FILE))
    after = errors_mm(inputs.pair, transform, inputs.body_points)
    print(f"\n--initial-transform run: {seconds:.1f} s, median error {np.median(after):.2f} mm")
    assert np.median(after) < 4.0


# ----------------------------------------------------------------------------------- bad input
def _garbage(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    path = folder / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return [str(inputs.fixed), str(path)], path


def _missing(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    path = folder / "no_such_scan.nii.gz"
    return [str(path), str(inputs.moving)], path


def _two_d(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    path = folder / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (20, 30)).astype(np.float32)),
                    str(path))
    return [str(inputs.fixed), str(path)], path


def _four_d(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    path = folder / "series.nii.gz"
    volume = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (8, 9, 10)).astype(np.float32))
    sitk.WriteImage(sitk.JoinSeries([volume] * 3), str(path))  # three time points: 10x9x8x3
    return [str(path), str(inputs.moving)], path


def _with_values(folder: Path, inputs: Inputs, name: str, change) -> Path:
    image = sitk.ReadImage(str(inputs.moving))
    array = sitk.GetArrayFromImage(image)
    change(array)
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    path = folder / name
    sitk.WriteImage(changed, str(path))
    return path


def _constant(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    path = _with_values(folder, inputs, "constant.nii.gz", lambda a: a.fill(-1000.0))
    return [str(inputs.fixed), str(path)], path


def _nan(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    def poke(array):
        array[3, 4, 5] = np.nan
    # NRRD, not NIfTI: ITK 5's NIfTI reader silently turns NaN into 0 (fixed in ITK 6, ITK PR #6683)
    path = _with_values(folder, inputs, "with_nan.nrrd", poke)
    return [str(inputs.fixed), str(path)], path


def _labels_off_grid(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    labels = sitk.ReadImage(str(inputs.fixed_labels))
    labels.SetOrigin(tuple(o + 1000.0 for o in labels.GetOrigin()))
    path = folder / "shifted_labels.nii.gz"
    sitk.WriteImage(labels, str(path))
    return [str(inputs.fixed), str(inputs.moving), "--fixed-labels", str(path)], path


def _bad_initial_transform(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    path = folder / "initial.tfm"
    path.write_text("this is not an ITK transform\n")
    return [str(inputs.fixed), str(inputs.moving), "--initial-transform", str(path)], path


def _empty_moving_mask(folder: Path, inputs: Inputs) -> tuple[list[str], Path]:
    path = _with_values(folder, inputs, "empty_mask.nii.gz", lambda a: a.fill(0.0))
    return [str(inputs.fixed), str(inputs.moving), "--moving-mask", str(path)], path


BAD_INPUTS = {
    "empty moving mask": (_empty_moving_mask, "moving mask"),
    "unreadable file": (_garbage, "cannot be read"),
    "missing file": (_missing, "does not exist"),
    "2-D image": (_two_d, "2-D"),
    "4-D image": (_four_d, "4-D"),
    "constant image": (_constant, "constant"),
    "NaN values": (_nan, "NaN"),
    "labels away from their image": (_labels_off_grid, "does not overlap"),
    "unreadable initial transform": (_bad_initial_transform, "initial transform"),
}

BAD_OPTIONS = {
    "unknown device": (["--device", "tpu"], ("--device tpu", "unknown device")),
    "negative refinement iterations": (["--mode", "same", "--refine-iterations", "-1"], ("--refine-iterations -1",)),
    "negative precision iterations": (["--mode", "same", "--precision-iterations", "-2"],
                                      ("--precision-iterations -2",)),
    "unknown similarity term": (["--mode", "same", "--similarity", "lncc+nmi"], ("--similarity", "unknown term 'nmi'")),
    "zero spacing": (["--spacing", "0"], ("--spacing 0",)),
}


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("same-register: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_file_exits_2_with_one_line(case, inputs, tmp_path, capfd):
    make, expected = BAD_INPUTS[case]
    argv, culprit = make(tmp_path, inputs)
    outdir = tmp_path / "results"
    outdir.mkdir()
    code = main([*argv, "-o", str(outdir), "--device", "cpu", "--spacing", "8"])
    line = assert_one_error_line(capfd.readouterr().err, str(culprit), expected)
    assert code == EXIT_BAD_INPUT, line
    assert result_entries(outdir) == []


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_exits_2_with_one_line(case, inputs, tmp_path, capfd):
    options, expected = BAD_OPTIONS[case]
    outdir = tmp_path / "results"
    outdir.mkdir()
    code = main([str(inputs.fixed), str(inputs.moving), "-o", str(outdir), "--spacing", "8", *options])
    assert_one_error_line(capfd.readouterr().err, *expected)
    assert code == EXIT_BAD_INPUT
    assert result_entries(outdir) == []


def test_cuda_without_a_gpu_is_a_bad_input(inputs, tmp_path, capfd):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    outdir = tmp_path / "results"
    code = main([str(inputs.fixed), str(inputs.moving), "-o", str(outdir), "--device", "cuda"])
    assert_one_error_line(capfd.readouterr().err, "--device cuda")
    assert code == EXIT_BAD_INPUT
    assert result_entries(outdir) == []


BAD_COMMAND_LINES = {
    "unknown mode": (["FIXED", "MOVING", "-o", "OUT", "--mode", "bogus"], ("--mode", "bogus")),
    "missing -o": (["FIXED", "MOVING"], ("-o/--output", "required")),
    "missing moving image": (["FIXED", "-o", "OUT"], ("moving", "required")),
    "unknown option": (["FIXED", "MOVING", "-o", "OUT", "--iterations", "5"], ("unrecognized arguments", "--iterations")),
    "threads not a number": (["FIXED", "MOVING", "-o", "OUT", "--threads", "two"], ("--threads", "'two'")),
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_bad_command_line_exits_2_with_one_line(case, inputs, tmp_path, capfd):
    """argparse's errors take the same one-line form as bad files (no usage block)."""
    template, expected = BAD_COMMAND_LINES[case]
    outdir = tmp_path / "results"
    values = {"FIXED": str(inputs.fixed), "MOVING": str(inputs.moving), "OUT": str(outdir)}
    with pytest.raises(SystemExit) as exit_info:
        main([values.get(item, item) for item in template])
    assert exit_info.value.code == EXIT_BAD_INPUT
    line = assert_one_error_line(capfd.readouterr().err, *expected)
    assert line.endswith(": see 'same-register --help'")
    assert not outdir.exists()


def test_version_prints_the_package_version(capfd):
    import SAMERegistrationLib

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capfd.readouterr().out.strip() == f"same-register {SAMERegistrationLib.__version__}"


def test_output_path_that_is_a_file_is_refused_and_inputs_are_untouched(inputs, tmp_path, capfd):
    """Every input is read (images, both label maps, the initial transform) before the output
    folder is refused; none of them, nor the file given as -o, is changed."""
    not_a_folder = tmp_path / "results.txt"
    not_a_folder.write_text("keep me\n")
    given = (inputs.fixed, inputs.moving, inputs.fixed_labels, inputs.moving_labels, inputs.initial_transform,
             not_a_folder)
    before = file_state(*given)
    time.sleep(0.01)
    code = main([str(inputs.fixed), str(inputs.moving), "-o", str(not_a_folder),
                 "--fixed-labels", str(inputs.fixed_labels), "--moving-labels", str(inputs.moving_labels),
                 "--initial-transform", str(inputs.initial_transform), *FAST])
    assert_one_error_line(capfd.readouterr().err, "output directory", str(not_a_folder))
    assert code == EXIT_BAD_INPUT
    assert file_state(*given) == before
    assert sorted(os.listdir(tmp_path)) == ["results.txt"]


# ----------------------------------------------------------------------------------- cancel
def test_cancel_during_the_affine_stage_leaves_no_outputs(inputs, tmp_path):
    outdir = tmp_path / "results"
    cancel = threading.Event()
    seen: list[tuple[str, float]] = []

    def on_progress(event):
        seen.append((event.stage, event.fraction))
        if event.stage == "intensity-affine" and event.fraction > 0.0:
            cancel.set()

    request = RegistrationRequest(
        fixed=inputs.fixed, moving=inputs.moving, output_dir=outdir, moving_labels=inputs.moving_labels,
        fixed_labels=inputs.fixed_labels, mode="intensity", device="cpu",
        options=RegistrationOptions(spacing=8.0, threads=1))
    with pytest.raises(RegistrationCancelled):
        register_files(request, on_progress=on_progress, cancel=cancel)
    assert cancel.is_set()
    stages = [stage for stage, _ in seen]
    assert ("initial-alignment", 1.0) in seen  # the first stage finished ...
    assert stages[-1] == "intensity-affine" and "intensity-deformable" not in stages  # ... the second did not
    assert max(fraction for stage, fraction in seen if stage == "intensity-affine") < 1.0
    assert result_entries(outdir) == []  # no result files, no hidden staging folder


# ----------------------------------------------------------------------------------- console script
def test_console_script_registers_scans_that_do_not_overlap(tmp_path):
    """Scans 400 mm apart along S share no physical space: that is normal input (exit 0, low error).
    Runs the real entry point in a subprocess so the exit code reaches the shell."""
    fixed = small_torso(VOXEL_MM, CROP_MM)
    pair = make_synthetic_pair(fixed, rotation_deg=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0),
                               translation_mm=(0.0, 0.0, 400.0), field_amplitude_mm=2.0)
    fixed_z, moving_z = fixed.grid.corners_world()[:, 2], pair.moving.grid.corners_world()[:, 2]
    assert moving_z.max() < fixed_z.min() or moving_z.min() > fixed_z.max()
    write_image(fixed, tmp_path / "fixed.nii.gz")
    write_image(pair.moving, tmp_path / "moving.nii.gz")
    outdir = tmp_path / "results"
    command = [sys.executable, "-m", "SAMERegistrationLib.cli", str(tmp_path / "fixed.nii.gz"),
               str(tmp_path / "moving.nii.gz"), "-o", str(outdir), "--quiet", "--no-overview", *FAST]
    start = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert finished.returncode == 0, finished.stderr
    assert "Registered in" in finished.stdout
    transform = sitk.ReadTransform(str(outdir / TRANSFORM_FILE))
    points = fixed.grid.world_points(dtype=torch.float64)[body_mask(fixed, True).data.bool()]
    before, after = errors_mm(pair, None, points), errors_mm(pair, transform, points)
    print(f"\nnon-overlapping scans via subprocess: {seconds:.1f} s, median error {np.median(before):.1f} mm "
          f"before, {np.median(after):.2f} mm after")
    assert np.median(after) < 4.0


def test_console_script_exit_code_for_bad_input(tmp_path):
    script = Path(sys.executable).parent / "same-register"
    if not script.exists():
        found = shutil.which("same-register")
        if found is None:
            pytest.skip("the same-register console script is not installed")
        script = Path(found)
    missing = tmp_path / "missing.nii.gz"
    finished = subprocess.run([str(script), str(missing), str(missing), "-o", str(tmp_path / "results")],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == EXIT_BAD_INPUT
    assert_one_error_line(finished.stderr, str(missing), "does not exist")
    assert not (tmp_path / "results").exists()


def test_thread_settings_are_restored_after_a_run(inputs, tmp_path):
    """--threads applies to the run only: inside Slicer the process's settings must not change."""
    torch_threads = torch.get_num_threads()
    sitk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    code, _, _, _ = run_main([str(inputs.fixed), str(inputs.moving), "-o", str(tmp_path / "out"), "--quiet",
                              "--no-overview", "--mode", "intensity", "--spacing", "8", "--threads", str(torch_threads + 1)])
    assert code == 0
    assert torch.get_num_threads() == torch_threads
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == sitk_threads
