"""Registering two image files into an output folder: the one entry point of the CLI and Slicer.

:func:`register_files` checks the inputs' headers against the memory available, reads and checks
every input (raising :class:`InputError` before any work), runs the mode's pipeline with progress
and cancellation, refuses a non-finite result, and writes the output folder (locked for the run).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError, RegistrationCancelled, RegistrationFailed
from .export import read_initial_transform
from .image import Image
from .learning.objective import parse_similarity
from .io import ImageHeader, check_output_directory, read_header, read_image, read_labels, read_mask
from .label_names import label_names_beside, read_label_names
from .modes import DEFAULT_MODE, REFINING_MODES, TVF_MODES, ModeSettings, build_pipeline
from .output_folder import check_inputs_outside, locked_output_folder
from .outputs import (OUTPUT_FILES, compute_inverse_images, compute_result_images, inverse_consistency_summary,
                      jacobian_summary, label_summary, write_output_folder)
from .pipeline.memory import available_host_memory
from .pipeline.problem import RegistrationOptions, RegistrationProblem, resolve_device
from .pipeline.progress import ProgressCallback
from .pipeline.runner import RegistrationPipeline
from .spatial.grid import Grid
from .spatial.transform import SpatialTransform
from .spatial.warp import LabelMethod, resample_image, resample_labels
from .stages.tvf import TimeDependentVelocityFields

_BYTES_PER_WORKING_VOXEL = 400
"""Generous bound of the stages' memory per working-grid voxel (fp32, autograd, Adam state); the
benchmark's peaks (README) stay below it."""
_BYTES_PER_FIXED_VOXEL = 80
"""Outputs on the fixed grid: points, displacement, Jacobian, warped image and labels."""
_BYTES_PER_MOVING_VOXEL = 16
"""The full-resolution moving image while the result is computed (float32, and its shifted copy
while it is resampled)."""
_BYTES_PER_INVERSE_VOXEL = 144
"""Modes with an inverse: its displacement and Jacobian on the moving grid (a peak of 146 bytes per
voxel measured with ``PeakMemory`` around ``compute_inverse_images`` on a 160x256x256 grid)."""


@dataclass(frozen=True)
class RegistrationRequest:
    """What a user asks for. Paths are files (or a DICOM folder for images); optional ones may be None.

    ``label_names`` is a JSON file naming the label values (see :func:`read_label_names`); without
    it, the ``label_names.json`` beside the moving (else the fixed) label map is used when there is one.
    """

    fixed: str | os.PathLike
    moving: str | os.PathLike
    output_dir: str | os.PathLike
    mode: str = DEFAULT_MODE
    moving_labels: str | os.PathLike | None = None
    fixed_labels: str | os.PathLike | None = None
    label_names: str | os.PathLike | None = None
    fixed_mask: str | os.PathLike | None = None
    moving_mask: str | os.PathLike | None = None
    initial_transform: str | os.PathLike | None = None
    sam_weights: str | os.PathLike | None = None
    vm_weights: str | os.PathLike | None = None
    tvf_weights: str | os.PathLike | None = None
    sam_coarse: bool = True
    refine_iterations: int | None = None
    similarity: str | None = None
    precision_iterations: int | None = None
    device: str = "auto"
    label_method: LabelMethod = "nearest"
    overview: bool = True
    options: RegistrationOptions = field(default_factory=RegistrationOptions)


