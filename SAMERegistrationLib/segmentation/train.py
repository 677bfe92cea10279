"""``same-train-seg``: trains the segmentation U-Net whose frozen encoder gives DeepSim's features.

Data: a training list (``learning/training_pairs.py``) whose volumes carry TotalSegmentator label
maps; labels are merged into the compact classes of ``segmentation/network.py``. Each step draws
``--batch`` crop pairs with :func:`sample_batch` and trains on both crops of every pair: the plain
crop and its randomly deformed, intensity-changed and noisy twin (labels warped with it, nearest
neighbour), so the features learn to ignore noise and contrast changes. Loss: cross-entropy + soft
Dice over the compact classes. The log adds, every ``--probe-every`` steps, the mean Dice of the
whole training volumes' compact classes (training data: only a few labelled CTs exist here).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from ..learning.pairs import PairBatch
from ..learning.training import TrainingRun, add_run_options
from ..learning.training_pairs import Augmentation, TrainingScan, load_training_list, prepare_scans, sample_batch
from ..losses import soft_dice
from ..metrics import dice_per_label
from .network import SegmentationConfig, SegmentationUNet, compact_labels, save_segmentation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="same-train-seg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("training_list", help="JSON training list whose volumes have 'labels' (TotalSegmentator)")
    add_run_options(parser, iterations=1000, lr=3e-3)
    parser.add_argument("--batch", type=int, default=2, help="crop pairs per step (each gives two crops)")
    parser.add_argument("--crop", type=int, nargs=3, default=[24, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--noise-hu", type=float, default=40.0, help="largest noise std of the augmented crops (HU)")
    parser.add_argument("--probe-every", type=int, default=200)
    parser.add_argument("--encoder", type=int, nargs="+", default=list(SegmentationConfig.encoder))
    parser.add_argument("--decoder", type=int, nargs="+", default=list(SegmentationConfig.decoder))
    return parser


def segmentation_loss(model: torch.nn.Module, batch: PairBatch, device: torch.device
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy + soft Dice of the fixed and the moving crops of ``batch`` (which has labels)."""
    hu = torch.cat([batch.fixed_hu, batch.moving_hu])
    target = compact_labels(torch.cat([batch.fixed_labels, batch.moving_labels]), hu)[:, 0].to(device)
    hu = hu.to(device)
    logits = model(hu)
    cross_entropy = F.cross_entropy(logits, target)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dice = soft_dice(one_hot, logits.softmax(dim=1))
    return cross_entropy + dice, {"cross_entropy": cross_entropy.item(), "dice_loss": dice.item()}


def probe_dice(model: SegmentationUNet, scans: list[TrainingScan], device: torch.device) -> float:
    """Mean Dice over the compact classes (air excluded) present in each scan, averaged over scans."""
    scores = []
    with torch.no_grad():
        for scan in scans:
            hu = scan.hu.data.to(device)
            truth = compact_labels(scan.labels.data, scan.hu.data)
            predicted = model.eval()(hu[None, None]).argmax(dim=1)[0].cpu()
            model.train()
            present = set(torch.unique(truth).tolist()) - {0}
            scores.extend(dice_per_label(truth, predicted, present).values())
    return float(sum(scores) / len(scores))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args)
    config = SegmentationConfig(encoder=tuple(args.encoder), decoder=tuple(args.decoder))
    volumes, _ = load_training_list(args.training_list)
    volumes = [v for v in volumes if v.get("labels")]
    if not volumes:
        print("same-train-seg: error: the training list has no volume with 'labels'", file=sys.stderr)
        return 2
    scans = prepare_scans(volumes, [], config.spacing_mm)
    model = SegmentationUNet(config)
    trained = run.start(model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4))
    augmentation = Augmentation(noise_hu=args.noise_hu)
    for step in run.steps():
        batch = sample_batch(scans, args.batch, tuple(args.crop), augmentation, run.generator)
        loss, parts = segmentation_loss(trained, batch, run.device)
        probe = {}
        if run.is_main and ((step + 1) % args.probe_every == 0 or step + 1 == args.iterations):
            probe["probe_mean_dice"] = round(probe_dice(model, scans, run.device), 4)
        run.step(step, loss, parts, probe)
    if run.is_main:
        digest = save_segmentation(run.output / "seg_unet.pt", model, iterations=args.iterations,
                                   seconds=run.seconds)
        print(json.dumps({"weights": str(run.output / "seg_unet.pt"), "sha256": digest}), flush=True)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
