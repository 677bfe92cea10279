"""Registration modes: the stable names users and scripts choose, and the stages each one runs.

The names are a contract shared by the CLI, the Slicer module and saved scenes:
``intensity`` (intensity-only baseline: initial alignment, affine, deformable), ``affine``
(SAM-affine), ``coarse`` (SAM-affine + SAM-coarse), ``same`` (the full SAME pipeline), ``tvf`` and
``tvf-lddmm`` (SAM-affine, SAM-coarse, then time-dependent velocity fields with their inverse).
"""

from __future__ import annotations

from dataclasses import dataclass
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
from .stages.sam_voxelmorph import SAMVoxelMorph
from .stages.tvf import TimeDependentVelocityFields
from .sam_voxelmorph.network import load_sam_vm
from .tvf.network import DEFAULT_WEIGHTS as TVF_WEIGHTS, load_tvf

MODE_NAMES = ("intensity", "affine", "coarse", "same", "tvf", "tvf-lddmm")
AVAILABLE_MODES = ("intensity", "affine", "coarse", "same", "tvf", "tvf-lddmm")
TVF_MODES = ("tvf", "tvf-lddmm")
SAM_MODES = ("affine", "coarse", "same")
REFINING_MODES = ("same", *TVF_MODES)
"""Modes whose learned stage refines on the pair (``refine_iterations`` and ``similarity`` apply)."""
DEFAULT_MODE = "same"


@dataclass(frozen=True)
class ModeSettings:
    """Choices a user may make beyond the mode (every field has a sensible default).

    Attributes:
        sam_weights: SAM network weights (default: the shipped ones).
        vm_weights: SAM-VoxelMorph weights for ``same`` (default: the shipped ones).
        tvf_weights: TVF network weights for ``tvf`` / ``tvf-lddmm`` (default: the shipped ones).
        sam_coarse: run SAM-coarse inside ``same`` and the TVF modes (switch it off to compare; the
            TVF stage turns the SAM-coarse field into invertible velocity steps).
        refine_iterations: test-time instance optimisation iterations of a learned stage
            (None: the stage's default; 0: network output only).
        similarity: similarity spec of the test-time refinement (see ``learning.objective``;
            None: the stage's default).
        precision_iterations: iterations of SAM-VoxelMorph's precision step on the full-resolution
            working images, ``same`` only (None: the stage's default, none).
    """

    sam_weights: str | Path | None = None
    vm_weights: str | Path | None = None
    tvf_weights: str | Path | None = None
    sam_coarse: bool = True
    refine_iterations: int | None = None
    similarity: str | None = None
    precision_iterations: int | None = None


def build_pipeline(mode: str, has_initial_transform: bool = False, settings: ModeSettings = ModeSettings()
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
    model = load_sam(settings.sam_weights)
    stages = [IntensityAffine()] if has_initial_transform else [SAMAffine(model)]
    if mode == "coarse" or (mode in ("same", *TVF_MODES) and settings.sam_coarse):
        stages.append(SAMCoarse(model))
    if mode == "same":
        precision = ({} if settings.precision_iterations is None
                     else {"precision_iterations": settings.precision_iterations})
        stages.append(SAMVoxelMorph(load_sam_vm(settings.vm_weights), model, **_refinement_options(settings),
                                    **precision))
    if mode in TVF_MODES:
        network = load_tvf(settings.tvf_weights or TVF_WEIGHTS[mode])
        stages.append(TimeDependentVelocityFields(network, mode, model, **_refinement_options(settings)))
    return RegistrationPipeline(stages)


def _refinement_options(settings: ModeSettings) -> dict:
    """The learned stages' refinement keyword arguments the user set (others keep their defaults)."""
    options = {}
    if settings.refine_iterations is not None:
        options["refine_iterations"] = settings.refine_iterations
    if settings.similarity is not None:
        options["refine_similarity"] = settings.similarity
    return options
