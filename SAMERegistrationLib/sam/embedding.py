"""Embedding a whole image with SAM, and loading shipped or user weights safely."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..image import Image
from ..learning.weights import MODELS, build_checked, load_checked, save_weights
from ..preprocess import to_working_grid
from ..spatial.grid import Grid
from .network import SAMConfig, SAMNet, sam_intensity

DEFAULT_WEIGHTS = MODELS / "sam_small.pt"
"""Weights shipped with the product; ``<name>.sha256`` beside them holds their SHA-256."""


@dataclass(frozen=True)
class FeatureMap:
    """Unit vectors on a grid: ``features`` ``(C, D, H, W)`` whose voxel ``(k, j, i)`` sits at ``grid``."""

    features: torch.Tensor
    grid: Grid


@dataclass(frozen=True)
class Embeddings:
    """SAM embeddings of one image: ``local`` (stride 2) and ``coarse`` (global, stride 8) maps, both
    on canonical LPS-aligned grids sharing the working grid's origin."""

    local: FeatureMap
    coarse: FeatureMap


def feature_grids(working: Grid) -> tuple[Grid, Grid]:
    """The local (stride 2) and global (stride 8) grids of a working grid (see ``SAMNet``)."""
    def strided(stride: int) -> Grid:
        shape = [-(-n // stride) for n in working.shape]
        return Grid.create(shape, [s * stride for s in working.spacing], working.origin, working.direction_matrix)
    return strided(2), strided(8)


def embed(image: Image, model: SAMNet, device: torch.device | str = "cpu") -> Embeddings:
    """Embeds a CT image (HU) given on any grid.

    The image is resampled to the model's canonical working grid (isotropic, identity direction),
    so flipped or oblique inputs give the same embeddings at the same anatomy.
    """
    config = model.config
    working = to_working_grid(image, config.spacing_mm, is_ct=True)
    x = sam_intensity(working.data, config)[None, None].to(device)
    with torch.no_grad():
        local, coarse = model.to(device).eval()(x)
    local_grid, coarse_grid = feature_grids(working.grid)
    return Embeddings(FeatureMap(local[0], local_grid), FeatureMap(coarse[0], coarse_grid))


def save_checkpoint(path: Path, model: SAMNet, **extra) -> str:
    """Writes SAM weights and ``<path>.sha256`` (see :func:`save_weights`); returns the SHA-256."""
    return save_weights(path, model, model.config.as_dict(), **extra)


def load_sam(path: Path | str | None = None) -> SAMNet:
    """Loads SAM weights (default: the shipped ones) after checking their SHA-256.

    Raises:
        InputError: the file or its ``.sha256`` is missing, the checksum differs (a corrupt or
            replaced file), or the file is not a SAM checkpoint.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    checkpoint = load_checked(path, "SAM weights", "--sam-weights")
    return build_checked(checkpoint, lambda config: SAMNet(SAMConfig.from_dict(config)), "SAM weights", path)
