"""Similarity ablation of a learned stage (issue 9, item 4; not a test: prints a markdown table).

One network, one budget, several similarities: the shipped Li & Fan FCN (``fcn_lifan.pt``, trained
with local NCC, never on these pairs) predicts a displacement for each pair, then a copy of it is
refined on that pair for ``--iterations`` Adam steps of its weights (learning rate ``--lr``, the
multi-resolution loss with weights 1, 0.6, 0.3, total variation 0.1) with each similarity spec in
turn, through the shared instance-optimisation loop (``fcn/registration.py``). Every row starts
from the same trained weights and the same pre-alignment.

Pairs (``benchmarks/pairs/shared_ct.json``, prepared by ``benchmarks/evaluation``: 2 mm working
grids, cut to the fixed body's bounding box + 8 mm for the network; the residual displacement is
extended beyond it by its border values): ``tsA->tsC`` (inter-patient, TotalSegmentator labels) and ``tsC, synthetic`` (a known affine
+ smooth deformation with a contrast change of the tsC slab; labels carried along). Both are
pre-aligned once by the pipeline's initial alignment + intensity affine on the clean images. Each
also has a noisy / low-dose variant: white Gaussian noise of ``--noise-hu`` (std, HU) added
independently to both images on their 2 mm working grids, with the clean pre-alignment.

Metrics (``benchmarks/evaluation/metrics.py``, on the fixed 2 mm grid, of the whole mapping
``x -> A(x + u(x))``): mean Dice over labels in both maps (nearest neighbour), TRE for the synthetic
pair, and, inside the fixed body, std(J) and % J <= 0 of the whole mapping. Time: the refinement
(plus the SAM embeddings of the pair for specs with ``sam``) on this machine's CPU threads.

Caveat: the segmentation U-Net behind ``deepsim`` was trained on the labels of the tsA and tsC
slabs themselves (the only labelled CTs here), so on these pairs its features know the labelled
organs: DeepSim is favoured on Dice. SAM was trained without labels on other CTs.

Usage:
    python benchmarks/benchmark_similarity.py [--threads 2] [--iterations 20] [--noise-hu 60]
        [--specs prediction ncc mi sam deepsim ncc+sam] [--output benchmarks/results/similarity.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_sam import machine  # noqa: E402  (sibling benchmark script)
from evaluation.metrics import evaluate  # noqa: E402
from evaluation.pairs import PreparedPair, load_pair_list, prepare_pair  # noqa: E402

from SAMERegistrationLib.fcn.network import load_fcn  # noqa: E402
from SAMERegistrationLib.fcn.registration import register_pair  # noqa: E402
from SAMERegistrationLib.image import Image  # noqa: E402
from SAMERegistrationLib.learning.objective import ObjectiveSettings, RegistrationObjective  # noqa: E402
from SAMERegistrationLib.learning.pairs import PairBatch, pair_from_problem  # noqa: E402
from SAMERegistrationLib.pipeline.problem import RegistrationOptions, RegistrationProblem  # noqa: E402
from SAMERegistrationLib.pipeline.runner import RegistrationPipeline  # noqa: E402
from SAMERegistrationLib.sam.embedding import load_sam  # noqa: E402
from SAMERegistrationLib.sam.features import add_sam_features  # noqa: E402
from SAMERegistrationLib.spatial.fields import resample_batch  # noqa: E402
from SAMERegistrationLib.spatial.grid import Grid  # noqa: E402
from SAMERegistrationLib.spatial.jacobian import jacobian_determinant, jacobian_statistics  # noqa: E402
from SAMERegistrationLib.spatial.transform import SpatialTransform  # noqa: E402
from SAMERegistrationLib.stages.initial_alignment import InitialAlignment  # noqa: E402
from SAMERegistrationLib.stages.intensity_affine import IntensityAffine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPACING = 2.0
PAIRS = ("tsA->tsC", "tsC, synthetic")
SPECS = ("affine", "prediction", "lncc", "ncc", "mi", "sam", "deepsim", "deepsim-sam", "ncc+sam")
"""``affine``: the pre-alignment alone; ``prediction``: the trained network's output (no refinement);
the others are similarity specs."""


def noisy(image: Image, sigma_hu: float, seed: int) -> Image:
    """``image`` plus white Gaussian noise of ``sigma_hu`` (HU)."""
    noise = torch.randn(image.grid.shape, generator=torch.Generator().manual_seed(seed)) * sigma_hu
    return Image(image.data + noise, image.grid)


def prealign(pair: PreparedPair) -> SpatialTransform:
    """The pipeline's initial alignment + intensity affine of the (clean) pair."""
    problem = RegistrationProblem(pair.fixed, pair.moving, options=RegistrationOptions(spacing=SPACING))
    return RegistrationPipeline([InitialAlignment(), IntensityAffine()]).run(problem).transform


