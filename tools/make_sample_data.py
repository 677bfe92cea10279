"""Builds Resources/SampleData from the TotalSegmentator test files (run once by a maintainer).

Usage: python tools/make_sample_data.py /path/to/shared/data/ct

Patient C's 512x512x20 slab (0.98 x 0.98 x 2 mm) is smoothed and resampled to 1.95 x 1.95 x 2 mm
so the sample stays small; its label map keeps the original file's y-flipped storage (same physical
space, different voxel order), which exercises the label reorientation path. Patient A's files
are copied unchanged except that the torso is stored as int16.
"""

import json
import sys
from pathlib import Path

import SimpleITK as sitk

OUT = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"


def halve_in_plane(image: sitk.Image, labels: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    size = image.GetSize()
    spacing = image.GetSpacing()
    new_size = (size[0] // 2, size[1] // 2, size[2])
    new_spacing = (spacing[0] * 2, spacing[1] * 2, spacing[2])
    # keep the physical box: the first new voxel centre sits half an old voxel further in
    origin = image.TransformContinuousIndexToPhysicalPoint((0.5, 0.5, 0.0))
    reference = sitk.Image(new_size, sitk.sitkInt16)
    reference.SetSpacing(new_spacing)
    reference.SetOrigin(origin)
    reference.SetDirection(image.GetDirection())
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), (spacing[0] * 0.8, spacing[1] * 0.8, 0.01))
    ct = sitk.Cast(sitk.Round(sitk.Resample(smoothed, reference, sitk.Transform(), sitk.sitkLinear, -1024.0)), sitk.sitkInt16)
    # the label grid: the same voxels with the y axis stored in reverse, as in the source file
    flipped = sitk.Flip(reference, (False, True, False))
    label_map = sitk.Resample(labels, flipped, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return ct, label_map


def main(source: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ct_c, labels_c = halve_in_plane(sitk.ReadImage(str(source / "tsC_ct_slab_2mm.nii.gz")),
                                    sitk.ReadImage(str(source / "tsC_ct_slab_2mm_labels.nii.gz")))
    sitk.WriteImage(ct_c, str(OUT / "patientC_abdomen_ct.nii.gz"), True)
    sitk.WriteImage(labels_c, str(OUT / "patientC_abdomen_labels.nii.gz"), True)
    sitk.WriteImage(sitk.ReadImage(str(source / "tsA_ct_slab_3mm.nii.gz")), str(OUT / "patientA_abdomen_ct.nii.gz"), True)
    sitk.WriteImage(sitk.ReadImage(str(source / "tsA_ct_slab_3mm_labels.nii.gz")), str(OUT / "patientA_abdomen_labels.nii.gz"), True)
    torso = sitk.Cast(sitk.ReadImage(str(source / "tsA_ct_torso_3mm.nii.gz")), sitk.sitkInt16)
    sitk.WriteImage(torso, str(OUT / "patientA_torso_ct.nii.gz"), True)
    names = json.loads((source / "totalsegmentator_classes.json").read_text())
    (OUT / "label_names.json").write_text(json.dumps(names, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
