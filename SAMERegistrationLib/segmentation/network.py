"""The segmentation U-Net of DeepSim, its compact label set and its shipped weights.

Input: CT in HU ``(N, 1, D, H, W)`` on a canonical grid (isotropic, identity LPS direction; trained
at ``SegmentationConfig.spacing_mm``), scaled by :func:`segmentation_intensity`. Output: class logits
``(N, classes, D, H, W)`` over :data:`COMPACT_CLASSES`. :meth:`SegmentationUNet.encode` returns the
encoder stages, the features DeepSim compares: stage 0 is ``(N, encoder[0], D, H, W)``, stage
``l = 1 .. len(encoder)`` is ``(N, encoder[l - 1], ceil(D / 2**l), ...)``, voxel ``n`` of stage ``l`` centred on input
voxel ``2**l * n`` (the :func:`~SAMERegistrationLib.networks.unet.half_grid` convention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..learning.weights import MODELS, build_checked, load_checked, save_weights
from ..networks.unet import UNet3D

DEFAULT_WEIGHTS = MODELS / "seg_unet.pt"
"""Weights shipped with the product (``seg_unet.pt.sha256`` beside them, model card ``seg_unet.md``)."""

COMPACT_CLASSES: dict[int, tuple[str, tuple[int, ...]]] = {
    2: ("liver", (5,)),
    3: ("spleen", (1,)),
    4: ("kidney", (2, 3, 23, 24)),
    5: ("stomach", (6,)),
    6: ("pancreas", (7,)),
    7: ("bowel", (18, 19, 20)),
    8: ("lung", (10, 11, 12, 13, 14)),
    9: ("vertebra", tuple(range(25, 51))),
    10: ("other bone", (69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 91, *range(92, 118))),
    11: ("vessel", tuple(range(52, 69))),
    12: ("muscle", tuple(range(80, 90))),
    13: ("other organ", (4, 8, 9, 15, 16, 17, 21, 22, 51, 79, 90)),
}
"""Compact class -> (name, TotalSegmentator classes merged into it). Class 0 is unlabelled air
(below ``TISSUE_HU``: outside the body, bowel gas), class 1 unlabelled tissue (fat, skin, unlabelled
muscle, the table)."""
CLASS_NAMES = ("air", "tissue", *(name for name, _ in COMPACT_CLASSES.values()))
TISSUE_HU = -500.0


def compact_labels(labels: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
    """TotalSegmentator label map -> compact classes (int64, same shape).

    Args:
        labels: integer TotalSegmentator labels (0 = unlabelled), any shape.
        hu: the CT in HU, same shape (splits unlabelled voxels into air and tissue).
    """
    table = torch.zeros(256, dtype=torch.int64)
    for compact, (_, sources) in COMPACT_CLASSES.items():
        table[list(sources)] = compact
    mapped = table.to(labels.device)[labels.clamp(0, 255).long()]
    unlabelled = (hu >= TISSUE_HU).long()
    return torch.where(mapped > 0, mapped, unlabelled)


@dataclass(frozen=True)
class SegmentationConfig:
    """Architecture and input conventions; stored in every checkpoint.

    Attributes:
        encoder: widths of the stride-2 encoder stages (the full-resolution stage has ``encoder[0]``).
        decoder: widths of the decoder stages, coarse to fine.
        classes: output classes (``len(CLASS_NAMES)``).
        spacing_mm: isotropic voxel size it was trained at.
        hu_window: HU range mapped to [-1, 1].
    """

    encoder: tuple[int, ...] = (8, 16, 32)
    decoder: tuple[int, ...] = (32, 16, 8)
    classes: int = len(CLASS_NAMES)
    spacing_mm: float = 2.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> SegmentationConfig:
        return SegmentationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def segmentation_intensity(hu: torch.Tensor, config: SegmentationConfig) -> torch.Tensor:
    """HU -> network input: ``hu_window`` mapped to [-1, 1], clipped."""
    low, high = config.hu_window
    return ((hu.float() - low) / (high - low) * 2.0 - 1.0).clamp(-1.0, 1.0)


class SegmentationUNet(nn.Module):
    """:class:`UNet3D` on the scaled HU with a 1x1x1 classifier; see the module docstring."""

    def __init__(self, config: SegmentationConfig = SegmentationConfig()) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet3D(1, config.encoder, config.decoder, out_channels=config.decoder[-1])
        self.classifier = nn.Conv3d(config.decoder[-1], config.classes, 1)

    @property
    def feature_halvings(self) -> tuple[int, ...]:
        """Stride exponent of each :meth:`encode` stage (stage ``l`` has stride ``2**l``)."""
        return tuple(range(len(self.config.encoder) + 1))

    def encode(self, hu: torch.Tensor) -> list[torch.Tensor]:
        """The encoder stages of ``hu`` ``(N, 1, D, H, W)`` in HU, finest first."""
        stages = [self.unet.input(segmentation_intensity(hu, self.config))]
        for down in self.unet.down:
            stages.append(down(stages[-1]))
        return stages

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, classes, D, H, W)`` of ``hu`` ``(N, 1, D, H, W)`` in HU."""
        return self.classifier(self.unet(segmentation_intensity(hu, self.config)))


def save_segmentation(path: Path, model: SegmentationUNet, **extra) -> str:
    """Writes the weights and ``<path>.sha256`` (see :func:`save_weights`); returns the SHA-256."""
    return save_weights(path, model, model.config.as_dict(), **extra)


def load_segmentation(path: Path | str | None = None) -> SegmentationUNet:
    """The segmentation U-Net (default: the shipped weights) after the SHA-256 check, in eval mode.

    Raises:
        InputError: the file or its ``.sha256`` is missing, the checksum differs, or the file is not
            a segmentation checkpoint.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    checkpoint = load_checked(path, "segmentation weights", "load_segmentation() the")
    return build_checked(checkpoint, lambda config: SegmentationUNet(SegmentationConfig.from_dict(config)),
                         "segmentation weights", path)
