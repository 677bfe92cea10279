"""``same-register``: register a moving image to a fixed image from the command line."""

from __future__ import annotations

import argparse
import sys
import threading
import warnings
from pathlib import Path

from .command_line import EXIT_BAD_INPUT, EXIT_CANCELLED, CommandLineParser, print_warnings_as_lines
from .errors import InputError, RegistrationCancelled, RegistrationFailed
from .learning.objective import similarity_names
from .modes import DEFAULT_MODE, MODE_NAMES
from .pipeline.problem import RegistrationOptions
from .pipeline.progress import ProgressEvent
from .registration import RegistrationRequest, register_files
from .signals import terminate_like_ctrl_c

EXIT_FAILED = 1


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(
        prog="same-register",
        description="Register a MOVING 3-D image (CT first) to a FIXED one. Writes transform.h5 (fixed -> moving, "
                    "ITK/Slicer readable), affine.tfm, displacement.nii.gz, warped.nii.gz, jacobian.nii.gz, "
                    "warped_labels.nii.gz (with --moving-labels), summary.json and overview.png into OUTDIR; the TVF modes "
                    "add inverse_transform.h5 (moving -> fixed) and inverse_jacobian.nii.gz.")
    parser.add_argument("fixed", help="fixed image: NIfTI, NRRD, MHA or a DICOM series folder")
    parser.add_argument("moving", help="moving image: NIfTI, NRRD, MHA or a DICOM series folder")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    parser.add_argument("--moving-labels", metavar="FILE", help="label map on the moving image's grid, warped to the fixed grid")
    parser.add_argument("--fixed-labels", metavar="FILE", help="label map on the fixed grid; with --moving-labels gives Dice per label")
    parser.add_argument("--label-names", metavar="FILE",
                        help='JSON object naming the label values, {"1": "spleen", ...}, for summary.json and '
                             "overview.png (default: label_names.json beside the label maps, when there is one)")
    parser.add_argument("--fixed-mask", metavar="FILE", help="binary mask on the fixed grid restricting the similarity (default: body mask)")
    parser.add_argument("--moving-mask", metavar="FILE",
                        help="binary mask on the moving grid: moving voxels outside it take no part in the similarity")
    parser.add_argument("--initial-transform", metavar="FILE", help="ITK transform file (fixed -> moving) to start from; skips the initial alignment")
    add_registration_options(parser)
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def add_registration_options(parser: argparse.ArgumentParser) -> None:
    """Adds the options that choose how an image pair is registered (not which files): the mode, its
    weights and refinement, the device, the working spacing and the outputs. ``same-register-batch``
    applies them to every pair; :func:`registration_request` reads them back."""
    parser.add_argument("--mode", default=DEFAULT_MODE, choices=MODE_NAMES, help=f"registration mode (default {DEFAULT_MODE})")
    parser.add_argument("--sam-weights", metavar="FILE", help="SAM weights for the SAM modes (default: the shipped ones; "
                                                              "FILE.sha256 must hold its SHA-256)")
    parser.add_argument("--vm-weights", metavar="FILE", help="SAM-VoxelMorph weights for --mode same (default: the shipped "
                                                             "ones; FILE.sha256 must hold its SHA-256)")
    parser.add_argument("--tvf-weights", metavar="FILE", help="TVF weights for --mode tvf / tvf-lddmm (default: the "
                                                              "shipped ones; FILE.sha256 must hold its SHA-256)")
    parser.add_argument("--no-sam-coarse", action="store_true", help="--mode same, tvf, tvf-lddmm without the SAM-coarse stage")
    parser.add_argument("--refine-iterations", type=int, metavar="N",
                        help="test-time refinement iterations of the learned stages (0: network output only; "
                             "default: the stage's own, 50 for SAM-VoxelMorph)")
    parser.add_argument("--similarity", metavar="SPEC",
                        help="similarity of the learned stages' test-time refinement (modes same, tvf, tvf-lddmm): "
                             f"a name or a weighted sum such as 'lncc+0.1*sam'; names: {', '.join(similarity_names())} "
                             "(default: the stage's own)")
    parser.add_argument("--precision-iterations", type=int, metavar="N",
                        help="--mode same: iterations of a final precision step on the full-resolution working "
                             "images after the refinement (about 3 s of CPU each on a 2 mm chest pair; "
                             "default 0: none)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--spacing", type=float, default=RegistrationOptions.spacing, metavar="MM",
                        help=f"finest working voxel size in mm (default {RegistrationOptions.spacing:g})")
    parser.add_argument("--label-interpolation", choices=("nearest", "onehot"), default="nearest",
                        help="nearest (standard, default) or onehot (smoother boundaries, slower)")
    parser.add_argument("--no-overview", action="store_true", help="do not render overview.png")