def register_files(request: RegistrationRequest, on_progress: ProgressCallback | None = None,
                   cancel: threading.Event | None = None) -> dict:
    """Runs one registration and returns the summary (also written to ``summary.json``).

    Raises:
        InputError: a bad input, option or output folder, more memory needed than is available, or
            another run writing into the same folder (nothing is written).
        RegistrationCancelled: ``cancel`` was set (no output file is written).
        RegistrationFailed: the result holds non-finite values (no output file is written).
    """
    started = time.perf_counter()
    check_request(request)
    device = resolve_device(request.device)
    headers = {role: read_header(path, role) for role, path in _image_inputs(request).items()}
    check_memory(headers["fixed image"].grid, headers["moving image"].grid, request.options.spacing, device,
                 input_bytes=_input_bytes(headers), inverse=request.mode in TVF_MODES)
    pipeline = build_pipeline(request.mode, has_initial_transform=request.initial_transform is not None,
                              settings=ModeSettings(request.sam_weights, request.vm_weights, request.tvf_weights,
                                                    request.sam_coarse, request.refine_iterations,
                                                    request.similarity, request.precision_iterations))
    inputs = load_inputs(request)
    outdir = check_output_directory(request.output_dir)
    check_inputs_outside(outdir, _file_inputs(request), OUTPUT_FILES)
    with locked_output_folder(outdir), _thread_count(request.options.threads):
        return _register(request, inputs, pipeline, device, outdir, started, on_progress, cancel)


def _image_inputs(request: RegistrationRequest) -> dict[str, str | os.PathLike]:
    """{role: path} of the request's images, label maps and mask (those given)."""
    paths = {"fixed image": request.fixed, "moving image": request.moving, "moving labels": request.moving_labels,
             "fixed labels": request.fixed_labels, "fixed mask": request.fixed_mask}
    return {role: path for role, path in paths.items() if path is not None}


def _file_inputs(request: RegistrationRequest) -> dict[str, str | os.PathLike]:
    """{role: path} of every file the request reads."""
    paths = {"initial transform": request.initial_transform, "SAM weights": request.sam_weights,
             "SAM-VoxelMorph weights": request.vm_weights, "TVF weights": request.tvf_weights}
    return {**_image_inputs(request), **{role: path for role, path in paths.items() if path is not None}}


def _input_bytes(headers: dict[str, ImageHeader]) -> int:
    """Memory for reading the inputs: the largest file twice in its own pixel type while it is read
    (ITK's image and the array copy) next to the images (float32) and label maps (int64) kept."""
    reading = max(header.num_voxels * 2 * header.bytes_per_voxel for header in headers.values())
    kept = sum(header.num_voxels * (4 if role.endswith("image") else 8) for role, header in headers.items())
    return reading + kept


@dataclass(frozen=True)
class LoadedInputs:
    """Every input of a request, read and checked (optional ones None)."""

    fixed: Image
    moving: Image
    moving_labels: Image | None
    fixed_labels: Image | None
    fixed_mask: Image | None
    moving_mask: Image | None
    initial: SpatialTransform | None
    label_names: dict[int, str]


def load_inputs(request: RegistrationRequest) -> LoadedInputs:
    """Reads and checks every file of ``request``; raises InputError naming the first bad one."""
    fixed = read_image(request.fixed, "fixed image")
    moving = read_image(request.moving, "moving image")
    initial = None
    if request.initial_transform is not None:
        initial = read_initial_transform(request.initial_transform, fixed.grid.with_spacing(request.options.spacing))
    return LoadedInputs(
        fixed=fixed,
        moving=moving,
        moving_labels=None if request.moving_labels is None else read_labels(request.moving_labels, moving, "moving labels"),
        fixed_labels=None if request.fixed_labels is None else read_labels(request.fixed_labels, fixed, "fixed labels"),
        fixed_mask=None if request.fixed_mask is None else read_mask(request.fixed_mask, fixed, "fixed mask"),
        moving_mask=None if request.moving_mask is None else read_mask(request.moving_mask, moving, "moving mask"),
        initial=initial,
        label_names=(label_names_beside(request.moving_labels, request.fixed_labels) if request.label_names is None
                     else read_label_names(request.label_names)),
    )


@contextmanager
def _thread_count(threads: int | None):
    """Sets PyTorch's and SimpleITK's thread counts for the block and restores them afterwards
    (the process may be Slicer, whose settings must not change)."""
    if threads is None:
        yield
        return
    torch_threads = torch.get_num_threads()
    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


