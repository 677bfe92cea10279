"""Turns a registration result into the output folder: transforms, images, maps and a summary.

The file names (:mod:`.output_files`) are a stable contract. Files are written to
a hidden temporary folder first and moved into place at the end as one set (see
:mod:`.output_folder`), so a failed or cancelled run never leaves a half-written set, and files of
an earlier run that this run does not write are removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import torch

from .export import write_affine, write_displacement_field, write_transform
from .image import Image
from .io import write_image, write_labels
from .output_files import (AFFINE_FILE, DISPLACEMENT_FILE, INVERSE_JACOBIAN_FILE, INVERSE_TRANSFORM_FILE,
                           JACOBIAN_FILE, OUTPUT_FILES, OVERVIEW_FILE, SUMMARY_FILE, TRANSFORM_FILE, WARPED_FILE,
                           WARPED_LABELS_FILE)
from .output_folder import commit, staging_folder
from .preprocess import CT_AIR_HU
from .metrics import dice_per_label, shared_labels
from .spatial.grid import Grid
from .spatial.jacobian import jacobian_determinant, jacobian_statistics
from .spatial.transform import InverseTransform, SpatialTransform
from .spatial.warp import LabelMethod, resample_image, resample_labels

@dataclass(frozen=True)
class ResultImages:
    """Everything derived from the transform on the fixed grid.

    Attributes:
        warped: moving image resampled through the result onto the fixed grid (linear).
        displacement: ``(3, D, H, W)`` LPS mm, phi(x) - x on the fixed grid.
        jacobian: ``(D, H, W)`` det of d phi / d x on the fixed grid.
        warped_labels: moving labels on the fixed grid, or None.
    """

    warped: Image
    displacement: torch.Tensor
    jacobian: torch.Tensor
    warped_labels: Image | None


def compute_result_images(fixed: Image, moving: Image, transform: SpatialTransform,
                          moving_labels: Image | None = None, label_method: LabelMethod = "nearest"
                          ) -> ResultImages:
    """Warps the moving image (and labels) and computes the displacement and Jacobian maps (CPU)."""
    transform = transform.to("cpu")
    warped = warp_image(moving, fixed.grid, transform)
    displacement = transform.displacement_on(fixed.grid)
    jacobian = jacobian_determinant(displacement, fixed.grid)
    labels = None if moving_labels is None else resample_labels(moving_labels, fixed.grid, transform, label_method)
    return ResultImages(warped, displacement, jacobian, labels)


def warp_image(moving: Image, target: Grid, transform: SpatialTransform | InverseTransform) -> Image:
    """``moving`` resampled (linear) at ``transform(x)`` for the voxels ``x`` of ``target``; points
    outside it take air (-1024 HU) or its minimum, whichever is lower."""
    return resample_image(moving, target, transform, fill=min(CT_AIR_HU, float(moving.data.min())))


@dataclass(frozen=True)
class InverseImages:
    """The inverse (moving -> fixed) transform and its maps on the moving grid.

    Attributes:
        transform: ``psi``, moving LPS mm -> fixed LPS mm.
        displacement: ``(3, D, H, W)`` LPS mm, psi(y) - y on the moving grid.
        jacobian: ``(D, H, W)`` det of d psi / d y on the moving grid.
    """

    transform: InverseTransform
    displacement: torch.Tensor
    jacobian: torch.Tensor


def compute_inverse_images(moving: Image, inverse: InverseTransform) -> InverseImages:
    """The inverse's displacement and Jacobian maps on the moving grid (CPU)."""
    inverse = inverse.to("cpu")
    displacement = inverse.displacement_on(moving.grid)
    return InverseImages(inverse, displacement, jacobian_determinant(displacement, moving.grid))


def inverse_consistency_summary(transform: SpatialTransform, inverse: InverseTransform, region: Image) -> dict:
    """Mean and max of ``|psi(phi(x)) - x|`` (mm) over the voxel centres ``x`` of ``region`` (a binary
    image, e.g. the fixed body mask)."""
    points = region.grid.world_points()[region.data > 0]
    with torch.no_grad():
        error = (inverse.to("cpu").map_points(transform.to("cpu").map_points(points)) - points).norm(dim=-1)
    return {"region": "fixed body mask", "mean_mm": round(float(error.mean()), 4),
            "max_mm": round(float(error.max()), 4), "points": int(error.numel())}


