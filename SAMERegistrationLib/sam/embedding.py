"""Embedding a whole image with SAM, and loading shipped or user weights safely."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..image import Image
from ..preprocess import to_working_grid
from ..spatial.grid import Grid
from .network import SAMConfig, SAMNet, sam_intensity

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "sam_small.pt"
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
    """Writes ``{"config", "state_dict", **extra}`` and ``<path>.sha256``; returns the SHA-256."""
    path = Path(path)
    torch.save({"config": model.config.as_dict(), "state_dict": model.state_dict(), **extra}, path)
    digest = sha256_file(path)
    path.with_suffix(path.suffix + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def load_sam(path: Path | str | None = None) -> SAMNet:
    """Loads SAM weights (default: the shipped ones) after checking their SHA-256.

    Raises:
        InputError: the file or its ``.sha256`` is missing, the checksum differs (a corrupt or
            replaced file), or the file is not a SAM checkpoint.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    checksum_file = path.with_suffix(path.suffix + ".sha256")
    if not path.is_file():
        raise InputError(f"SAM weights {path}: not found: reinstall the extension or give --sam-weights FILE")
    if not checksum_file.is_file():
        raise InputError(f"SAM weights {path}: no checksum file {checksum_file.name} beside it: "
                         "write its SHA-256 there (sha256sum) to confirm the file is the one you mean")
    expected = checksum_file.read_text().split()[0]
    actual = sha256_file(path)
    if actual != expected:
        raise InputError(f"SAM weights {path}: SHA-256 {actual[:12]}... does not match {checksum_file.name} "
                         f"({expected[:12]}...): the file is damaged or was replaced; reinstall or re-download it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = SAMNet(SAMConfig.from_dict(checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise InputError(f"SAM weights {path}: not a SAM checkpoint ({error})") from error
    return model.eval()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