def registration_request(args: argparse.Namespace, fixed: str | Path, moving: str | Path, output_dir: str | Path,
                         threads: int | None, moving_labels: str | Path | None = None,
                         fixed_labels: str | Path | None = None, label_names: str | Path | None = None,
                         fixed_mask: str | Path | None = None, moving_mask: str | Path | None = None,
                         initial_transform: str | Path | None = None) -> RegistrationRequest:
    """The request of one pair: its files and thread count, and the options of
    :func:`add_registration_options` as parsed into ``args``."""
    return RegistrationRequest(
        fixed=fixed, moving=moving, output_dir=output_dir, mode=args.mode,
        moving_labels=moving_labels, fixed_labels=fixed_labels, label_names=label_names, fixed_mask=fixed_mask,
        moving_mask=moving_mask, initial_transform=initial_transform, sam_weights=args.sam_weights, vm_weights=args.vm_weights,
        tvf_weights=args.tvf_weights, sam_coarse=not args.no_sam_coarse, refine_iterations=args.refine_iterations,
        similarity=args.similarity, precision_iterations=args.precision_iterations, device=args.device,
        label_method=args.label_interpolation,
        overview=not args.no_overview, options=RegistrationOptions(spacing=args.spacing, threads=threads))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    request = registration_request(args, args.fixed, args.moving, args.output, args.threads,
                                   moving_labels=args.moving_labels, fixed_labels=args.fixed_labels,
                                   label_names=args.label_names, fixed_mask=args.fixed_mask,
                                   moving_mask=args.moving_mask, initial_transform=args.initial_transform)
    bars = None if args.quiet else _ProgressBars()
    cancel = threading.Event()
    with warnings.catch_warnings(), terminate_like_ctrl_c(cancel):
        warnings.simplefilter("always")
        warnings.showwarning = print_warnings_as_lines("same-register")
        try:
            summary = register_files(request, on_progress=bars, cancel=cancel)
        except InputError as error:
            print(f"same-register: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except RegistrationFailed as error:
            print(f"same-register: error: {error}", file=sys.stderr)
            return EXIT_FAILED
        except (RegistrationCancelled, KeyboardInterrupt):
            print("same-register: cancelled; no partial output is left in the output folder", file=sys.stderr)
            return EXIT_CANCELLED
        finally:
            if bars is not None:
                bars.close()
    _print_summary(summary, Path(args.output))
    return 0


def _print_summary(summary: dict, outdir: Path) -> None:
    jac = summary["jacobian"]
    print(f"Registered in {summary['registration_seconds']:.1f} s on {summary['device']} "
          f"({summary['threads']} threads).")
    for stage in summary["stages"]:
        print(f"  {stage['name']:<22} {stage['seconds']:7.1f} s  peak {stage['peak_host_memory_mib']:7.0f} MiB")
    print(f"Jacobian in the body: {jac['percent_nonpositive']:.4f}% J<=0, std(J) {jac['std_jacobian']:.4f}, "
          f"std(log J) {jac['std_log_jacobian']:.4f}")
    if "dice" in summary:
        dice = summary["dice"]
        print(f"Mean Dice over {dice['labels_compared']} labels: {dice['mean_before_registration']:.3f} before, "
              f"{dice['mean']:.3f} after")
    if "inverse" in summary:
        consistency = summary["inverse"]["consistency"]
        print(f"Inverse consistency |phi_inv(phi(x)) - x| in the body: mean {consistency['mean_mm']:.3f} mm, "
              f"max {consistency['max_mm']:.3f} mm")
    print(f"Outputs in {outdir}")


class _ProgressBars:
    """One tqdm bar per stage on stderr, fed by ProgressEvents."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = None
        self._stage = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = self._tqdm(total=100, desc=f"[{event.stage_index + 1}/{event.stage_count}] {event.stage}",
                                   bar_format="{desc:<32} {bar} {percentage:3.0f}% {elapsed} {postfix}", file=sys.stderr)
        self._bar.n = round(100 * min(max(event.fraction, 0.0), 1.0))
        self._bar.set_postfix_str(event.message, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


if __name__ == "__main__":
    sys.exit(main())