def label_summary(fixed_labels: Image, moving_labels: Image, warped_labels: Image, unregistered_labels: Image,
                  names: dict[int, str] | None = None) -> dict:
    """Dice per label over the labels present in both the fixed and the moving maps (0 for a label
    the warp lost), their mean, and the mean before registration (plain physical-space resampling).

    With ``names`` (label value -> name), ``label_names`` gives the name of each compared label
    that has one."""
    labels = shared_labels(fixed_labels.data, moving_labels.data)
    per_label = dice_per_label(fixed_labels.data, warped_labels.data, labels)
    before = dice_per_label(fixed_labels.data, unregistered_labels.data, labels)
    named = {str(k): names[k] for k in per_label if k in (names or {})}
    return {
        "per_label": {str(k): round(v, 4) for k, v in per_label.items()},
        **({"label_names": named} if named else {}),
        "mean": round(sum(per_label.values()) / len(per_label), 4) if per_label else float("nan"),
        "labels_compared": len(per_label),
        "mean_before_registration": round(sum(before.values()) / len(before), 4) if before else float("nan"),
    }


def jacobian_summary(jacobian: torch.Tensor, region: Image) -> dict:
    """%J<=0, std(J), std(log J) (plain, J>0 only) inside ``region`` (a binary image on the same grid)."""
    stats = jacobian_statistics(jacobian, region.data > 0).as_dict()
    return {"region": "fixed body mask", **{k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}}


def write_output_folder(outdir: Path, fixed: Image, moving: Image, transform: SpatialTransform,
                        images: ResultImages, summary: dict, has_affine_stage: bool,
                        fixed_labels: Image | None = None, overview: bool = True,
                        inverse: InverseImages | None = None, label_names: dict[int, str] | None = None,
                        body: Image | None = None) -> dict[str, str]:
    """Writes every output file into ``outdir`` (created and locked by the caller, see
    :func:`.output_folder.locked_output_folder`) and returns {kind: path}.

    ``label_names`` (label value -> name) name the labels of the overview; ``body`` (a binary image
    on the fixed grid, as used for the summary's Jacobian numbers) is the region of its folding figure.

    With ``inverse`` (modes with an inverse), ``inverse_transform.h5`` and
    ``inverse_jacobian.nii.gz`` (on the moving grid) are written too.

    ``summary`` is written as ``summary.json`` after the ``files`` entry is added to it.
    """
    outdir = Path(outdir)
    with staging_folder(outdir) as staging:
        transform = transform.to("cpu")
        files = {"transform": TRANSFORM_FILE, "displacement": DISPLACEMENT_FILE, "warped": WARPED_FILE,
                 "jacobian": JACOBIAN_FILE, "summary": SUMMARY_FILE}
        write_transform(transform, staging / TRANSFORM_FILE)
        if has_affine_stage:
            write_affine(transform.affine, staging / AFFINE_FILE)
            files["affine"] = AFFINE_FILE
        write_displacement_field(images.displacement, fixed.grid, staging / DISPLACEMENT_FILE)
        write_image(images.warped, staging / WARPED_FILE, sitk.sitkFloat32)
        write_image(Image(images.jacobian, fixed.grid), staging / JACOBIAN_FILE, sitk.sitkFloat32)
        if inverse is not None:
            write_transform(inverse.transform, staging / INVERSE_TRANSFORM_FILE)
            write_image(Image(inverse.jacobian, moving.grid), staging / INVERSE_JACOBIAN_FILE, sitk.sitkFloat32)
            files["inverse_transform"] = INVERSE_TRANSFORM_FILE
            files["inverse_jacobian"] = INVERSE_JACOBIAN_FILE
        if images.warped_labels is not None:
            write_labels(images.warped_labels, staging / WARPED_LABELS_FILE)
            files["warped_labels"] = WARPED_LABELS_FILE
        if overview:
            from .overview import render_overview

            render_overview(staging / OVERVIEW_FILE, fixed, moving, images.warped, images.displacement,
                            images.jacobian, title=_overview_title(summary),
                            fixed_labels=fixed_labels, warped_labels=images.warped_labels,
                            label_names=label_names, body=body)
            files["overview"] = OVERVIEW_FILE
        summary["files"] = dict(files)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        commit(staging, outdir, files.values(), OUTPUT_FILES)
    return {kind: str(outdir / name) for kind, name in files.items()}


def _overview_title(summary: dict) -> str:
    parts = [f"mode {summary.get('mode', '?')}", f"{summary.get('registration_seconds', 0):.1f} s"]
    jac = summary.get("jacobian", {})
    if jac:  # its % J <= 0 is in the caption (one folding figure, computed in the same region)
        parts.append(f"std(J) {jac['std_jacobian']:.3f}")
    dice = summary.get("dice")
    if dice:
        parts.append(f"mean Dice {dice['mean_before_registration']:.3f} -> {dice['mean']:.3f} ({dice['labels_compared']} labels)")
    return "   |   ".join(parts)


def read_complete_output(outdir: Path) -> dict | None:
    """The summary of the complete output set in ``outdir``, or None when there is none: no
    readable ``summary.json``, or a file its ``files`` entry lists is missing."""
    try:
        summary = json.loads((Path(outdir) / SUMMARY_FILE).read_text())
        names = list(summary["files"].values())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return summary if all((Path(outdir) / name).is_file() for name in names) else None
