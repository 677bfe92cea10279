"""Registering two image files into an output folder: the one entry point of the CLI and Slicer.

:func:`register_files` reads and checks every input (raising :class:`InputError` before any work),
runs the mode's pipeline with progress and cancellation, and writes the output folder.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import SimpleITK as sitk
import torch

from .errors import InputError, RegistrationCancelled
from .export import read_initial_transform
from .image import Image
from .learning.objective import parse_similarity
from .io import (check_output_directory, label_names_beside, read_image, read_label_names, read_labels,
                 read_mask)
from .modes import DEFAULT_MODE, ModeSettings, build_pipeline
from .outputs import (compute_inverse_images, compute_result_images, inverse_consistency_summary, jacobian_summary,
                      label_summary, write_output_folder)
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
    device: str = "auto"
    label_method: LabelMethod = "nearest"
    overview: bool = True
    options: RegistrationOptions = field(default_factory=RegistrationOptions)


def register_files(request: RegistrationRequest, on_progress: ProgressCallback | None = None,
                   cancel: threading.Event | None = None) -> dict:
    """Runs one registration and returns the summary (also written to ``summary.json``).

    Raises:
        InputError: a bad input, option or output folder (nothing is written).
        RegistrationCancelled: ``cancel`` was set (no output file is written).
    """
    started = time.perf_counter()
    _check_options(request.options)
    _check_request(request)
    device = resolve_device(request.device)
    pipeline = build_pipeline(request.mode, has_initial_transform=request.initial_transform is not None,
                              settings=ModeSettings(request.sam_weights, request.vm_weights, request.tvf_weights,
                                                    request.sam_coarse, request.refine_iterations,
                                                    request.similarity))
    inputs = load_inputs(request)
    check_memory(inputs.fixed.grid, inputs.moving.grid, request.options.spacing, device)
    outdir = check_output_directory(request.output_dir)
    with _thread_count(request.options.threads):
        return _register(request, inputs, pipeline, device, outdir, started, on_progress, cancel)


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


def check_memory(fixed: Grid, moving: Grid, spacing: float, device: torch.device) -> None:
    """Raises InputError when the run would need more memory than is available.

    The estimate covers the working grids at ``spacing`` (deformable optimisation) and the outputs
    on the fixed grid; it is deliberately generous.
    """
    working_voxels = fixed.with_spacing(spacing).num_voxels + moving.with_spacing(spacing).num_voxels
    output_bytes = fixed.num_voxels * _BYTES_PER_FIXED_VOXEL
    working_bytes = working_voxels * _BYTES_PER_WORKING_VOXEL
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if working_bytes > free:
            raise InputError(f"--device cuda: the registration needs about {working_bytes / 2**30:.1f} GiB of GPU "
                             f"memory but {free / 2**30:.1f} GiB is free: use --device cpu or a larger --spacing")
        working_bytes = 0
    needed = working_bytes + output_bytes
    available = psutil.virtual_memory().available
    if needed > available:
        raise InputError(f"--spacing {spacing:g}: the registration needs about {needed / 2**30:.1f} GiB of memory but "
                         f"{available / 2**30:.1f} GiB is available: use a larger --spacing or crop the images")


def _check_options(options: RegistrationOptions) -> None:
    if not 0.25 <= options.spacing <= 16.0:
        raise InputError(f"--spacing {options.spacing:g}: the working spacing must be between 0.25 and 16 mm")
    if options.threads is not None and options.threads < 1:
        raise InputError(f"--threads {options.threads}: must be at least 1")


def _check_request(request: RegistrationRequest) -> None:
    """Checks the learned stages' choices before any work (the CLI, Slicer and scripts alike)."""
    if request.refine_iterations is not None and request.refine_iterations < 0:
        raise InputError(f"--refine-iterations {request.refine_iterations}: must be 0 or more")
    if request.similarity is not None:
        try:
            parse_similarity(request.similarity)
        except ValueError as error:
            raise InputError(f"--similarity {request.similarity}: {error}") from error
