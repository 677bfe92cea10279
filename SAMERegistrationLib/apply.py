"""``same-apply``: apply a saved transform to another image or label map (like antsApplyTransforms,
transformix or ``greedy -r``).

``same-apply TRANSFORM INPUT -r REFERENCE -o OUTPUT [--interpolation linear|nearest|onehot]``
resamples INPUT onto REFERENCE's grid: each output voxel ``x`` takes INPUT's value at
``TRANSFORM(x)``. ITK transform files map output (reference) points to input points, so
``transform.h5`` (fixed -> moving) brings moving-space images onto the fixed grid (REFERENCE = the
fixed image) and ``inverse_transform.h5`` (moving -> fixed) brings fixed-space images onto the
moving grid (REFERENCE = the moving image). The warping is the one ``same-register`` uses for
``warped.nii.gz`` (linear) and ``warped_labels.nii.gz`` (nearest or onehot), so it reproduces them.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import SimpleITK as sitk

from .command_line import EXIT_BAD_INPUT, CommandLineParser, print_warnings_as_lines
from .errors import InputError
from .export import read_transform
from .io import check_output_directory, read_grid, read_image, read_label_map, write_image, write_labels
from .outputs import warp_image
from .spatial.warp import resample_labels

INTERPOLATIONS = ("linear", "nearest", "onehot")
"""linear: intensity images; nearest and onehot: label maps (see resample_labels)."""


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(
        prog="same-apply",
        description="Apply a transform written by same-register (transform.h5, inverse_transform.h5) or any ITK "
                    "transform file to an image or label map, onto a reference image's grid.")
    parser.add_argument("transform", help="ITK transform file mapping REFERENCE points to INPUT points, e.g. "
                                          "transform.h5 (INPUT on the moving grid, REFERENCE the fixed image) or "
                                          "inverse_transform.h5 (INPUT on the fixed grid, REFERENCE the moving image)")
    parser.add_argument("input", help="image or label map to resample: NIfTI, NRRD, MHA or a DICOM series folder")
    parser.add_argument("-r", "--reference", required=True, metavar="REFERENCE",
                        help="image whose grid the output takes (its values are not used)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="output file (.nii.gz, .nrrd, .mha); its folder is created if needed")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS, default="linear",
                        help="linear (images, default), nearest or onehot (label maps: written as integers)")
    return parser


def apply_transform(transform_path: str | Path, input_path: str | Path, reference_path: str | Path,
                    output_path: str | Path, interpolation: str = "linear") -> None:
    """Resamples ``input_path`` through the transform onto the reference grid and writes ``output_path``.

    Raises:
        InputError: a missing or unreadable file, an unknown interpolation, or an output path that
            is one of the inputs or cannot be written (nothing is written then).
    """
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"--interpolation {interpolation}: unknown: use {', '.join(INTERPOLATIONS)}")
    output = Path(output_path)
    for given, role in ((transform_path, "transform"), (input_path, "input"), (reference_path, "reference")):
        if Path(given).exists() and output.resolve() == Path(given).resolve():
            raise InputError(f"output {output}: is the {role} file: choose another output path (inputs are never "
                             "overwritten)")
    reference = read_grid(reference_path, "reference image")
    transform = read_transform(transform_path, reference, "transform")
    if interpolation == "linear":
        warped = warp_image(read_image(input_path, "input image"), reference, transform)
    else:
        warped = resample_labels(read_label_map(input_path, "input labels"), reference, transform, interpolation)
    check_output_directory(output.parent)
    if interpolation == "linear":
        write_image(warped, output, sitk.sitkFloat32)
    else:
        write_labels(warped, output)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = print_warnings_as_lines("same-apply")
        try:
            apply_transform(args.transform, args.input, args.reference, args.output, args.interpolation)
        except InputError as error:
            print(f"same-apply: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
