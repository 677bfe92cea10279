"""``same-train-fcn``: trains Li & Fan's FCN with deep self-supervision on CT pairs.

Each step draws ``--batch`` crop pairs (:mod:`..learning.training_pairs`: synthetic deformations of
every listed volume and crops of the listed real pairs, pre-aligned affinely), predicts the three
displacements and minimises the multi-resolution loss (:mod:`..learning.multiresolution`): the
objective of every output (default: body-masked local NCC + total variation of the displacement,
the paper's choice of regulariser) weighted ``--level-weights`` (default 1, 0.6, 0.3). Any
similarity spec works (``--similarity``: e.g. ``ncc``, ``mi``, ``lncc+0.1*sam``, ``deepsim``).
Seeds, resume, logging and ``torchrun`` data parallelism come from
:class:`..learning.training.TrainingRun`. The weights go to ``OUTPUT/fcn.pt`` with their SHA-256.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..learning.multiresolution import LI_FAN_WEIGHTS, multiresolution_loss
from ..learning.objective import ObjectiveSettings, RegistrationObjective
from ..learning.training import TrainingRun, add_run_options
from ..learning.training_pairs import TrainingData
from ..sam.embedding import load_sam
from ..sam.features import add_sam_features
from .network import FCNConfig, LiFanFCN, fcn_displacements, save_fcn

SPACING_MM = 2.0
"""Working voxel size of the training crops (that of the learned stages)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="same-train-fcn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("training_list", help="JSON list of volumes and pairs (see training/)")
    add_run_options(parser, iterations=1000, lr=1e-3)
    parser.add_argument("--batch", type=int, default=2, help="crop pairs per step and process")
    parser.add_argument("--crop", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"),
                        help=f"crop size in working voxels ({SPACING_MM:g} mm)")
    parser.add_argument("--similarity", default="lncc", help="similarity spec, e.g. 'ncc', 'lncc', 'lncc+0.1*sam'")
    parser.add_argument("--regulariser", default="tv", choices=("tv", "diffusion", "bending"))
    parser.add_argument("--regulariser-weight", type=float, default=0.1)
    parser.add_argument("--dice-weight", type=float, default=0.0, help="weight of the label Dice (pairs with labels)")
    parser.add_argument("--level-weights", type=float, nargs=3, default=list(LI_FAN_WEIGHTS),
                        metavar=("FULL", "HALF", "QUARTER"))
    parser.add_argument("--encoder", type=int, nargs=4, default=list(FCNConfig.encoder))
    parser.add_argument("--decoder", type=int, nargs=2, default=list(FCNConfig.decoder))
    return parser


def objective_of(args: argparse.Namespace) -> RegistrationObjective:
    """The per-resolution objective chosen by the options."""
    return RegistrationObjective(ObjectiveSettings(similarity=args.similarity, regulariser=args.regulariser,
                                                   regulariser_weight=args.regulariser_weight,
                                                   dice_weight=args.dice_weight))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        objective = objective_of(args)
    except ValueError as error:
        print(f"same-train-fcn: error: {error}", file=sys.stderr)
        return 2
    run = TrainingRun(args)
    sam = load_sam().to(run.device) if objective.needs_sam else None
    try:
        data = TrainingData.load(args.training_list, SPACING_MM, args.batch, args.crop,
                                 run.output / "prepared_scans.pt" if run.is_main else None)
    except ValueError as error:
        print(f"same-train-fcn: error: {error}", file=sys.stderr)
        return 2
    model = LiFanFCN(FCNConfig(encoder=tuple(args.encoder), decoder=tuple(args.decoder)))
    trained = run.start(model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5))
    for step in run.steps():
        pair = data.sample(run.generator, run.device)
        if sam is not None:
            add_sam_features(pair, sam)
        loss, parts = multiresolution_loss(objective, pair, fcn_displacements(trained, pair), args.level_weights)
        run.step(step, loss, parts)
    if run.is_main:
        path = run.output / "fcn.pt"
        digest = save_fcn(path, model, iterations=args.iterations, seconds=run.seconds, similarity=args.similarity,
                          regulariser=args.regulariser, regulariser_weight=args.regulariser_weight)
        print(json.dumps({"weights": str(path), "sha256": digest}), flush=True)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
