"""SAM-VoxelMorph: the learned dense deformation of SAME, then test-time instance optimisation.

The moving image is resampled through the incoming transform (SAM-affine, SAM-coarse) onto the
fixed working grid of the network's spacing (2 mm); both images are embedded by SAM; the network
predicts a stationary velocity on the half-resolution grid from the two images and the SAM
correlation channels. The velocity is then refined on this one pair (Adam on body-masked local NCC
+ SAM loss + masked diffusion, at half resolution: :func:`..learning.instance_optimisation.refine`),
optionally refined again on the full-resolution images (the precision step, its moving image
sampled through the incoming transform: :class:`..learning.pairs.MovingThroughTransform`), and integrated by
scaling and squaring into a diffeomorphic residual that is composed after the incoming transform.
For images that are not CT in HU there are no SAM features: the stage then skips the network and
refines from zero with local NCC alone (and says so in the summary).
"""

from __future__ import annotations

import time

import torch

from ..learning.instance_optimisation import RefinementReport, refine
from ..learning.objective import ObjectiveSettings, RegistrationObjective
from ..learning.pairs import PairBatch, pair_from_problem
from ..networks.unet import half_grid
from ..pipeline.problem import RegistrationProblem
from ..pipeline.progress import Progress
from ..pipeline.stage import Stage
from ..sam.features import add_sam_features, principal_features
from ..sam.network import SAMNet
from ..sam_voxelmorph.network import SAMVoxelMorphNet, predict, velocity_to_displacement
from ..spatial.fields import resample_batch
from ..spatial.transform import SpatialTransform
from .sam_affine import fixed_embeddings

DEFAULT_REFINE_ITERATIONS = 50
DEFAULT_REFINE_SIMILARITY = "lncc+0.1*sam"
DEFAULT_REFINE_REGULARISER_WEIGHT = 0.5
"""Weight of the masked diffusion during the refinement. Across patients 0.5 gave higher Dice than
1.0 (the weight the network was trained with) on every pair tried, with % J<=0 in the body below
0.01; 0.3 gained up to another 0.008 in Dice but made the known deformation of the torso worse
(median error 1.40 -> 1.57 mm at 4 mm; 1.0 gives 1.24). README, "SAME mode"."""

DEFAULT_REFINE_SAM_COMPONENTS = 32
"""Principal directions of the SAM features the refinement's SAM term warps (of 64): the term was
most of the refinement's trilinear samples (:func:`..sam.features.principal_features`)."""
DEFAULT_REFINE_INTEGRATION_STEPS = 5
"""Scaling-and-squaring steps of the refined velocity (the network was trained with 7): at 4 mm a
velocity of up to 40 mm starts from a 1.25 mm (0.3 voxel) step. With 32 components, on the eight
cross-patient pairs at 2 mm the two kept every pair's Dice within 0.0005 of 64 channels and 7
steps, and took 15-25 % less time per pair (README, "Second changes")."""

DEFAULT_PRECISION_ITERATIONS = 0
"""Adam iterations of the precision step (0: none, the default): the refined velocity, still on its
half-resolution grid, optimised on local NCC between the full-resolution working images, the moving
one sampled through the incoming transform (:class:`..learning.pairs.MovingThroughTransform`). The
refinement compares half-resolution images, which limits its precision to a fraction of their
voxels. On a known chest deformation at 2 mm, 20 iterations lower the median error from 0.85 to
0.67 mm, and across patients they raised Dice on the chest and abdomen pairs (up to +0.020) but
lowered it on one organ-labelled slab pair (tsC -> tsA 0.222 -> 0.209); each iteration costs about
2.8 s of CPU on that 200 x 200 x 137 grid, so the step is an option (``--precision-iterations``),
not the default (README, "Precision step")."""
DEFAULT_PRECISION_LEARNING_RATE_MM = 0.25
PRECISION_WINDOW_MM = 10.0
"""Local NCC window of the precision step (5 voxels at 2 mm; 18 mm gave the same error, more slowly)."""