def _register(request: RegistrationRequest, inputs: LoadedInputs, pipeline: RegistrationPipeline,
              device: torch.device, outdir: Path, started: float, on_progress: ProgressCallback | None,
              cancel: threading.Event | None) -> dict:
    """The registration proper and its outputs, once every input has been read and checked."""
    options = request.options
    fixed, moving = inputs.fixed, inputs.moving
    problem = RegistrationProblem(fixed, moving, fixed_mask=inputs.fixed_mask, options=options, device=device,
                                  moving_mask=inputs.moving_mask)
    result = pipeline.run(problem, inputs.initial, on_progress, cancel)
    registration_seconds = time.perf_counter() - started

    images = compute_result_images(fixed, moving, result.transform, inputs.moving_labels, request.label_method)
    _check_finite("the transform", result.transform.affine, images.displacement, images.jacobian)
    body = resample_image(problem.fixed_body_mask(), fixed.grid, interpolation="nearest")
    summary = {
        "mode": request.mode,
        "fixed": str(request.fixed),
        "moving": str(request.moving),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "working_spacing_mm": options.spacing,
        "fixed_grid": fixed.grid.describe(),
        "moving_grid": moving.grid.describe(),
        **{f"{role}_mask": str(path) for role, path in (("fixed", request.fixed_mask), ("moving", request.moving_mask))
           if path is not None},
        "stages": [{"name": r.name, "seconds": round(r.seconds, 3), "peak_host_memory_mib": round(r.host_peak_mib, 1),
                    "peak_cuda_memory_mib": None if r.cuda_peak_mib is None else round(r.cuda_peak_mib, 1),
                    "details": r.details} for r in result.stages],
        "registration_seconds": round(registration_seconds, 3),
        "affine_lps": [[round(v, 6) for v in row] for row in result.transform.affine.tolist()],
        "jacobian": jacobian_summary(images.jacobian, body),
        "conventions": "LPS mm; transforms map fixed points to moving points (ITK resampling direction)",
    }
    inverse = next((stage.inverse for stage in pipeline.stages if isinstance(stage, TimeDependentVelocityFields)), None)
    inverse_images = None
    if inverse is not None:
        inverse_images = compute_inverse_images(moving, inverse)
        _check_finite("the inverse transform", inverse.affine, inverse_images.displacement, inverse_images.jacobian)
        moving_body = resample_image(problem.moving_body_mask(), moving.grid, interpolation="nearest")
        summary["inverse"] = {
            "field_spacing_mm": inverse.field_grid.spacing[0],
            "jacobian": {**jacobian_summary(inverse_images.jacobian, moving_body), "region": "moving body mask"},
            "consistency": inverse_consistency_summary(result.transform, inverse, problem.fixed_body_mask())}
    if inputs.fixed_labels is not None and images.warped_labels is not None:
        unregistered = resample_labels(inputs.moving_labels, fixed.grid, None, request.label_method)
        summary["dice"] = label_summary(inputs.fixed_labels, inputs.moving_labels, images.warped_labels, unregistered,
                                        inputs.label_names)
    if cancel is not None and cancel.is_set():
        raise RegistrationCancelled("registration cancelled before writing outputs")
    summary["files"] = write_output_folder(outdir, fixed, moving, result.transform, images, summary,
                                           has_affine_stage=any("affine" in r.name for r in result.stages),
                                           fixed_labels=inputs.fixed_labels, overview=request.overview,
                                           inverse=inverse_images, label_names=inputs.label_names, body=body)
    return summary


def _check_finite(what: str, affine, *maps: torch.Tensor) -> None:
    """Raises RegistrationFailed when the affine or a map holds NaN or Inf (the optimisation diverged)."""
    if not np.isfinite(np.asarray(affine)).all() or not all(bool(torch.isfinite(m).all()) for m in maps):
        raise RegistrationFailed(f"the registration diverged: {what} holds non-finite values (NaN/Inf); no output "
                                 "was written: check the options (e.g. --similarity weights) or try another mode")


