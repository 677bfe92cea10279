"""Time, peak memory and accuracy per stage of the intensity baseline (not a test; results go in the README).

Pairs:
  * sample: the bundled inter-patient pair (fixed patient C abdomen slab, moving patient A slab).
  * chest-size: the bundled torso CT resampled to 2 mm and padded to 192x160x256 voxels (the SAME
    authors' working size), against a known affine + smooth deformation of itself.

Usage: python benchmarks/benchmark_pipeline.py [--threads 2] [--pairs sample chest-size] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image, read_labels
from SAMERegistrationLib.metrics import dice_per_label, shared_labels
from SAMERegistrationLib.modes import build_pipeline
from SAMERegistrationLib.outputs import compute_result_images
from SAMERegistrationLib.pipeline.memory import PeakMemory
from SAMERegistrationLib.pipeline.problem import RegistrationOptions, RegistrationProblem, resolve_device
from SAMERegistrationLib.preprocess import body_mask
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_image, resample_labels
from SAMERegistrationLib.synthetic import make_synthetic_pair

SAMPLES = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
CHEST_SIZE_IJK = (192, 160, 256)


LARGE_ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach"}

Evaluate = Callable[[SpatialTransform], dict[str, float]]


def sample_pair() -> tuple[Image, Image, Evaluate]:
    """The demo pair; accuracy = mean Dice over shared labels and over the large organs."""
    fixed = read_image(SAMPLES / "patientC_abdomen_ct.nii.gz")
    moving = read_image(SAMPLES / "patientA_abdomen_ct.nii.gz")
    fixed_labels = read_labels(SAMPLES / "patientC_abdomen_labels.nii.gz", fixed, "fixed labels")
    moving_labels = read_labels(SAMPLES / "patientA_abdomen_labels.nii.gz", moving, "moving labels")

    def evaluate(transform: SpatialTransform) -> dict[str, float]:
        warped = resample_labels(moving_labels, fixed.grid, transform).data
        scores = dice_per_label(fixed_labels.data, warped, shared_labels(fixed_labels.data, moving_labels.data))
        large = [scores[label] for label in LARGE_ORGANS if label in scores]
        return {"mean Dice": float(np.mean(list(scores.values()))), "large-organ Dice": float(np.mean(large)),
                "labels": float(len(scores))}

    return fixed, moving, evaluate


def chest_size_pair() -> tuple[Image, Image, Evaluate]:
    """Torso at 2 mm padded to 192x160x256; accuracy = error of the known deformation in the body."""
    torso = read_image(SAMPLES / "patientA_torso_ct.nii.gz")
    size = np.array(CHEST_SIZE_IJK)
    origin = torso.grid.centre_world() - (size - 1) * 2.0 / 2.0
    grid = Grid.create(size[::-1], (2.0, 2.0, 2.0), origin)
    fixed = resample_image(torso, grid, fill=-1024.0)
    pair = make_synthetic_pair(fixed)
    body = resample_image(body_mask(fixed, is_ct=True), grid, interpolation="nearest").data > 0
    points = grid.world_points()[body]

    def evaluate(transform: SpatialTransform) -> dict[str, float]:
        error = pair.error_mm(transform, points)
        return {"median error (mm)": float(error.median()), "95th pct error (mm)": float(torch.quantile(error, 0.95))}

    return fixed, pair.moving, evaluate


PAIRS = {"sample": sample_pair, "chest-size": chest_size_pair}


def run(name: str, device: torch.device) -> tuple[list[tuple[str, float, float, float | None]], dict[str, dict]]:
    fixed, moving, evaluate = PAIRS[name]()
    print(f"\n{name}: fixed {fixed.grid.describe()}\n{' ' * len(name)}  moving {moving.grid.describe()}", flush=True)
    problem = RegistrationProblem(fixed, moving, options=RegistrationOptions(), device=device)
    result = build_pipeline("intensity").run(problem)
    rows = [(r.name, r.seconds, r.host_peak_mib, r.cuda_peak_mib) for r in result.stages]
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        images = compute_result_images(fixed, moving, result.transform)
    rows.append(("outputs (warp, field, Jacobian)", time.perf_counter() - start, memory.host_peak_mib, None))
    accuracy = {
        "before": evaluate(SpatialTransform.identity()),
        "affine": evaluate(SpatialTransform.from_affine(result.transform.affine)),
        "deformable": evaluate(result.transform),
    }
    folded = float((images.jacobian <= 0).float().mean() * 100)
    accuracy["deformable"]["% J<=0 (fixed grid)"] = folded
    return rows, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"# intensity baseline benchmark: {platform.processor() or platform.machine()}, "
          f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, "
          f"{args.threads} threads, device {device}")
    results = {name: run(name, device) for name in args.pairs}
    for name, (rows, accuracy) in results.items():
        print(f"\n## {name}\n\n| stage | time (s) | peak RSS (MiB) | peak CUDA (MiB) |\n|---|---:|---:|---:|")
        for stage, seconds, host, cuda in rows:
            print(f"| {stage} | {seconds:.1f} | {host:.0f} | {'-' if cuda is None else f'{cuda:.0f}'} |")
        print(f"| **total** | **{sum(r[1] for r in rows):.1f}** | | |\n")
        for step, metrics in accuracy.items():
            print(f"- {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

if __name__ == "__main__":
    main()
