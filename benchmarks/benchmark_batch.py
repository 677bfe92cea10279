"""Throughput of ``same-register-batch``: pairs per minute against the number of local workers (not a
test; results go in the README).

The cohort: the bundled patient A abdomen slab (CT and its TotalSegmentator labels) resampled to
8 mm voxels as the fixed image (an atlas), and ``--pairs`` moving scans made from it with known
random shifts and smooth deformations (:func:`make_synthetic_pair`, one seed per pair), with the
atlas labels carried along as their labels. For every worker count the same command runs on a
fresh output folder; the wall time includes starting the local Dask cluster.

Usage: python benchmarks/benchmark_batch.py [--pairs 4] [--workers 1 2] [--threads-per-worker 1]
                                            [--mode intensity] [--spacing 8]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import SimpleITK as sitk
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import write_image
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.synthetic import make_synthetic_pair

REPOSITORY = Path(__file__).resolve().parents[1]
ABDOMEN = REPOSITORY / "Resources" / "SampleData" / "patientA_abdomen_ct.nii.gz"
ABDOMEN_LABELS = REPOSITORY / "Resources" / "SampleData" / "patientA_abdomen_labels.nii.gz"


def resampled(path: Path, voxel_mm: float, interpolator: int) -> sitk.Image:
    """The image at ``path`` resampled to ``voxel_mm`` voxels over its whole extent."""
    source = sitk.ReadImage(str(path))
    size = [int(round(n * s / voxel_mm)) for n, s in zip(source.GetSize(), source.GetSpacing())]
    return sitk.Resample(source, size, sitk.Transform(), interpolator, source.GetOrigin(), (voxel_mm,) * 3,
                         source.GetDirection(), -1024.0 if interpolator == sitk.sitkLinear else 0.0)


def write_cohort(folder: Path, pairs: int, voxel_mm: float) -> Path:
    """Writes the atlas, ``pairs`` moving scans with labels and ``pairs.csv``; returns the CSV."""
    fixed = Image.from_sitk(resampled(ABDOMEN, voxel_mm, sitk.sitkLinear))
    labels = Image.from_sitk(resampled(ABDOMEN_LABELS, voxel_mm, sitk.sitkNearestNeighbor), dtype=torch.int64)
    write_image(fixed, folder / "atlas.nii.gz")
    write_image(labels, folder / "atlas_labels.nii.gz", sitk.sitkUInt8)
    rows = ["fixed,moving,fixed_labels,moving_labels"]
    generator = torch.Generator().manual_seed(0)
    for index in range(pairs):
        shift = (torch.rand(3, generator=generator) * 40.0 - 20.0).tolist()
        pair = make_synthetic_pair(fixed, translation_mm=tuple(shift), field_amplitude_mm=6.0, seed=index)
        write_image(pair.moving, folder / f"scan{index:02d}.nii.gz")
        write_image(resample_labels(labels, pair.moving.grid, pair.psi), folder / f"scan{index:02d}_labels.nii.gz",
                    sitk.sitkUInt8)
        rows.append(f"atlas.nii.gz,scan{index:02d}.nii.gz,atlas_labels.nii.gz,scan{index:02d}_labels.nii.gz")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def run_batch(pairs_csv: Path, outroot: Path, workers: int, threads: int, mode: str, spacing: float) -> dict:
    """One ``same-register-batch`` run; its wall time and the table's per-pair numbers."""
    command = [sys.executable, "-m", "SAMERegistrationLib.batch.cli", str(pairs_csv), "-o", str(outroot),
               "--mode", mode, "--spacing", f"{spacing:g}", "--workers", str(workers),
               "--threads-per-worker", str(threads), "--no-overview", "--quiet"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY),
                                                                             os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):   # 1: some pair failed (reported in the table)
        raise SystemExit(f"same-register-batch exited with {done.returncode}: {done.stderr.strip()}")
    with open(outroot / "results.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    ok = [row for row in rows if row["status"] == "ok"]
    return {"exit": done.returncode, "wall_s": wall, "ok": len(ok), "pairs": len(rows),
            "mean_pair_s": sum(float(row["seconds"]) for row in ok) / max(len(ok), 1),
            "mean_dice": sum(float(row["mean_dice"]) for row in ok) / max(len(ok), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--mode", default="intensity")
    parser.add_argument("--spacing", type=float, default=8.0)
    args = parser.parse_args()
    print(f"# {platform.node()}: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"load average {os.getloadavg()[0]:.1f} at the start; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="same-batch-benchmark-") as scratch:
        pairs_csv = write_cohort(Path(scratch), args.pairs, args.spacing)
        print(f"# {args.pairs} pairs: abdomen atlas at {args.spacing:g} mm, --mode {args.mode}, "
              f"--threads-per-worker {args.threads_per_worker}")
        print("| workers | pairs ok | wall time (s) | pairs per minute | mean time per pair (s) | mean Dice |")
        print("|---|---|---|---|---|---|")
        for workers in args.workers:
            result = run_batch(pairs_csv, Path(scratch) / f"out-{workers}", workers, args.threads_per_worker,
                               args.mode, args.spacing)
            print(f"| {workers} | {result['ok']}/{result['pairs']} | {result['wall_s']:.0f} | "
                  f"{60 * result['ok'] / result['wall_s']:.2f} | {result['mean_pair_s']:.1f} | "
                  f"{result['mean_dice']:.3f} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