class SAMVoxelMorph(Stage):
    """Network prediction + instance optimisation of a residual deformation.

    Args:
        network: SAM-VoxelMorph weights.
        sam: the SAM network (features, correlation, SAM loss).
        refine_iterations: Adam iterations of the test-time refinement (0: network output only).
        refine_similarity: similarity spec of the refinement.
        refine_learning_rate_mm: Adam step size on the velocity, in mm.
        regulariser_weight: weight of the masked diffusion of the velocity during refinement (the
            network itself was trained with the training objective's own weight).
        refine_sam_components: principal directions of the SAM features in the refinement's SAM term
            (None: all channels).
        refine_integration_steps: scaling-and-squaring steps of the refined velocity (None: the
            network's own; without refinement the network's own are always used).
        precision_iterations: Adam iterations of the precision step after the refinement (0: none).
        precision_learning_rate_mm: its Adam step size on the velocity, in mm.
    """

    name = "sam-voxelmorph"

    def __init__(self, network: SAMVoxelMorphNet, sam: SAMNet, refine_iterations: int = DEFAULT_REFINE_ITERATIONS,
                 refine_similarity: str = DEFAULT_REFINE_SIMILARITY, refine_learning_rate_mm: float = 0.5,
                 regulariser_weight: float = DEFAULT_REFINE_REGULARISER_WEIGHT,
                 refine_sam_components: int | None = DEFAULT_REFINE_SAM_COMPONENTS,
                 refine_integration_steps: int | None = DEFAULT_REFINE_INTEGRATION_STEPS,
                 precision_iterations: int = DEFAULT_PRECISION_ITERATIONS,
                 precision_learning_rate_mm: float = DEFAULT_PRECISION_LEARNING_RATE_MM) -> None:
        if refine_iterations < 0:
            raise ValueError(f"SAMVoxelMorph: 'refine_iterations' must be >= 0, got {refine_iterations}")
        if precision_iterations < 0:
            raise ValueError(f"SAMVoxelMorph: 'precision_iterations' must be >= 0, got {precision_iterations}")
        self.network = network.eval()
        self.sam = sam
        self.refine_iterations = refine_iterations
        self.objective_settings = ObjectiveSettings(similarity=refine_similarity, regulariser_weight=regulariser_weight)
        RegistrationObjective(self.objective_settings)  # checks the spec before any work
        self.refine_learning_rate_mm = refine_learning_rate_mm
        self.refine_sam_components = refine_sam_components
        self.refine_integration_steps = refine_integration_steps
        self.precision_iterations = precision_iterations
        self.precision_learning_rate_mm = precision_learning_rate_mm

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        device = problem.device
        spacing = self.network.config.spacing_mm
        progress.update(0.02, f"resampling the moving image onto the {spacing:g} mm grid")
        pair = pair_from_problem(problem, transform, spacing, sample_through_transform=self.precision_iterations > 0)
        has_sam = pair.fixed_hu is not None
        settings = self.objective_settings
        if has_sam:
            progress.update(0.1, "SAM embeddings of both images")
            add_sam_features(pair, self.sam.to(device), fixed_embeddings(problem, self.sam))
            start = time.perf_counter()
            with torch.no_grad():
                prediction = predict(self.network.to(device), pair)
            progress.record("network_seconds", round(time.perf_counter() - start, 2))
            velocity, velocity_grid = prediction.velocity, prediction.velocity_grid
        else:
            progress.warn("note", "images are not CT in HU: no SAM features; the network is skipped and the "
                                  "refinement uses local NCC only")
            velocity_grid = half_grid(pair.grid)
            velocity = torch.zeros((1, 3, *velocity_grid.shape), device=device)
            settings = ObjectiveSettings(similarity="lncc", regulariser_weight=settings.regulariser_weight)
        if self.refine_iterations > 0:
            velocity = self._refine(problem, transform, pair, velocity, velocity_grid, settings, progress)
        if self.precision_iterations > 0:
            velocity = self._precision_step(pair, velocity, velocity_grid, settings, progress)
        with torch.no_grad():
            displacement = velocity_to_displacement(velocity, velocity_grid, pair.grid, self._integration_steps())
        return transform.then_residual(displacement[0], pair.grid)

    def _integration_steps(self) -> int:
        if self.refine_iterations > 0 and self.refine_integration_steps is not None:
            return self.refine_integration_steps
        return self.network.config.integration_steps

    def _refine(self, problem: RegistrationProblem, transform: SpatialTransform, pair: PairBatch,
                velocity: torch.Tensor, velocity_grid, settings: ObjectiveSettings, progress: Progress) -> torch.Tensor:
        """The velocity after test-time optimisation on the half-resolution images."""
        coarse = pair_from_problem(problem, transform, velocity_grid.spacing[0])
        coarse.features = dict(pair.features)
        if "sam" in pair.features and self.refine_sam_components:
            features = pair.features["sam"]
            weight = resample_batch(coarse.weight, coarse.grid, features.grid)
            coarse.features["sam"] = principal_features(features, weight, self.refine_sam_components)
        end = 0.8 if self.precision_iterations > 0 else 0.95
        velocity, report = self._optimise(coarse, velocity, velocity_grid, RegistrationObjective(settings),
                                          self.refine_iterations, self.refine_learning_rate_mm, progress, (0.2, end),
                                          "test-time refinement")
        progress.record("refinement", {"similarity": settings.similarity, **report.summary()})
        return velocity

    def _precision_step(self, pair: PairBatch, velocity: torch.Tensor, velocity_grid, settings: ObjectiveSettings,
                        progress: Progress) -> torch.Tensor:
        """The velocity (``(1, 3, d, h, w)`` mm on ``velocity_grid``) after a few Adam steps on local
        NCC between the full-resolution working images (``pair``, on twice the velocity's
        resolution, its moving image sampled through the incoming transform). The SAM term is left
        out (its embeddings are no finer than the refinement's images)."""
        objective = RegistrationObjective(ObjectiveSettings(
            similarity="lncc", regulariser_weight=settings.regulariser_weight, lncc_window_mm=PRECISION_WINDOW_MM))
        velocity, report = self._optimise(pair, velocity, velocity_grid, objective, self.precision_iterations,
                                          self.precision_learning_rate_mm, progress, (0.8, 0.95),
                                          f"precision step on the {pair.grid.spacing[0]:g} mm images")
        progress.record("precision_step", report.summary())
        return velocity

    def _optimise(self, pair: PairBatch, velocity: torch.Tensor, velocity_grid, objective: RegistrationObjective,
                  iterations: int, learning_rate_mm: float, progress: Progress, fraction_range: tuple[float, float],
                  description: str) -> tuple[torch.Tensor, RefinementReport]:
        """Adam on ``objective`` of the velocity (``(1, 3, d, h, w)`` mm on ``velocity_grid``),
        integrated onto ``pair.grid``; returns the optimised velocity (detached) and the report."""
        steps = self._integration_steps()
        parameters = velocity.detach().clone().requires_grad_(True)

        def loss():
            displacement = velocity_to_displacement(parameters, velocity_grid, pair.grid, steps)
            return objective(pair, displacement, parameters, velocity_grid)

        report = refine([parameters], loss, iterations, learning_rate_mm, progress, fraction_range, description)
        return parameters.detach(), report
