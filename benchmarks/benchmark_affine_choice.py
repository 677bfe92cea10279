"""How SAM-affine decides (issue 14): its stable matches, the plausibility test, and the score
against the intensity affine, beside the true error of each candidate.

Not a test: prints a markdown table for the README. For every pair of the pair lists (evaluation
harness format, prepared at 2 mm like the harness does), the stage's own steps are run one by one:
stable SAM matches and the RANSAC fit (:meth:`SAMAffine._sam_affine`), the anatomical ranges
(:class:`AnatomicalAffineRange`), the intensity affine (initial alignment + :class:`IntensityAffine`)
and the alignment score of each candidate (:func:`alignment_score`, the stage's criterion), plus a
second similarity for comparison (MIND-SSC agreement, ``1 - mean squared MIND difference`` over the
fixed body at 4 mm). Each candidate's Dice and, for known deformations, median target registration
error are measured with the harness's metrics.

Usage:
    python benchmarks/benchmark_affine_choice.py --pairs benchmarks/pairs/cross_patient.json \
        benchmarks/pairs/shared_ct.json [--names "tsA, synthetic" ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from evaluation.metrics import evaluate
from evaluation.pairs import load_pair_list, prepare_pair
from SAMERegistrationLib.descriptors.mind import mind_ssc
from SAMERegistrationLib.pipeline.problem import RegistrationProblem
from SAMERegistrationLib.pipeline.progress import Progress
from SAMERegistrationLib.sam.embedding import load_sam
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.stages.alignment_score import SCORE_SPACING_MM, best_candidate
from SAMERegistrationLib.stages.initial_alignment import InitialAlignment
from SAMERegistrationLib.stages.intensity_affine import IntensityAffine
from SAMERegistrationLib.stages.sam_affine import SAMAffine

SPACING_MM = 2.0


def mind_agreement(problem: RegistrationProblem, transform: SpatialTransform) -> float:
    """``1 - mean squared MIND-SSC difference`` of the fixed and the warped moving registration
    channels over the fixed body (uncovered voxels count as the largest difference, 1)."""
    level = problem.level(SCORE_SPACING_MM)
    with torch.no_grad():
        values, valid = level.sample_moving(transform.map_points(level.fixed.grid.world_points()))
        difference = (mind_ssc(level.fixed.data) - mind_ssc(values)).square().mean(dim=0)
        difference = torch.where(valid > 0, difference, torch.ones_like(difference))
        return 1.0 - float((difference * level.fixed_weight).sum() / level.fixed_weight.sum())


def measure(spec, model) -> str:
    pair = prepare_pair(spec, SPACING_MM)
    problem = RegistrationProblem(pair.fixed, pair.moving)
    progress = Progress("sam-affine", 0, 1, None, None)
    stage = SAMAffine(model)
    sam_matrix, reason = stage._sam_affine(problem, progress)
    details = dict(progress.details)
    identity, intensity_progress = SpatialTransform.identity(), Progress("intensity-affine", 0, 1, None, None)
    candidates = {"intensity": IntensityAffine().run(
        problem, InitialAlignment().run(problem, identity, intensity_progress), intensity_progress)}
    if sam_matrix is not None:
        candidates["SAM"] = identity.with_affine(sam_matrix)
    chosen, scores = best_candidate(problem, dict(reversed(candidates.items())))     # SAM first, as in the stage
    cells = {}
    for name, transform in candidates.items():
        metrics = evaluate(pair, transform.displacement_on(pair.fixed.grid)).summary
        tre = metrics["tre_median_mm"]
        cells[name] = (f"{scores[name]:.3f} / {mind_agreement(problem, transform):.3f} / "
                       f"{metrics['mean_dice']:.3f}" + ("" if np.isnan(tre) else f" / {tre:.2f}"))
    matches = (f"{details.get('confident_matches', 0)} / {details.get('inliers', '-')}, "
               f"RMS {details.get('inlier_rms_mm', '-')} mm, det {details.get('determinant', '-')}")
    verdict = "plausible" if sam_matrix is not None else reason.replace("|", "/")
    return (f"| {spec.name} | {matches} | {verdict} | {cells['intensity']} | {cells.get('SAM', '-')} | "
            f"{chosen} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, nargs="+", required=True, help="pair-list JSON files")
    parser.add_argument("--names", nargs="*", help="only these pairs (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_sam()
    print(f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; {os.cpu_count()} cores, {args.threads} thread(s), "
          f"load average at start {os.getloadavg()[0]:.1f}\n")
    print("| pair | SAM confident stable matches / inliers | SAM fit | intensity affine: score / MIND / Dice / TRE (mm) "
          "| SAM affine: score / MIND / Dice / TRE (mm) | chosen |")
    print("|---|---|---|---|---|---|")
    for path in args.pairs:
        for spec in load_pair_list(path)[1]:
            if args.names and spec.name not in args.names:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                print(measure(spec, model), flush=True)


if __name__ == "__main__":
    main()