def crop_to_body(batch: PairBatch, margin: int = 4) -> PairBatch:
    """The batch cut to the bounding box of its weight (the fixed body where the moving image has
    data) plus ``margin`` voxels: the networks and losses then skip the air around the patient."""
    inside = batch.weight[0, 0].nonzero()
    low = (inside.min(dim=0).values - margin).clamp_min(0)
    high = torch.minimum(inside.max(dim=0).values + margin + 1, torch.tensor(batch.grid.shape))
    box = (..., slice(int(low[0]), int(high[0])), slice(int(low[1]), int(high[1])), slice(int(low[2]), int(high[2])))
    origin = batch.grid.index_to_world() @ np.array([int(low[2]), int(low[1]), int(low[0]), 1.0])
    grid = Grid.create(tuple(int(h - l) for h, l in zip(high, low)), batch.grid.spacing, origin[:3],
                       batch.grid.direction_matrix)
    tensors = {name: value[box] for name, value in vars(batch).items() if isinstance(value, torch.Tensor)}
    return PairBatch(**tensors, grid=grid)


def total_displacement(grid: Grid, transform: SpatialTransform, residual: torch.Tensor) -> torch.Tensor:
    """``A(x + u(x)) - x`` ``(3, D, H, W)`` LPS mm on ``grid`` (``residual`` ``(1, 3, D, H, W)`` on it)."""
    points = grid.world_points()
    with torch.no_grad():
        mapped = transform.map_points(points + torch.movedim(residual[0], 0, -1))
    return torch.movedim(mapped - points, -1, 0)


def run_spec(spec: str, model: torch.nn.Module, batch: PairBatch, args: argparse.Namespace
             ) -> tuple[torch.Tensor, float]:
    """The residual displacement of one row and the seconds it took."""
    started = time.perf_counter()
    if spec == "affine":
        return torch.zeros((1, 3, *batch.grid.shape)), 0.0
    similarity = "lncc" if spec == "prediction" else spec
    objective = RegistrationObjective(ObjectiveSettings(similarity=similarity, regulariser="tv",
                                                        regulariser_weight=0.1, dice_weight=0.0))
    batch.features.clear()
    if objective.needs_sam:
        add_sam_features(batch, load_sam())
    iterations = 0 if spec == "prediction" else args.iterations
    residual, _ = register_pair(model, batch, objective, iterations, args.lr)
    return residual, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs-file", default=str(REPO / "benchmarks/pairs/shared_ct.json"))
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS))
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument("--weights", help="FCN weights (default: the shipped ones)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--noise-hu", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/similarity.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_fcn(args.weights)
    _, specs = load_pair_list(args.pairs_file)
    rows = []
    for spec in (s for s in specs if s.name in args.pairs):
        clean = prepare_pair(spec, SPACING)
        transform = prealign(clean)
        variants = {"clean": clean, f"noise {args.noise_hu:g} HU": PreparedPair(
            clean.name, clean.description, noisy(clean.fixed, args.noise_hu, 1), noisy(clean.moving, args.noise_hu, 2),
            clean.fixed_body, clean.fixed_labels, clean.moving_labels, clean.label_names, clean.error_mm)}
        for variant, pair in variants.items():
            problem = RegistrationProblem(pair.fixed, pair.moving, options=RegistrationOptions(spacing=SPACING))
            whole = pair_from_problem(problem, transform, SPACING)
            if not whole.grid.same_as(clean.fixed.grid):
                raise RuntimeError(f"{spec.name}: the working grid differs from the prepared fixed grid")
            batch = crop_to_body(whole)
            for similarity in args.specs:
                residual, seconds = run_spec(similarity, model, batch, args)
                residual = resample_batch(residual, batch.grid, whole.grid)
                displacement = total_displacement(whole.grid, transform, residual)
                metrics = evaluate(clean, displacement).summary
                jacobian = jacobian_statistics(jacobian_determinant(displacement, whole.grid), clean.fixed_body.data > 0)
                row = {"pair": spec.name, "images": variant, "similarity": similarity,
                       "mean_dice": metrics["mean_dice"], "tre_median_mm": metrics["tre_median_mm"],
                       "std_jacobian": jacobian.std_jacobian, "percent_nonpositive": jacobian.percent_nonpositive,
                       "seconds": seconds}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows, args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine(),
                                             "settings": vars(args), "rows": rows}, indent=1))
    return 0


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{datetime.date.today().isoformat()}; {machine()}; torch {torch.__version__}, {args.threads} threads; "
          f"{args.iterations} refinement iterations, lr {args.lr:g}\n")
    print("| pair | images | similarity | mean Dice | TRE median (mm) | std(J) | % J <= 0 | time (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        tre = "-" if r["tre_median_mm"] != r["tre_median_mm"] else f"{r['tre_median_mm']:.2f}"
        print(f"| {r['pair']} | {r['images']} | {r['similarity']} | {r['mean_dice']:.3f} | {tre} | "
              f"{r['std_jacobian']:.3f} | {r['percent_nonpositive']:.3f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
