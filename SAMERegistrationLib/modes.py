"""Registration modes: the stable names users and scripts choose, and the stages each one runs.

The names are a contract shared by the CLI, the Slicer module and saved scenes:
``intensity`` (intensity-only baseline: initial alignment, affine, deformable), and, as their
stages land, ``affine`` (SAM-affine), ``coarse`` (SAM-affine + SAM-coarse), ``same`` (the full
SAME pipeline), ``tvf`` and ``tvf-lddmm`` (time-dependent velocity fields).
"""

from __future__ import annotations

from .errors import InputError
from .pipeline.runner import RegistrationPipeline
from .pipeline.stage import Stage
from .stages.initial_alignment import InitialAlignment
from .stages.intensity_affine import IntensityAffine
from .stages.intensity_deformable import IntensityDeformable

MODE_NAMES = ("intensity", "affine", "coarse", "same", "tvf", "tvf-lddmm")
AVAILABLE_MODES = ("intensity",)
DEFAULT_MODE = "intensity"


def build_pipeline(mode: str, has_initial_transform: bool = False) -> RegistrationPipeline:
    """The stages of ``mode``. With a user-supplied initial transform the initial alignment is
    skipped: the affine stage starts from the user's transform."""
    if mode not in MODE_NAMES:
        raise InputError(f"--mode {mode}: unknown mode: choose one of {', '.join(MODE_NAMES)}")
    if mode not in AVAILABLE_MODES:
        raise InputError(f"--mode {mode}: this mode is not available in this version yet: "
                         f"use one of {', '.join(AVAILABLE_MODES)}")
    stages: list[Stage] = [] if has_initial_transform else [InitialAlignment()]
    stages += [IntensityAffine(), IntensityDeformable()]
    return RegistrationPipeline(stages)
