"""Tiny real data for the Slicer-side tests (worker, MRML bridge, pictures).

The bundled torso CT resampled to 8 mm voxels and cropped to 240 x 192 x 96 mm around the body
(30 x 24 x 12 voxels), and a moving image made from it with a known affine and a smooth 4 mm
deformation (:func:`make_synthetic_pair`). Registrations use ``spacing`` 8 mm, one thread and the
CPU, and take a few seconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import write_image
from SAMERegistrationLib.preprocess import body_mask
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.synthetic import SyntheticPair, make_synthetic_pair

REPO = Path(__file__).resolve().parent.parent
TORSO = REPO / "Resources" / "SampleData" / "patientA_torso_ct.nii.gz"
VOXEL_MM = 8.0
CROP_MM = (240.0, 192.0, 96.0)
FAST_OPTIONS = {"spacing": 8.0, "threads": 1, "affine_levels": [8.0], "affine_iterations": [120]}
FAST_MODE = "intensity"
"""The mode of the Slicer-side test runs: the intensity baseline, which runs at the 8 mm spacing
(the default mode, SAME, runs its learned stage at 2 mm and is tested in test_sam_voxelmorph.py)."""
"""Registration options of every test run: 8 mm working grid, one thread (two threads next to other
busy processes on a 2-core machine run slower), a single 8 mm affine level."""
LABEL_NAMES = {1: "bone", 2: "soft tissue"}


def small_torso(voxel_mm: float = VOXEL_MM, crop_mm: tuple[float, float, float] = CROP_MM) -> Image:
    """The torso CT (HU) resampled to ``voxel_mm`` voxels, cropped to ``crop_mm`` (x, y, z) around
    its body centroid."""
    source = sitk.ReadImage(str(TORSO))
    full = Image.from_sitk(source)
    centre_ijk = torch.nonzero(body_mask(full, True).data).double().mean(0).flip(0).numpy()
    centre = full.grid.index_to_world()[:3, :3] @ centre_ijk + full.grid.index_to_world()[:3, 3]
    size = [int(round(extent / voxel_mm)) for extent in crop_mm]
    direction = np.array(source.GetDirection()).reshape(3, 3)
    origin = centre - direction @ ((np.array(size) - 1) * voxel_mm / 2.0)
    small = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, tuple(map(float, origin)),
                          (voxel_mm,) * 3, source.GetDirection(), -1024.0, sitk.sitkFloat32)
    return Image.from_sitk(small)


def threshold_labels(image: Image) -> Image:
    """1 = bone (> 200 HU), 2 = other soft tissue (> -200 HU), 0 elsewhere."""
    labels = torch.zeros(image.grid.shape, dtype=torch.int64)
    labels[image.data > -200.0] = 2
    labels[image.data > 200.0] = 1
    return Image(labels, image.grid)


@dataclass(frozen=True)
class TinyPair:
    pair: SyntheticPair
    fixed_labels: Image
    moving_labels: Image

    @property
    def fixed(self) -> Image:
        return self.pair.fixed

    @property
    def moving(self) -> Image:
        return self.pair.moving


@functools.lru_cache(maxsize=1)
def tiny_pair() -> TinyPair:
    fixed = small_torso()
    pair = make_synthetic_pair(fixed, translation_mm=(40.0, -20.0, 10.0), field_amplitude_mm=4.0)
    labels = threshold_labels(fixed)
    return TinyPair(pair, labels, resample_labels(labels, pair.moving.grid, pair.psi))


def write_tiny_pair(folder: Path) -> dict[str, Path]:
    """Writes fixed, moving and both label maps as NIfTI files into ``folder``."""
    data = tiny_pair()
    paths = {name: folder / f"{name}.nii.gz" for name in ("fixed", "moving", "fixed_labels", "moving_labels")}
    write_image(data.fixed, paths["fixed"])
    write_image(data.moving, paths["moving"])
    write_image(data.fixed_labels, paths["fixed_labels"], sitk.sitkUInt8)
    write_image(data.moving_labels, paths["moving_labels"], sitk.sitkUInt8)
    return paths
