"""TVF-diffeomorphic modes against the SAME mode on the shared CTs (issue 8, item 6; not a test:
prints a markdown table for the README).

Pair: tsA->tsC, the held-out labelled inter-patient pair (fixed = TotalSegmentator case C abdomen
slab, 2 mm slices; moving = case A slab, 3 mm), the bundled sample pair.

Every row is one ``register_files`` run, exactly as ``same-register FIXED MOVING --mode MODE`` with
the labels (default options: 2 mm working grid, SAM-affine pre-alignment; ``--threads``), so the
numbers are those of the product's ``summary.json``:

* Dice: mean over the labels present in both label maps (nearest-neighbour warped moving labels on
  the fixed grid; a label the warp loses scores 0).
* % J <= 0, std(log J): det(d phi / dx) on the fixed file's grid inside the fixed body mask (plain
  log J over J > 0, not Learn2Reg's log(J + 3)); for the TVF modes also of the inverse on the moving
  grid inside the moving body mask.
* inverse consistency: mean and max of ``|phi_inv(phi(x)) - x|`` (mm) over the fixed body voxels of
  the working grid, with the files' transforms (TVF modes only: the others have no inverse).
* time: registration wall time (s), outputs excluded.

Rows "network only" run the same mode with ``--refine-iterations 0``; rows "without SAM-coarse
guidance" with ``--no-sam-coarse``; the row "mode coarse" is SAME without its learned stage.

Usage:
    python benchmarks/benchmark_tvf.py [--data ../shared/data/ct] [--threads 2] [--modes tvf tvf-lddmm same]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import traceback
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
from SAMERegistrationLib.pipeline.problem import RegistrationOptions  # noqa: E402
from SAMERegistrationLib.registration import RegistrationRequest, register_files  # noqa: E402

DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "ct"
ROWS = {"tvf": ("TM-TVF", "tvf", None, True), "tvf-lddmm": ("TM-TVF-LDDMM", "tvf-lddmm", None, True),
        "tvf-network": ("TM-TVF, network only", "tvf", 0, True),
        "tvf-lddmm-network": ("TM-TVF-LDDMM, network only", "tvf-lddmm", 0, True),
        "tvf-no-coarse": ("TM-TVF without SAM-coarse guidance (`--no-sam-coarse`)", "tvf", None, False),
        "tvf-lddmm-no-coarse": ("TM-TVF-LDDMM without SAM-coarse guidance", "tvf-lddmm", None, False),
        "same": ("SAME (SAM-affine + SAM-coarse + SAM-VoxelMorph)", "same", None, True),
        "coarse": ("SAM-affine + SAM-coarse (mode coarse)", "coarse", None, True)}
"""row key -> (label, mode, refine iterations (None: the stage's default), SAM-coarse on)."""


def run_row(data: Path, mode: str, refine: int | None, sam_coarse: bool, threads: int, workdir: Path) -> dict:
    request = RegistrationRequest(
        fixed=data / "tsC_ct_slab_2mm.nii.gz", moving=data / "tsA_ct_slab_3mm.nii.gz", output_dir=workdir,
        mode=mode, fixed_labels=data / "tsC_ct_slab_2mm_labels.nii.gz",
        moving_labels=data / "tsA_ct_slab_3mm_labels.nii.gz", refine_iterations=refine, sam_coarse=sam_coarse,
        device="cpu", overview=False, options=RegistrationOptions(threads=threads))
    return register_files(request)


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_row(label: str, summary: dict | None, error: str | None) -> str:
    if summary is None:
        return f"| {label} | - | - | - | - | - | - | failed: {error} |"
    inverse = summary.get("inverse", {})
    consistency = inverse.get("consistency", {})
    inverse_jacobian = inverse.get("jacobian", {})
    jacobian = summary["jacobian"]
    return (f"| {label} | {summary['dice']['mean']:.3f} | {jacobian['percent_nonpositive']:.4f} | "
            f"{jacobian['std_log_jacobian']:.3f} | "
            f"{number(consistency.get('mean_mm'), 3)} / {number(consistency.get('max_mm'), 2)} | "
            f"{number(inverse_jacobian.get('percent_nonpositive'), 4)} | {summary['registration_seconds']:.1f} | "
            f"{'; '.join(_notes(summary)) or '-'} |")


def _notes(summary: dict) -> list[str]:
    notes = []
    for stage in summary["stages"]:
        details = stage["details"]
        if "fallback" in details:
            notes.append(f"{stage['name']}: {details['fallback']}")
        if "refinement" in details:
            refinement = details["refinement"]
            notes.append(f"{stage['name']} refinement loss {refinement['loss_before']:.3f} -> {refinement['loss_after']:.3f}")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"tsA->tsC, {datetime.date.today()}, {platform.machine()}, torch {torch.__version__} CPU, "
             f"{args.threads} threads, default options (2 mm working grid)", "",
             "| method | mean Dice | % J<=0 | std(log J) | inverse consistency mean / max (mm) | "
             "inverse % J<=0 | time (s) | notes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key in args.rows:
        label, mode, refine, sam_coarse = ROWS[key]
        summary = error = None
        with tempfile.TemporaryDirectory(prefix="tvf-benchmark-") as folder:
            try:
                summary = run_row(args.data, mode, refine, sam_coarse, args.threads, Path(folder))
            except Exception as failure:   # a failed method is a row of the table
                traceback.print_exc(file=sys.stderr)
                error = f"{type(failure).__name__}: {failure}"
        lines.append(table_row(label, summary, error))
        print(lines[-1], file=sys.stderr, flush=True)
        if summary is not None and key == args.rows[0]:
            lines[0] += f"; Dice before registration {summary['dice']['mean_before_registration']:.3f}"
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
