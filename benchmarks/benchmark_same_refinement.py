"""How the weight of SAME's test-time refinement regulariser changes the result across patients.

Not a test: prints a markdown table for the README. For every chosen pair of the pair lists
(evaluation harness format, prepared at 2 mm like the harness's default, or ``--spacing``),
SAME's first two stages run once (SAM-affine, SAM-coarse, as in ``--mode same``); then SAM-VoxelMorph
runs from their result
once per regulariser weight (the masked diffusion of the velocity during the refinement,
default :data:`DEFAULT_REFINE_REGULARISER_WEIGHT`), everything else at the stage's defaults. Each result is
scored with the harness's metrics: mean Dice, median target registration error in mm (known
deformations only), % J<=0 and std(log J) inside the fixed body, and the stage's wall time.

Usage:
    python benchmarks/benchmark_same_refinement.py --pairs benchmarks/pairs/cross_patient.json \
        --names "tsC->tsA" "radiomicsE->radiomicsD" --weights 1.0 0.3 0.1 [--threads 1] [--spacing 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings

import torch

from evaluation.metrics import evaluate
from evaluation.pairs import load_pair_list, prepare_pair
from SAMERegistrationLib.pipeline.problem import RegistrationOptions, RegistrationProblem
from SAMERegistrationLib.pipeline.progress import Progress
from SAMERegistrationLib.sam.embedding import load_sam
from SAMERegistrationLib.sam_voxelmorph.network import load_sam_vm
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.stages.sam_affine import SAMAffine
from SAMERegistrationLib.stages.sam_coarse import SAMCoarse
from SAMERegistrationLib.stages.sam_voxelmorph import DEFAULT_REFINE_REGULARISER_WEIGHT, SAMVoxelMorph

DEFAULT_SPACING_MM = 2.0


def measure(spec, weights: list[float], threads: int, spacing_mm: float) -> list[str]:
    """One table row per weight for the pair of ``spec``, prepared at ``spacing_mm``."""
    pair = prepare_pair(spec, spacing_mm)
    problem = RegistrationProblem(pair.fixed, pair.moving, options=RegistrationOptions(spacing=spacing_mm,
                                                                                       threads=threads))
    sam, network = load_sam(None), load_sam_vm(None)
    transform = SpatialTransform.identity()
    for stage in (SAMAffine(sam), SAMCoarse(sam)):
        transform = stage.run(problem, transform, Progress(stage.name, 0, 1, None, None))
    rows = []
    for weight in weights:
        stage = SAMVoxelMorph(network, sam, regulariser_weight=weight)
        start = time.perf_counter()
        result = stage.run(problem, transform, Progress(stage.name, 0, 1, None, None))
        seconds = time.perf_counter() - start
        summary = evaluate(pair, result.displacement_on(pair.fixed.grid)).summary
        default = " (default)" if weight == DEFAULT_REFINE_REGULARISER_WEIGHT else ""
        rows.append(f"| {spec.name} | {weight:g}{default} | {summary['mean_dice']:.3f} | "
                    f"{summary['tre_median_mm']:.2f} | {summary['percent_nonpositive_jacobian']:.4f} | "
                    f"{summary['std_log_jacobian']:.3f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", required=True, help="pair-list JSON files")
    parser.add_argument("--names", nargs="+", required=True, help="pair names to run")
    parser.add_argument("--weights", nargs="+", type=float, default=[1.0, DEFAULT_REFINE_REGULARISER_WEIGHT, 0.1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spacing", type=float, default=DEFAULT_SPACING_MM, help="working spacing in mm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = [spec for path in args.pairs for spec in load_pair_list(path)[1] if spec.name in args.names]
    print(f"{datetime.date.today()}, {os.cpu_count()} cores, {args.threads} thread(s), {args.spacing:g} mm\n")
    print("| pair | regulariser weight | mean Dice | median TRE (mm) | % J<=0 | std(log J) | SAM-VoxelMorph time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in specs:
            measure(spec, args.weights, args.threads, args.spacing)


if __name__ == "__main__":
    main()
