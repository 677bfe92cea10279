"""Pair lists: which images the harness registers and what ground truth each pair has.

A pair list is a JSON file::

    {
      "description": "what the pairs are",
      "data_root": "../shared/data/ct",
      "pairs": [
        {"name": "tsA->tsC", "fixed": "tsC_ct_slab_2mm.nii.gz", "moving": "tsA_ct_slab_3mm.nii.gz",
         "fixed_labels": "tsC_ct_slab_2mm_labels.nii.gz", "moving_labels": "tsA_ct_slab_3mm_labels.nii.gz",
         "label_names": "totalsegmentator_classes.json"},
        {"name": "radiomicsE->radiomicsD", "fixed": "...", "moving": "...",
         "fixed_labels": "ct-threshold", "moving_labels": "ct-threshold"},
        {"name": "landmark pair", "fixed": "...", "moving": "...",
         "fixed_landmarks": "fixed_points.csv", "moving_landmarks": "moving_points.csv"},
        {"name": "tsC synthetic", "fixed": "tsC_ct_slab_2mm.nii.gz", "fixed_labels": "ct-threshold",
         "synthetic": {"rotation_deg": [0, 0, 8], "scale": [1.05, 0.95, 1.0], "translation_mm": [40, -20, 30],
                       "field_amplitude_mm": 8, "seed": 0, "contrast": {"gain": 1.1, "offset_hu": 30, "noise_hu": 20}}}
      ]
    }

Relative paths are resolved against ``data_root``, which is itself relative to the repository root
(default: the repository root). Absolute paths are used as they are.

* ``fixed_labels`` / ``moving_labels``: a label map of the image (any grid holding the image's voxel
  centres, read with :func:`read_labels`), or ``"ct-threshold"``: lung / bone / body masks derived
  from the CT by :func:`ct_threshold_labels`. ``label_names``: JSON ``{value: name}``.
* ``fixed_landmarks`` / ``moving_landmarks``: CSV files, one LPS mm point ``x,y,z`` per line (an
  optional header line is skipped); line ``i`` of both files is the same anatomical point.
* ``group``: the summary table a pair counts in (default "synthetic" or "image pairs").
* ``synthetic``: the pair has no ``moving`` file; the moving image is the fixed image under a known
  affine + smooth deformation (keywords of :func:`make_synthetic_pair`), with an optional contrast
  change (keywords of :func:`with_contrast_change`). Moving labels are the fixed labels carried
  through the same deformation (nearest neighbour).

Preparation (identical for every method): each image is resampled onto its canonical working grid
(:func:`to_working_grid`: isotropic ``spacing`` mm, identity direction, anti-aliased) and label maps
onto the same grid by nearest neighbour. Synthetic pairs are built from the prepared fixed image, so
their moving image keeps the obliquely rotated grid of :func:`make_synthetic_pair`. All metrics are
computed on the prepared fixed grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image, read_labels
from SAMERegistrationLib.preprocess import body_mask, looks_like_ct, to_working_grid
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_labels
from SAMERegistrationLib.synthetic import make_synthetic_pair, with_contrast_change

REPOSITORY = Path(__file__).resolve().parents[2]
CT_THRESHOLD = "ct-threshold"
"""Label-map keyword: derive lung / bone / body labels from the CT itself."""

LUNG_THRESHOLD_HU = -400.0
LUNG_MIN_VOLUME_ML = 20.0
BONE_THRESHOLD_HU = 300.0
CT_THRESHOLD_NAMES = {1: "lungs and internal air", 2: "bone", 3: "other body"}
"""Labels of :func:`ct_threshold_labels`."""

SYNTHETIC_POINTS = 20_000
"""At most this many body points per synthetic pair for the target registration error."""

ErrorFunction = Callable[[SpatialTransform], torch.Tensor]


@dataclass(frozen=True)
class PairSpec:
    """One entry of a pair list, with paths resolved (see the module docstring for the keys)."""

    name: str
    fixed: Path
    moving: Path | None = None
    fixed_labels: Path | str | None = None
    moving_labels: Path | str | None = None
    label_names: Path | None = None
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None
    synthetic: dict | None = None
    group: str = "image pairs"

    def __post_init__(self) -> None:
        if (self.moving is None) == (self.synthetic is None):
            raise ValueError(f"pair {self.name!r}: give either 'moving' or 'synthetic'")
        if (self.fixed_landmarks is None) != (self.moving_landmarks is None):
            raise ValueError(f"pair {self.name!r}: give both 'fixed_landmarks' and 'moving_landmarks', or neither")
        if self.synthetic is not None and (self.moving_labels is not None or self.fixed_landmarks is not None):
            raise ValueError(f"pair {self.name!r}: a synthetic pair takes its moving labels and ground truth "
                             "from the known deformation: remove 'moving_labels' and the landmarks")


@dataclass(frozen=True)
class PreparedPair:
    """A pair ready for registration, on the harness's working grids.

    Attributes:
        name, description: for the tables.
        fixed, moving: intensity images (HU for CT).
        fixed_body: uint8 body mask on the fixed grid (where the Jacobian is summarised).
        fixed_labels, moving_labels: int64 label maps on the fixed / moving grids, or None.
        label_names: ``{value: name}`` (may be empty).
        error_mm: the registration error in mm at the pair's ground-truth points for a fixed ->
            moving transform, or None when the pair has no ground truth.
    """

    name: str
    description: str
    fixed: Image
    moving: Image
    fixed_body: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    error_mm: ErrorFunction | None = None


def load_pair_list(path: str | Path) -> tuple[str, list[PairSpec]]:
    """Reads a pair-list JSON file; returns its description and its pairs."""
    path = Path(path)
    content = json.loads(path.read_text())
    root = _resolve(content.get("data_root", "."), REPOSITORY)
    specs = []
    for entry in content["pairs"]:
        unknown = set(entry) - set(PairSpec.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: pair {entry.get('name')!r}: unknown keys {sorted(unknown)}")
        values = dict(entry)
        for key in ("fixed", "moving", "label_names", "fixed_landmarks", "moving_landmarks"):
            if values.get(key) is not None:
                values[key] = _resolve(values[key], root)
        for key in ("fixed_labels", "moving_labels"):
            if values.get(key) not in (None, CT_THRESHOLD):
                values[key] = _resolve(values[key], root)
        values.setdefault("group", "synthetic" if "synthetic" in values else "image pairs")
        specs.append(PairSpec(**values))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: pair names must be unique, got {names}")
    return content.get("description", ""), specs


def prepare_pair(spec: PairSpec, spacing: float) -> PreparedPair:
    """Reads and prepares one pair on isotropic working grids of ``spacing`` mm."""
    source = read_image(spec.fixed, "fixed image")
    fixed = to_working_grid(source, spacing, looks_like_ct(source))
    fixed_labels = _prepare_labels(spec.fixed_labels, source, fixed, "fixed labels")
    names = _label_names(spec)
    if spec.synthetic is not None:
        return _prepare_synthetic(spec, fixed, fixed_labels, names)
    source = read_image(spec.moving, "moving image")
    moving = to_working_grid(source, spacing, looks_like_ct(source))
    moving_labels = _prepare_labels(spec.moving_labels, source, moving, "moving labels")
    error_mm = None
    if spec.fixed_landmarks is not None:
        error_mm = _landmark_error(read_landmarks(spec.fixed_landmarks), read_landmarks(spec.moving_landmarks))
    description = f"{spec.fixed.name} <- {spec.moving.name}"
    return PreparedPair(spec.name, description, fixed, moving, body_of(fixed), fixed_labels, moving_labels,
                        names, error_mm)


def ct_threshold_labels(image: Image) -> Image:
    """Lung / bone / body labels of a CT in HU, by thresholds (the harness's documented procedure).

    1. body: :func:`body_mask` (-500 HU threshold, ~6 mm opening that cuts the table, largest
       component, ~6 mm closing, slice-wise hole filling);
    2. label 1, lungs and internal air: body voxels below ``LUNG_THRESHOLD_HU`` (-400 HU), in
       connected components (face-connected) of at least ``LUNG_MIN_VOLUME_ML`` (20 mL); in abdominal
       scans this includes large pockets of bowel gas;
    3. label 2, bone: body voxels above ``BONE_THRESHOLD_HU`` (300 HU); in contrast-enhanced scans it
       also takes strongly enhancing structures (renal pelvis, dense vessels);
    4. label 3, other body: the rest of the body mask.

    Applied to the prepared (working-grid, anti-aliased) image, so the result depends on the spacing.
    """
    body = body_mask(image, is_ct=True).data.bool()
    labels = torch.zeros(image.grid.shape, dtype=torch.int64)
    labels[body] = 3
    labels[body & (image.data > BONE_THRESHOLD_HU)] = 2
    air = sitk.GetImageFromArray((body & (image.data < LUNG_THRESHOLD_HU)).numpy().astype(np.uint8))
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(air, False))
    voxel_ml = float(np.prod(image.grid.spacing)) / 1000.0
    counts = np.bincount(components.ravel())
    large = np.flatnonzero(counts * voxel_ml >= LUNG_MIN_VOLUME_ML)
    labels[torch.from_numpy(np.isin(components, large[large > 0]))] = 1
    return Image(labels, image.grid)


def body_of(image: Image) -> Image:
    """The body mask of a prepared image (:func:`body_mask`, CT threshold or Otsu as the image looks)."""
    return body_mask(image, looks_like_ct(image))


def read_landmarks(path: str | Path) -> torch.Tensor:
    """Points ``(N, 3)`` float64 LPS mm from a CSV file of ``x,y,z`` lines (an optional header is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        fields = [value.strip() for value in line.split(",")]
        if len(fields) < 3 or not line.strip():
            continue
        try:
            rows.append([float(value) for value in fields[:3]])
        except ValueError:
            if rows:
                raise ValueError(f"{path}: line {line!r} is not three numbers x,y,z") from None
    if not rows:
        raise ValueError(f"{path}: no landmark lines x,y,z found")
    return torch.tensor(rows, dtype=torch.float64)


def _landmark_error(fixed_points: torch.Tensor, moving_points: torch.Tensor) -> ErrorFunction:
    """``|phi(f_i) - m_i|`` in mm for corresponding fixed / moving landmarks."""
    if fixed_points.shape != moving_points.shape:
        raise ValueError(f"landmarks: {len(fixed_points)} fixed but {len(moving_points)} moving points")

    def error_mm(transform: SpatialTransform) -> torch.Tensor:
        with torch.no_grad():
            return (transform.map_points(fixed_points.float()) - moving_points.float()).norm(dim=-1)

    return error_mm


def _prepare_synthetic(spec: PairSpec, fixed: Image, fixed_labels: Image | None,
                       names: dict[int, str]) -> PreparedPair:
    """The pair of ``fixed`` and its known deformation; ground truth at moving body points."""
    settings = dict(spec.synthetic)
    contrast = settings.pop("contrast", None)
    settings = {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}
    pair = make_synthetic_pair(fixed, **settings)
    moving = pair.moving if contrast is None else with_contrast_change(pair.moving, **contrast)
    moving_labels = None if fixed_labels is None else resample_labels(fixed_labels, moving.grid, pair.psi)
    points = _synthetic_points(pair.psi, moving, fixed, seed=int(settings.get("seed", 0)))
    change = "" if contrast is None else ", contrast change"
    description = f"{spec.fixed.name} under a known affine + smooth deformation{change}"
    return PreparedPair(spec.name, description, fixed, moving, body_of(fixed), fixed_labels, moving_labels,
                        names, lambda transform: pair.error_mm(transform, points))


def _synthetic_points(psi: SpatialTransform, moving: Image, fixed: Image, seed: int) -> torch.Tensor:
    """Fixed points ``x = psi(y)`` for moving body voxel centres ``y`` (so each has a counterpart in
    the moving scan) that fall inside the fixed grid; at most ``SYNTHETIC_POINTS``, drawn at random."""
    body = body_of(moving).data.bool()
    with torch.no_grad():
        points = psi.map_points(moving.grid.world_points()[body])
    index = fixed.grid.world_to_index_points(points)
    inside = ((index >= 0) & (index <= torch.tensor(fixed.grid.size_ijk, dtype=index.dtype) - 1)).all(dim=-1)
    points = points[inside]
    keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:SYNTHETIC_POINTS]
    return points[keep]


def _prepare_labels(labels: Path | str | None, source: Image, prepared: Image, role: str) -> Image | None:
    """A label map on the prepared image's grid: read (nearest neighbour) or derived by threshold."""
    if labels is None:
        return None
    if labels == CT_THRESHOLD:
        return ct_threshold_labels(prepared)
    return resample_labels(read_labels(labels, source, role), prepared.grid)


def _label_names(spec: PairSpec) -> dict[int, str]:
    if spec.label_names is not None:
        return {int(value): name for value, name in json.loads(spec.label_names.read_text()).items()}
    if CT_THRESHOLD in (spec.fixed_labels, spec.moving_labels):
        return dict(CT_THRESHOLD_NAMES)
    return {}


def _resolve(path: str | Path, root: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else (root / path).resolve()
