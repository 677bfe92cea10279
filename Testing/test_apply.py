"""``same-apply``: a saved transform applied to other images reproduces same-register's outputs,
reads the inverse transform exactly, and reports bad input in one line with exit code 2.

The registration is the tiny 8 mm synthetic pair of :mod:`sample_cases` (a few seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import SAMERegistrationLib
from SAMERegistrationLib.apply import main
from SAMERegistrationLib.command_line import EXIT_BAD_INPUT
from SAMERegistrationLib.export import write_transform
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import write_image
from SAMERegistrationLib.outputs import TRANSFORM_FILE, WARPED_FILE, WARPED_LABELS_FILE, warp_image
from SAMERegistrationLib.pipeline.problem import RegistrationOptions
from SAMERegistrationLib.registration import RegistrationRequest, register_files
from SAMERegistrationLib.spatial.transform import InverseTransform
from sample_cases import FAST_MODE, FAST_OPTIONS, tiny_pair, write_tiny_pair


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    folder = tmp_path_factory.mktemp("apply")
    paths = write_tiny_pair(folder)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in FAST_OPTIONS.items()}
    register_files(RegistrationRequest(paths["fixed"], paths["moving"], folder / "out", mode=FAST_MODE,
                                       moving_labels=paths["moving_labels"], fixed_labels=paths["fixed_labels"],
                                       device="cpu", overview=False, options=RegistrationOptions(**options)))
    return paths, folder / "out"


def arrays_and_geometry(path: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), (image.GetOrigin(), image.GetSpacing(), image.GetDirection(),
                                           image.GetPixelID())


def test_applied_to_the_moving_labels_it_reproduces_warped_labels_exactly(registered, tmp_path, capsys):
    paths, outdir = registered
    output = tmp_path / "labels.nii.gz"
    code = main([str(outdir / TRANSFORM_FILE), str(paths["moving_labels"]), "-r", str(paths["fixed"]),
                 "-o", str(output), "--interpolation", "nearest"])
    assert code == 0, capsys.readouterr().err
    applied, geometry = arrays_and_geometry(output)
    expected, expected_geometry = arrays_and_geometry(outdir / WARPED_LABELS_FILE)
    assert np.array_equal(applied, expected)
    assert geometry == expected_geometry
    assert len(np.unique(applied)) == 3  # background, bone, soft tissue: not trivially empty


def test_applied_to_the_moving_image_it_reproduces_warped_exactly(registered, tmp_path, capsys):
    paths, outdir = registered
    output = tmp_path / "warped.nrrd"
    code = main([str(outdir / TRANSFORM_FILE), str(paths["moving"]), "-r", str(paths["fixed"]), "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    applied, _ = arrays_and_geometry(output)
    expected, _ = arrays_and_geometry(outdir / WARPED_FILE)
    assert np.array_equal(applied, expected)


def test_an_inverse_transform_file_is_read_exactly(tmp_path, capsys):
    """inverse_transform.h5's form (an affine, then a field) maps moving-grid points as the
    InverseTransform it was written from: same-apply's output equals warping with that object."""
    data = tiny_pair()
    grid = data.moving.grid.with_spacing(16.0)
    z, y, x = torch.meshgrid(*(torch.linspace(0, 3.0, n) for n in grid.shape), indexing="ij")
    field = torch.stack((4.0 * torch.sin(y), -3.0 * torch.cos(x), 2.0 * torch.sin(z + x)))
    affine = np.eye(4)
    affine[:3, 3] = (-30.0, 12.0, 5.0)
    inverse = InverseTransform(affine, field.float(), grid)
    write_transform(inverse, tmp_path / "inverse_transform.h5")
    # NRRD keeps the geometry in double precision (NIfTI rounds it to float32)
    write_image(data.fixed, tmp_path / "fixed.nrrd")
    write_image(data.moving, tmp_path / "moving.nrrd")
    output = tmp_path / "fixed_on_moving.nii.gz"
    code = main([str(tmp_path / "inverse_transform.h5"), str(tmp_path / "fixed.nrrd"),
                 "-r", str(tmp_path / "moving.nrrd"), "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    applied, _ = arrays_and_geometry(output)
    expected = warp_image(data.fixed, data.moving.grid, inverse).numpy()
    np.testing.assert_array_equal(applied, expected)
    assert np.abs(applied - warp_image(data.fixed, data.moving.grid, None).numpy()).max() > 100.0  # it moved


def _line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("same-apply: error:"), lines[0]
    return lines[0]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(registered, tmp_path, capsys):
    paths, outdir = registered
    output = tmp_path / "out.nii.gz"
    missing = tmp_path / "missing.h5"
    assert main([str(missing), str(paths["moving"]), "-r", str(paths["fixed"]), "-o", str(output)]) == EXIT_BAD_INPUT
    assert str(missing) in _line(capsys.readouterr().err) and not output.exists()
    before = paths["moving"].read_bytes()
    code = main([str(outdir / TRANSFORM_FILE), str(paths["moving"]), "-r", str(paths["fixed"]), "-o", str(paths["moving"])])
    assert code == EXIT_BAD_INPUT
    assert "is the input file" in _line(capsys.readouterr().err)
    assert paths["moving"].read_bytes() == before


@pytest.mark.parametrize("argv, fragment", [
    (["T", "I", "-o", "O"], "-r/--reference"),
    (["T", "I", "-r", "R", "-o", "O", "--interpolation", "cubic"], "--interpolation"),
])
def test_bad_command_line_exits_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert fragment in _line(capsys.readouterr().err)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"same-apply {SAMERegistrationLib.__version__}"
