"""Registration modes: the stable names users and scripts choose, and the stages each one runs.

The names are a contract shared by the CLI, the Slicer module and saved scenes:
``intensity`` (intensity-only baseline: initial alignment, affine, deformable), ``affine``
(SAM-affine), ``coarse`` (SAM-affine + SAM-coarse), and, as their stages land, ``same`` (the full
SAME pipeline), ``tvf`` and ``tvf-lddmm`` (time-dependent velocity fields).
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .pipeline.runner import RegistrationPipeline
from .pipeline.stage import Stage
from .sam.embedding import load_sam
from .stages.initial_alignment import InitialAlignment
from .stages.intensity_affine import IntensityAffine
from .stages.intensity_deformable import IntensityDeformable
from .stages.sam_affine import SAMAffine
from .stages.sam_coarse import SAMCoarse

MODE_NAMES = ("intensity", "affine", "coarse", "same", "tvf", "tvf-lddmm")
AVAILABLE_MODES = ("intensity", "affine", "coarse")
SAM_MODES = ("affine", "coarse", "same")
DEFAULT_MODE = "intensity"


def build_pipeline(mode: str, has_initial_transform: bool = False, sam_weights: str | Path | None = None
                   ) -> RegistrationPipeline:
    """The stages of ``mode``.

    With a user-supplied initial transform, the global initialisation (initial alignment, or
    SAM-affine) is replaced by an intensity affine refinement of the user's transform.
    SAM modes load the SAM weights (default: the shipped ones), checking their SHA-256.
    """
    if mode not in MODE_NAMES:
        raise InputError(f"--mode {mode}: unknown mode: choose one of {', '.join(MODE_NAMES)}")
    if mode not in AVAILABLE_MODES:
        raise InputError(f"--mode {mode}: this mode is not available in this version yet: "
                         f"use one of {', '.join(AVAILABLE_MODES)}")
    if mode == "intensity":
        stages: list[Stage] = [] if has_initial_transform else [InitialAlignment()]
        return RegistrationPipeline(stages + [IntensityAffine(), IntensityDeformable()])
    model = load_sam(sam_weights)
    stages = [IntensityAffine()] if has_initial_transform else [SAMAffine(model)]
    if mode == "coarse":
        stages.append(SAMCoarse(model))
    return RegistrationPipeline(stages)
