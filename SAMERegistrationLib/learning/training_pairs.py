"""Training pairs for the learned registration stages: real pairs and synthetic deformations.

A *training list* (JSON) names the data; paths are relative to the list file::

    {"volumes": [{"image": "a.nii.gz", "labels": "a_labels.nii.gz"}, {"image": "b.nii.gz"}],
     "pairs":   [{"fixed": "b.nii.gz", "moving": "c.nii.gz"}]}

Every volume gives *synthetic* pairs: the moving crop is the volume sampled through a random
mapping ``psi(y) = c + A (y - c) + t + v(y)`` (small affine about the crop centre, smooth random
field ``v``) with a random intensity change (gain/offset, a contrast-like enhancement of soft
tissue, noise), so the network sees known large deformations and cross-phase appearance. Every
listed pair gives *real* pairs: the moving scan is pre-aligned to the fixed one once (initial
alignment + intensity affine, as the pipeline does before a deformable stage), then crops of both
are taken at the same place, the moving one optionally under a milder random deformation.

All crops are on the canonical working grid of their volume (isotropic ``spacing``, identity
direction). A batch's :class:`PairBatch` uses one crop grid with origin 0: only spacing and shape
matter for warping within a crop.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..image import Image
from ..io import read_image, read_labels
from ..pipeline.problem import RegistrationOptions, RegistrationProblem
from ..pipeline.runner import RegistrationPipeline
from ..preprocess import CT_AIR_HU, body_mask, ct_window, looks_like_ct, to_working_grid
from ..spatial.grid import Grid
from ..spatial.sampling import sample_at_points
from ..spatial.warp import resample_image, resample_labels
from ..stages.initial_alignment import InitialAlignment
from ..stages.intensity_affine import IntensityAffine
from ..synthetic import rotation_matrix
from .pairs import PairBatch


@dataclass(frozen=True)
class TrainingScan:
    """A fixed scan on its canonical working grid, with what a crop needs.

    Attributes:
        hu: HU image on the working grid.
        body: ``(D, H, W)`` bool body mask.
        labels: int64 label image on the same grid, or None.
        moving_hu / moving_labels: for a real pair, the pre-aligned moving scan on the same grid
            (None for a single volume, whose moving crops are synthetic).
        name: for logs.
    """

    hu: Image
    body: torch.Tensor
    labels: Image | None
    moving_hu: Image | None
    moving_labels: Image | None
    name: str

    @property
    def is_pair(self) -> bool:
        return self.moving_hu is not None

    def to_plain(self) -> dict:
        """Tensors, strings and tuples only (all images share ``hu.grid``), so a cache file loads with
        ``torch.load(weights_only=True)`` and no code in it can run."""
        grid = self.hu.grid
        return {"grid": {"shape": grid.shape, "spacing": grid.spacing, "origin": grid.origin,
                         "direction": grid.direction},
                "hu": self.hu.data, "body": self.body, "name": self.name,
                **{key: None if image is None else image.data for key, image in
                   (("labels", self.labels), ("moving_hu", self.moving_hu), ("moving_labels", self.moving_labels))}}

    @staticmethod
    def from_plain(plain: dict) -> TrainingScan:
        """The inverse of :meth:`to_plain`."""
        grid = Grid(**plain["grid"])

        def image(key: str) -> Image | None:
            return None if plain[key] is None else Image(plain[key], grid)

        return TrainingScan(image("hu"), plain["body"], image("labels"), image("moving_hu"), image("moving_labels"),
                            plain["name"])


@dataclass(frozen=True)
class Augmentation:
    """Random deformation and intensity change of synthetic (and real) moving crops.

    Attributes:
        rotation_deg, scale, translation_mm: ranges of the random affine (uniform in +-range).
        field_mm: largest vector of the random smooth field (uniform in [0, field_mm]).
        field_control_points: control points per axis of the random field.
        gain, offset_hu, noise_hu: intensity change ranges.
        enhancement_hu: largest contrast-like rise of soft tissue (0..300 HU) in the moving crop.
        real_pair_scale: real pairs get the deformation ranges times this.
    """

    rotation_deg: float = 6.0
    scale: float = 0.06
    translation_mm: float = 10.0
    field_mm: float = 12.0
    field_control_points: int = 5
    gain: float = 0.08
    offset_hu: float = 30.0
    noise_hu: float = 20.0
    enhancement_hu: float = 150.0
    real_pair_scale: float = 0.3


def add_data_options(parser: argparse.ArgumentParser, batch: int, crop: tuple[int, int, int]) -> None:
    """Adds the data options the registration training scripts share."""
    parser.add_argument("--training-list", required=True, help="JSON list of volumes and pairs (see training/)")
    parser.add_argument("--batch", type=int, default=batch, help="crop pairs per step and process")
    parser.add_argument("--crop", type=int, nargs=3, default=list(crop), metavar=("D", "H", "W"),
                        help="crop size in working voxels")
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--validation-batches", type=int, default=4)


@dataclass(frozen=True)
class TrainingData:
    """The prepared scans of a training list and how batches of crops are drawn from them."""

    scans: list[TrainingScan]
    batch: int
    crop: tuple[int, int, int]
    augmentation: Augmentation = Augmentation()

    @staticmethod
    def load(training_list: Path | str, spacing: float, batch: int, crop: tuple[int, int, int],
             cache: Path | None = None) -> TrainingData:
        """Reads and prepares a training list (see :func:`prepare_scans` for ``cache``).

        Raises:
            ValueError: the list names no volume and no pair.
        """
        volumes, pairs = load_training_list(training_list)
        scans = prepare_scans(volumes, pairs, spacing, cache)
        if not scans:
            raise ValueError(f"training list {training_list}: no volumes or pairs")
        return TrainingData(scans, batch, tuple(crop))

    def sample(self, generator: torch.Generator, device: torch.device) -> PairBatch:
        """One batch of random crop pairs on ``device``."""
        return sample_batch(self.scans, self.batch, self.crop, self.augmentation, generator).to(device)

    def validation_set(self, count: int, seed: int, device: torch.device) -> list[PairBatch]:
        """``count`` batches drawn with a fixed seed: the same crops at every validation."""
        generator = torch.Generator().manual_seed(10_000 + seed)
        return [self.sample(generator, device) for _ in range(count)]


def load_training_list(path: Path | str) -> tuple[list[dict], list[dict]]:
    """The volumes and pairs of a training list, with paths made absolute."""
    path = Path(path)
    spec = json.loads(path.read_text())

    def resolve(entry: dict) -> dict:
        return {key: str((path.parent / value).resolve()) if isinstance(value, str) else value
                for key, value in entry.items()}

    return [resolve(v) for v in spec.get("volumes", [])], [resolve(p) for p in spec.get("pairs", [])]


def prepare_scans(volumes: list[dict], pairs: list[dict], spacing: float, cache: Path | None = None
                  ) -> list[TrainingScan]:
    """Loads every volume and pre-aligns every pair (non-CT inputs are rejected: the learned stages
    are trained on CT in HU).

    With ``cache`` (a file, e.g. in the run's output folder) the prepared scans are saved there once
    and read back by later runs (``--resume``), skipping the pre-alignments; it holds only tensors and
    plain values (:meth:`TrainingScan.to_plain`) and is loaded with ``weights_only=True``.
    """
    if cache is not None and Path(cache).is_file():
        return [TrainingScan.from_plain(plain) for plain in torch.load(cache, weights_only=True)]
    scans = [_scan(entry["image"], entry.get("labels"), spacing) for entry in volumes]
    for entry in pairs:
        fixed = _scan(entry["fixed"], entry.get("fixed_labels"), spacing)
        moving_image = _ct(entry["moving"])
        problem = RegistrationProblem(read_image(entry["fixed"], "fixed"), moving_image, options=RegistrationOptions())
        transform = RegistrationPipeline([InitialAlignment(), IntensityAffine()]).run(problem).transform
        moving_hu = resample_image(moving_image, fixed.hu.grid, transform, fill=CT_AIR_HU)
        moving_labels = None
        if entry.get("moving_labels"):
            labels = read_labels(entry["moving_labels"], moving_image, "moving labels")
            moving_labels = resample_labels(labels, fixed.hu.grid, transform)
        scans.append(TrainingScan(fixed.hu, fixed.body, fixed.labels, moving_hu, moving_labels,
                                  f"{Path(entry['fixed']).name} <- {Path(entry['moving']).name}"))
    if cache is not None:
        torch.save([scan.to_plain() for scan in scans], cache)
    return scans


def sample_batch(scans: list[TrainingScan], batch: int, crop: tuple[int, int, int], augmentation: Augmentation,
                 generator: torch.Generator) -> PairBatch:
    """``batch`` random crops of shape ``crop`` (D, H, W), each from a randomly chosen scan."""
    samples = [_sample(scans[int(torch.randint(len(scans), (1,), generator=generator))], crop, augmentation, generator)
               for _ in range(batch)]
    spacing = scans[0].hu.grid.spacing
    grid = Grid.create(crop, spacing)
    shared = set.intersection(*(set(s) for s in samples))  # labels only when every crop has them
    fields = {key: torch.stack([s[key] for s in samples])[:, None] for key in shared}
    with_labels = "fixed_labels" in fields
    return PairBatch(fixed=ct_window(fields["fixed_hu"]), moving=ct_window(fields["moving_hu"]),
                     weight=fields["weight"], grid=grid, fixed_hu=fields["fixed_hu"], moving_hu=fields["moving_hu"],
                     fixed_labels=fields["fixed_labels"] if with_labels else None,
                     moving_labels=fields["moving_labels"] if with_labels else None)


def _ct(path: str) -> Image:
    image = read_image(path, "training image")
    if not looks_like_ct(image):
        raise ValueError(f"training image {path}: does not look like CT in HU; the learned stages train on CT")
    return image


def _scan(path: str, labels_path: str | None, spacing: float) -> TrainingScan:
    image = _ct(path)
    hu = to_working_grid(image, spacing, is_ct=True)
    labels = None
    if labels_path:
        labels = resample_labels(read_labels(labels_path, image, "training labels"), hu.grid)
    return TrainingScan(hu, body_mask(hu, is_ct=True).data.bool(), labels, None, None, Path(path).name)


def _sample(scan: TrainingScan, crop: tuple[int, int, int], augmentation: Augmentation,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One crop pair: ``(D, H, W)`` tensors fixed_hu, moving_hu, weight (+ labels if the scan has them)."""
    grid = _crop_grid(scan, crop, generator)
    points = grid.world_points()
    fixed_hu = sample_at_points(scan.hu.data - CT_AIR_HU, scan.hu.grid, points) + CT_AIR_HU
    body = sample_at_points(scan.body.float(), scan.hu.grid, points, "nearest")
    source, source_labels = (scan.moving_hu, scan.moving_labels) if scan.is_pair else (scan.hu, scan.labels)
    strength = augmentation.real_pair_scale if scan.is_pair else 1.0
    mapped = _random_mapping(grid, points, augmentation, strength, generator)
    moving_hu = sample_at_points(source.data - CT_AIR_HU, source.grid, mapped) + CT_AIR_HU
    valid = sample_at_points(torch.ones(source.grid.shape), source.grid, mapped, "nearest")
    sample = {"fixed_hu": fixed_hu, "moving_hu": _intensity_change(moving_hu, augmentation, generator),
              "weight": body * valid}
    fixed_labels = scan.labels
    if fixed_labels is not None and source_labels is not None:
        sample["fixed_labels"] = sample_at_points(fixed_labels.data.float(), fixed_labels.grid, points, "nearest").long()
        sample["moving_labels"] = sample_at_points(source_labels.data.float(), source_labels.grid, mapped,
                                                   "nearest").long()
    return sample


def _crop_grid(scan: TrainingScan, crop: tuple[int, int, int], generator: torch.Generator) -> Grid:
    """A crop of the scan's grid centred near a random body voxel (it may reach beyond the scan,
    where the crop is air with zero weight)."""
    body = scan.body.nonzero()
    centre = body[int(torch.randint(len(body), (1,), generator=generator))] if len(body) else \
        torch.tensor(scan.hu.grid.shape) // 2
    start = []
    for axis, size in enumerate(crop):
        extent = scan.hu.grid.shape[axis]
        first = int(centre[axis]) - size // 2
        start.append(min(max(first, 0), extent - size) if extent >= size else (extent - size) // 2)
    k, j, i = start
    origin = scan.hu.grid.index_to_world() @ np.array([i, j, k, 1.0])
    return Grid.create(crop, scan.hu.grid.spacing, origin[:3], scan.hu.grid.direction_matrix)


def _random_mapping(grid: Grid, points: torch.Tensor, augmentation: Augmentation, strength: float,
                    generator: torch.Generator) -> torch.Tensor:
    """``psi(points)``: a random affine about the crop centre plus a smooth random field (LPS mm)."""
    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1

    angles = tuple((uniform(3) * augmentation.rotation_deg * strength).tolist())
    linear = rotation_matrix(angles) @ np.diag(1 + (uniform(3) * augmentation.scale * strength).numpy())
    translation = (uniform(3) * augmentation.translation_mm * strength).numpy()
    centre = grid.centre_world()
    matrix = torch.as_tensor(linear, dtype=torch.float32)
    offset = torch.as_tensor(centre + translation, dtype=torch.float32)
    mapped = (points - torch.as_tensor(centre, dtype=torch.float32)) @ matrix.T + offset
    n = augmentation.field_control_points
    coarse = torch.randn((1, 3, n, n, n), generator=generator)
    field = F.interpolate(coarse, size=grid.shape, mode="trilinear", align_corners=True)[0]
    amplitude = float(torch.rand((), generator=generator)) * augmentation.field_mm * strength
    field = field * (amplitude / field.norm(dim=0).max().clamp_min(1e-6))
    return mapped + torch.movedim(field, 0, -1)


def _intensity_change(hu: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Gain/offset, a smooth rise of soft tissue (0..300 HU, like contrast uptake) and noise;
    air stays air."""
    def uniform() -> float:
        return float(torch.rand((), generator=generator)) * 2 - 1

    tissue = torch.sigmoid((hu + 50.0) / 25.0) * torch.sigmoid((300.0 - hu) / 25.0)
    enhancement = float(torch.rand((), generator=generator)) * augmentation.enhancement_hu
    changed = hu * (1 + augmentation.gain * uniform()) + augmentation.offset_hu * uniform() + enhancement * tissue
    noise = torch.randn(hu.shape, generator=generator) * float(torch.rand((), generator=generator)) * augmentation.noise_hu
    air = hu < -900
    return torch.where(air, hu, changed + noise)
