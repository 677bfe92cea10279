"""``same-train-tvf``: training the TVF network (time-dependent velocity fields) on CT pairs.

Each step draws ``--batch`` crop pairs (:mod:`..learning.training_pairs`: real pre-aligned pairs and
synthetic deformations with contrast-like intensity changes), predicts the ``--steps`` velocity
fields and minimises the chosen loss (:mod:`.objective`): ``--loss tvf`` (similarity + Dice where
both crops have labels + diffusion of the final displacement) or ``--loss tvf-lddmm`` (similarity +
Dice + ``sum_t ||L v_t||^2``, ``L = (-alpha Laplacian + gamma)^beta``). Every ``--validate-every``
steps the loss and the share of folded voxels (J <= 0) are measured on fixed validation crops and
logged. Seeds, resume, logging and ``torchrun`` data parallelism come from
:class:`..learning.training.TrainingRun`. The final weights go to ``OUTPUT/tvf.pt`` (or
``tvf_lddmm.pt``) with their SHA-256.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..learning.pairs import PairBatch
from ..learning.training import TrainingRun, add_run_options
from ..learning.training_pairs import TrainingData, add_data_options
from ..learning.weights import save_weights
from ..sam.embedding import load_sam
from ..sam.features import add_sam_features
from ..sam.network import SAMNet
from ..spatial.jacobian import jacobian_determinant
from .network import BACKBONES, TVFConfig, TVFNet, predict
from .objective import LOSSES, TVFLossSettings, TVFObjective

WEIGHTS_NAMES = {"tvf": "tvf.pt", "tvf-lddmm": "tvf_lddmm.pt"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="same-train-tvf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, iterations=600, lr=1e-3, checkpoint_every=100)
    defaults = TVFLossSettings()
    parser.add_argument("--loss", choices=LOSSES, default=defaults.loss, help="TM-TVF or TM-TVF-LDDMM loss")
    parser.add_argument("--steps", type=int, default=TVFConfig.steps, help="time-dependent velocity fields T")
    parser.add_argument("--backbone", choices=BACKBONES, default=TVFConfig.backbone)
    add_data_options(parser, batch=1, crop=(40, 64, 64))
    parser.add_argument("--similarity", default=defaults.similarity, help="similarity spec, e.g. 'lncc', 'lncc+0.1*sam'")
    parser.add_argument("--dice-weight", type=float, default=defaults.dice_weight)
    parser.add_argument("--diffusion-weight", type=float, default=defaults.diffusion_weight, help="--loss tvf")
    parser.add_argument("--lddmm-weight", type=float, default=defaults.lddmm_weight, help="--loss tvf-lddmm")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="LDDMM operator, mm^2")
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="LDDMM operator")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="LDDMM operator power")
    parser.add_argument("--sam-weights", help="SAM weights for a 'sam' similarity (default: the shipped ones)")
    return parser


def training_loss(model: torch.nn.Module, sam: SAMNet | None, objective: TVFObjective, pair: PairBatch
                  ) -> tuple[torch.Tensor, dict[str, float], float]:
    """The objective of the network's prediction on ``pair`` (SAM features added when needed), its
    parts, and the percentage of voxels with J <= 0 of the predicted displacements."""
    if sam is not None and "sam" not in pair.features:
        add_sam_features(pair, sam)
    prediction = predict(model, pair)
    loss, parts = objective(pair, prediction)
    with torch.no_grad():
        folded = torch.stack([(jacobian_determinant(u, pair.grid) <= 0).float().mean()
                              for u in prediction.displacement.detach()]).mean()
    return loss, parts, float(folded) * 100.0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args)
    config = TVFConfig(steps=args.steps, backbone=args.backbone)
    settings = TVFLossSettings(loss=args.loss, similarity=args.similarity, dice_weight=args.dice_weight,
                               diffusion_weight=args.diffusion_weight, lddmm_weight=args.lddmm_weight,
                               alpha=args.alpha, gamma=args.gamma, beta=args.beta)
    objective = TVFObjective(settings)
    sam = load_sam(args.sam_weights).to(run.device) if objective.needs_sam else None
    try:
        data = TrainingData.load(args.training_list, config.spacing_mm, args.batch, args.crop,
                                 run.output / "prepared_scans.pt" if run.is_main else None)
    except ValueError as error:
        print(f"same-train-tvf: error: {error}", file=sys.stderr)
        return 2
    validation = data.validation_set(args.validation_batches, args.seed, run.device)
    model = TVFNet(config)
    trained = run.start(model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5))
    for step in run.steps():
        pair = data.sample(run.generator, run.device)
        trained.train()
        loss, parts, folded = training_loss(trained, sam, objective, pair)
        extra = {"percent_folded": round(folded, 4)}
        if run.is_main and ((step + 1) % args.validate_every == 0 or step + 1 == args.iterations):
            model.eval()
            with torch.no_grad():
                values = [training_loss(model, sam, objective, batch) for batch in validation]
            extra["validation_loss"] = round(sum(v[0].item() for v in values) / len(values), 5)
            extra["validation_percent_folded"] = round(sum(v[2] for v in values) / len(values), 4)
        run.step(step, loss, parts, extra)
    if run.is_main:
        path = run.output / WEIGHTS_NAMES[args.loss]
        digest = save_weights(path, model, config.as_dict(), iterations=args.iterations, seconds=run.seconds,
                              loss=vars(settings))
        print(json.dumps({"weights": str(path), "sha256": digest}), flush=True)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
