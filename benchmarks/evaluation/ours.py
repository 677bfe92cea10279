"""Our registration modes as benchmark methods, one per name in ``MODE_NAMES``.

A mode in ``AVAILABLE_MODES`` runs exactly as ``same-register --mode MODE`` does: the stages of
``build_pipeline(mode)`` on a :class:`RegistrationProblem` with default options except the working
spacing (the benchmark's ``--spacing``) and the thread count, on the CPU. A mode that is not
available yet has no adapter and is reported as "not available in this version"; it becomes a
real row as soon as it is added to ``AVAILABLE_MODES``.
"""

from __future__ import annotations

from functools import partial

import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.modes import AVAILABLE_MODES, MODE_NAMES, build_pipeline
from SAMERegistrationLib.pipeline.problem import RegistrationOptions, RegistrationProblem
from SAMERegistrationLib.spatial.transform import SpatialTransform

from .method import Method, RunContext

DESCRIPTIONS = {
    "intensity": "initial alignment, intensity affine, intensity deformable (SVF, local NCC)",
    "affine": "SAM-affine (RANSAC affine on SAM point matches; falls back to the intensity affine)",
    "coarse": "SAM-affine + SAM-coarse (smooth field fitted to SAM re-matches)",
    "same": "full SAME pipeline: SAM-affine, SAM-coarse, SAM-VoxelMorph",
    "tvf": "SAM-affine, SAM-coarse as invertible velocity steps, then time-dependent velocity fields (with their inverse)",
    "tvf-lddmm": "SAM-affine, SAM-coarse as invertible velocity steps, then time-dependent velocity fields, LDDMM variant (with their inverse)",
}


def run_mode(mode: str, fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    """``build_pipeline(mode)`` on the CPU with the benchmark's spacing and threads."""
    options = RegistrationOptions(spacing=context.spacing, threads=context.threads)
    problem = RegistrationProblem(fixed, moving, options=options, device=torch.device("cpu"))
    return build_pipeline(mode).run(problem).transform


def our_methods() -> list[Method]:
    """One method per mode name, in ``MODE_NAMES`` order; modes not yet available have no adapter."""
    return [Method(name=mode, label=f"SAMERegistration --mode {mode}",
                   configuration=f"{DESCRIPTIONS.get(mode, mode)}; default options, working spacing = --spacing",
                   run=partial(run_mode, mode) if mode in AVAILABLE_MODES else None, kind="ours")
            for mode in MODE_NAMES]
