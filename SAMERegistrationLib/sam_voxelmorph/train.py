"""``same-train-vm``: training SAM-VoxelMorph on real and synthetic CT pairs.

Each step draws ``--batch`` crop pairs (:mod:`..learning.training_pairs`: real pre-aligned pairs
and synthetic deformations with contrast-like intensity changes), computes the SAM features of
both crops with the frozen SAM network, predicts the velocity and minimises
:class:`..learning.objective.RegistrationObjective` (default: body-masked local NCC + 0.1 x SAM loss
+ masked diffusion of the velocity, + Dice where both crops have labels). Every
``--validate-every`` steps the same loss is measured on a fixed set of validation crops (fixed
seed) and logged as ``validation_loss``. Seeds, resume, logging and ``torchrun`` data parallelism
come from :class:`..learning.training.TrainingRun`. The final weights go to ``OUTPUT/sam_vm.pt``
with their SHA-256.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..learning.objective import ObjectiveSettings, RegistrationObjective
from ..learning.pairs import PairBatch
from ..learning.training import TrainingRun, add_run_options
from ..learning.training_pairs import TrainingData, add_data_options
from ..learning.weights import save_weights
from ..sam.embedding import load_sam
from ..sam.features import add_sam_features
from ..sam.network import SAMNet
from .network import SAMVMConfig, SAMVoxelMorphNet, predict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="same-train-vm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, iterations=2000, lr=1e-3)
    add_data_options(parser, batch=2, crop=(48, 80, 80))
    parser.add_argument("--similarity", default=ObjectiveSettings.similarity,
                        help="similarity spec, e.g. 'lncc', 'lncc+0.1*sam'")
    parser.add_argument("--regulariser-weight", type=float, default=ObjectiveSettings.regulariser_weight)
    parser.add_argument("--dice-weight", type=float, default=ObjectiveSettings.dice_weight)
    parser.add_argument("--no-correlation", action="store_true", help="train without the SAM correlation channels")
    parser.add_argument("--sam-weights", help="SAM weights (default: the shipped ones)")
    return parser


def training_loss(model: torch.nn.Module, sam: SAMNet | None, objective: RegistrationObjective,
                  pair: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective of the network's prediction on ``pair`` (SAM features added when needed)."""
    if sam is not None and "sam" not in pair.features:
        add_sam_features(pair, sam)
    prediction = predict(model, pair)
    return objective(pair, prediction.displacement, prediction.velocity, prediction.velocity_grid)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args)
    config = SAMVMConfig(correlation=not args.no_correlation)
    objective = RegistrationObjective(ObjectiveSettings(similarity=args.similarity,
                                                        regulariser_weight=args.regulariser_weight,
                                                        dice_weight=args.dice_weight))
    sam = load_sam(args.sam_weights).to(run.device) if config.correlation or objective.needs_sam else None
    try:
        data = TrainingData.load(args.training_list, config.spacing_mm, args.batch, args.crop,
                                 run.output / "prepared_scans.pt" if run.is_main else None)
    except ValueError as error:
        print(f"same-train-vm: error: {error}", file=sys.stderr)
        return 2
    validation = data.validation_set(args.validation_batches, args.seed, run.device)
    model = SAMVoxelMorphNet(config)
    trained = run.start(model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5))
    for step in run.steps():
        pair = data.sample(run.generator, run.device)
        trained.train()
        loss, parts = training_loss(trained, sam, objective, pair)
        extra = {}
        if run.is_main and ((step + 1) % args.validate_every == 0 or step + 1 == args.iterations):
            model.eval()
            with torch.no_grad():
                values = [training_loss(model, sam, objective, batch)[0].item() for batch in validation]
            extra["validation_loss"] = round(sum(values) / len(values), 5)
        run.step(step, loss, parts, extra)
    if run.is_main:
        path = run.output / "sam_vm.pt"
        digest = save_weights(path, model, config.as_dict(), iterations=args.iterations, seconds=run.seconds,
                              similarity=args.similarity)
        print(json.dumps({"weights": str(path), "sha256": digest}), flush=True)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
