"""SAM-VoxelMorph ablation, mirroring the SAME paper's Table 2 and Table 1's middle block (not a test;
results go in the README).

Table 2 (networks, all started from SAM-affine + SAM-coarse): plain VM (no correlation, local NCC),
VM + SAM loss, VM + SAM correlation, VM + both, each trained by ``same-train-vm`` with the same
budget; rows for the network alone (no refinement) and with the default test-time refinement.
Table 1 middle block (stage combinations, with refinement): SA+VM, SA+SAM-VM, SA+SC+VM,
SA+SC+SAM-VM (SA = SAM-affine, SC = SAM-coarse, VM = the plain network, SAM-VM = VM + both).

Pairs:
  * sample: the bundled inter-patient pair (fixed patient C, moving patient A; 27 shared labels):
    mean Dice. It is held out of the networks' training.
  * synthetic: a chest CT of ../shared/data/ct (radiomicsE, if present; else the bundled torso)
    under a known affine + smooth 10 mm deformation and a contrast change: error |psi(phi(x)) - x|
    inside the body (these volumes are synthetic-pair sources in training, under other deformations).
Each row also gives std(J) and % J <= 0 inside the fixed body and the learned stage's time.

Usage: python benchmarks/benchmark_sam_voxelmorph.py --networks VM=a.pt VM+SAM-loss=b.pt
           VM+correlation=c.pt VM+both=d.pt [--threads 1] [--pairs sample synthetic]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image, read_labels
from SAMERegistrationLib.metrics import dice_per_label, shared_labels
from SAMERegistrationLib.pipeline.problem import RegistrationOptions, RegistrationProblem
from SAMERegistrationLib.pipeline.runner import RegistrationPipeline
from SAMERegistrationLib.preprocess import body_mask
from SAMERegistrationLib.sam.embedding import load_sam
from SAMERegistrationLib.sam_voxelmorph.network import load_sam_vm
from SAMERegistrationLib.spatial.jacobian import jacobian_determinant, jacobian_statistics
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.stages.sam_affine import SAMAffine
from SAMERegistrationLib.stages.sam_coarse import SAMCoarse
from SAMERegistrationLib.stages.sam_voxelmorph import DEFAULT_REFINE_ITERATIONS, SAMVoxelMorph
from SAMERegistrationLib.synthetic import make_synthetic_pair, with_contrast_change

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "Resources" / "SampleData"
SHARED_CHEST = REPO.parent / "shared" / "data" / "ct" / "radiomicsE_ct_chest.nii.gz"

Evaluate = Callable[[SpatialTransform], dict[str, float]]


def sample_pair() -> tuple[Image, Image, Evaluate]:
    fixed = read_image(SAMPLES / "patientC_abdomen_ct.nii.gz")
    moving = read_image(SAMPLES / "patientA_abdomen_ct.nii.gz")
    fixed_labels = read_labels(SAMPLES / "patientC_abdomen_labels.nii.gz", fixed, "fixed labels")
    moving_labels = read_labels(SAMPLES / "patientA_abdomen_labels.nii.gz", moving, "moving labels")
    labels = shared_labels(fixed_labels.data, moving_labels.data)

    def evaluate(transform: SpatialTransform) -> dict[str, float]:
        warped = resample_labels(moving_labels, fixed.grid, transform).data
        return {"Dice": float(np.mean(list(dice_per_label(fixed_labels.data, warped, labels).values())))}

    return fixed, moving, evaluate


def synthetic_pair() -> tuple[Image, Image, Evaluate]:
    source = read_image(SHARED_CHEST if SHARED_CHEST.is_file() else SAMPLES / "patientA_torso_ct.nii.gz")
    pair = make_synthetic_pair(source, rotation_deg=(3, -2, 6), scale=(1.04, 0.97, 1.0),
                               translation_mm=(25.0, -15.0, 10.0), field_amplitude_mm=10.0, seed=5)
    moving = with_contrast_change(pair.moving, gain=1.08, offset_hu=25.0, noise_hu=15.0, seed=5)
    mask = body_mask(source, True)
    points = mask.grid.world_points()[mask.data.bool()]

    def evaluate(transform: SpatialTransform) -> dict[str, float]:
        error = pair.error_mm(transform, points)
        return {"median error (mm)": float(error.median()), "p90 error (mm)": float(torch.quantile(error, 0.9))}

    return source, moving, evaluate


PAIRS = {"sample": sample_pair, "synthetic": synthetic_pair}


def jacobian_numbers(fixed: Image, transform: SpatialTransform) -> dict[str, float]:
    mask = body_mask(fixed, True).data > 0
    jacobian = jacobian_determinant(transform.displacement_on(fixed.grid), fixed.grid)
    stats = jacobian_statistics(jacobian, mask)
    return {"std(J)": stats.std_jacobian, "% J<=0": stats.percent_nonpositive}


def run_pair(name: str, networks: dict[str, Path], refine_iterations: int) -> list[tuple[str, str, dict]]:
    fixed, moving, evaluate = PAIRS[name]()
    problem = RegistrationProblem(fixed, moving, options=RegistrationOptions())
    sam = load_sam()
    rows = []

    def measure(table: str, label: str, stages, initial: SpatialTransform | None) -> SpatialTransform:
        start = time.perf_counter()
        result = RegistrationPipeline(stages).run(problem, initial=initial)
        numbers = {**evaluate(result.transform), **jacobian_numbers(fixed, result.transform),
                   "time (s)": time.perf_counter() - start}
        rows.append((table, label, numbers))
        print(f"{name} | {table} | {label} | " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()), flush=True)
        return result.transform

    rows.append(("stages", "none", {**evaluate(SpatialTransform.identity())}))
    sa = measure("stages", "SA", [SAMAffine(sam)], None)
    sa_sc = measure("stages", "SA+SC", [SAMCoarse(sam)], sa)
    for variant, path in networks.items():
        network = load_sam_vm(path)
        measure("networks", f"SA+SC+{variant} (network only)", [SAMVoxelMorph(network, sam, refine_iterations=0)], sa_sc)
        measure("networks", f"SA+SC+{variant} (+{refine_iterations} refinement)",
                [SAMVoxelMorph(network, sam, refine_iterations=refine_iterations)], sa_sc)
    plain, full = networks.get("VM"), networks.get("VM+both")
    for label, start, path in (("SA+VM", sa, plain), ("SA+SAM-VM", sa, full)):
        if path is not None:
            measure("stages", label, [SAMVoxelMorph(load_sam_vm(path), sam, refine_iterations=refine_iterations)], start)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", required=True, metavar="NAME=WEIGHTS",
                        help="network variants; VM and VM+both also give the stage-combination rows")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--refine-iterations", type=int, default=DEFAULT_REFINE_ITERATIONS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    networks = {name: Path(path) for name, path in (item.split("=", 1) for item in args.networks)}
    print(f"# SAM-VoxelMorph ablation: {platform.machine()}, {psutil.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, CPU")
    for name in args.pairs:
        rows = run_pair(name, networks, args.refine_iterations)
        keys = sorted({key for _, _, numbers in rows for key in numbers}, key=lambda k: (k != "Dice", k))
        print(f"\n## {name}\n\n| table | configuration | " + " | ".join(keys) + " |\n|---|---|" + "---:|" * len(keys))
        for table, label, numbers in rows:
            print(f"| {table} | {label} | " + " | ".join(f"{numbers[k]:.3f}" if k in numbers else "-" for k in keys) + " |")


if __name__ == "__main__":
    main()