def estimated_memory(fixed: Grid, moving: Grid, spacing: float, input_bytes: int = 0, inverse: bool = False
                     ) -> tuple[int, int]:
    """Deliberately generous bounds, in bytes, of one registration's memory: ``(working, outputs)``,
    the stages on the working grids at ``spacing`` mm (on the registration's device) and the rest
    (host memory): the outputs on the fixed grid, the full-resolution moving image (and, with
    ``inverse``, the inverse's maps on its grid) and ``input_bytes`` for reading the inputs."""
    working_voxels = fixed.with_spacing(spacing).num_voxels + moving.with_spacing(spacing).num_voxels
    output_bytes = (fixed.num_voxels * _BYTES_PER_FIXED_VOXEL + input_bytes
                    + moving.num_voxels * (_BYTES_PER_MOVING_VOXEL + (_BYTES_PER_INVERSE_VOXEL if inverse else 0)))
    return working_voxels * _BYTES_PER_WORKING_VOXEL, output_bytes


def check_memory(fixed: Grid, moving: Grid, spacing: float, device: torch.device, input_bytes: int = 0,
                 inverse: bool = False) -> None:
    """Raises InputError when the run would need more memory than is available.

    The estimate (:func:`estimated_memory`) covers the working grids at ``spacing`` (deformable optimisation), the outputs on
    the fixed grid, the full-resolution moving image (and, with ``inverse``, the inverse's maps on
    its grid) and ``input_bytes`` for reading the inputs; it is deliberately generous. It needs only
    the grids' sizes, so it runs on the files' headers before any voxel is read; the memory
    available takes ``ulimit -v`` and cgroup limits into account
    (:func:`~.pipeline.memory.available_host_memory`).
    """
    working_bytes, output_bytes = estimated_memory(fixed, moving, spacing, input_bytes, inverse)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if working_bytes > free:
            raise InputError(f"--device cuda: the registration needs about {working_bytes / 2**30:.1f} GiB of GPU "
                             f"memory but {free / 2**30:.1f} GiB is free: use --device cpu or a larger --spacing")
        working_bytes = 0
    needed = working_bytes + output_bytes
    available = available_host_memory()
    if needed > available:
        sizes = f"fixed {'x'.join(map(str, fixed.size_ijk))}, moving {'x'.join(map(str, moving.size_ijk))} voxels"
        raise InputError(f"--spacing {spacing:g}: the registration ({sizes}) needs about {needed / 2**30:.1f} GiB of "
                         f"memory but {available / 2**30:.1f} GiB is available: use a larger --spacing, or crop or "
                         "downsample the images")


def check_request(request: RegistrationRequest) -> None:
    """Raises InputError for a bad option of ``request`` (before any file is read)."""
    _check_options(request.options)
    _check_learned_stage_options(request)


def _check_options(options: RegistrationOptions) -> None:
    if not 0.25 <= options.spacing <= 16.0:
        raise InputError(f"--spacing {options.spacing:g}: the working spacing must be between 0.25 and 16 mm")
    if options.threads is not None and options.threads < 1:
        raise InputError(f"--threads {options.threads}: must be at least 1")


def _check_learned_stage_options(request: RegistrationRequest) -> None:
    """Checks the learned stages' choices before any work (the CLI, Slicer and scripts alike)."""
    if request.refine_iterations is not None and request.refine_iterations < 0:
        raise InputError(f"--refine-iterations {request.refine_iterations}: must be 0 or more")
    for option, value in (("--similarity", request.similarity), ("--refine-iterations", request.refine_iterations)):
        if value is not None and request.mode not in REFINING_MODES:
            raise InputError(f"{option} {value}: has no effect with --mode {request.mode} (only the learned stages of "
                             f"modes {', '.join(REFINING_MODES)} refine): leave it out or choose one of those modes")
    if request.precision_iterations is not None:
        if request.precision_iterations < 0:
            raise InputError(f"--precision-iterations {request.precision_iterations}: must be 0 or more")
        if request.mode != "same":
            raise InputError(f"--precision-iterations {request.precision_iterations}: has no effect with --mode "
                             f"{request.mode} (only SAM-VoxelMorph, in --mode same, has a precision step): leave it "
                             "out or use --mode same")
    if request.similarity is not None:
        try:
            parse_similarity(request.similarity)
        except ValueError as error:
            raise InputError(f"--similarity {request.similarity}: {error}") from error
