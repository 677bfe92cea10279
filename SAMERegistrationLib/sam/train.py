"""``same-train-sam``: self-supervised training of the SAM network on CT volumes.

Each step draws ``--batch`` view pairs, each from a different volume (:mod:`.views`), embeds the
``2 x batch`` crops in one forward pass and minimises local + global InfoNCE (:mod:`.loss`).

Seeds are fixed, checkpoints (model, optimiser, step, random state) resume exactly, and the log
prints the loss and a matching probe: the median error of matching points of a training volume
into a known synthetic deformation of itself.

Cross-patient training (``--cross-patient FIXED ALIGNED``, repeatable): ALIGNED is another
patient's CT registered onto FIXED by the project's own intensity registration (``same-register
--mode intensity``'s ``warped.nii.gz``); a share of the view pairs (``--cross-patient-share``)
then pairs a view of FIXED with the same place in ALIGNED, so the same anatomy of two people is a
positive. Their exclusion radii grow by ``--cross-patient-tolerance-mm`` (the registration's
error), and the global loss no longer uses other volumes as negatives. ``--init-weights`` starts
from trained weights (fine-tuning). Volumes used for evaluation must not appear here.

Data-parallel: ``torchrun --nproc_per_node N -m SAMERegistrationLib.sam.train ...`` runs N
processes (gloo on CPU, nccl on CUDA) with DistributedDataParallel; each draws its own pairs
(seed + rank) and rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from ..io import read_image
from ..learning.training import TrainingRun, add_run_options
from ..preprocess import body_mask, looks_like_ct, to_working_grid
from ..spatial.warp import resample_image
from ..synthetic import make_synthetic_pair
from .embedding import embed, feature_grids, load_sam, save_checkpoint
from .loss import ContrastiveSettings, global_loss, local_loss, query_points
from .matching import match_points
from .network import SAMConfig, SAMNet, sam_intensity
from .views import AlignedPartner, TrainingVolume, ViewAugmentation, sample_view_pair


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="same-train-sam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("volumes", nargs="+", help="CT volumes (NIfTI/NRRD/MHA/DICOM folder) in HU")
    add_run_options(parser, iterations=2000, lr=2e-3)
    parser.add_argument("--batch", type=int, default=2, help="view pairs per step and process (different volumes)")
    parser.add_argument("--patch", type=int, default=48, help="crop edge in voxels")
    parser.add_argument("--probe-every", type=int, default=200)
    parser.add_argument("--widths", type=int, nargs=3, default=list(SAMConfig.widths))
    parser.add_argument("--local-dim", type=int, default=SAMConfig.local_dim)
    parser.add_argument("--global-dim", type=int, default=SAMConfig.global_dim)
    parser.add_argument("--init-weights", help="start from these SAM weights (their network settings replace "
                                               "--widths/--local-dim/--global-dim)")
    parser.add_argument("--cross-patient", nargs=2, action="append", default=[], metavar=("FIXED", "ALIGNED"),
                        help="a CT and another patient's CT registered onto it (repeatable)")
    parser.add_argument("--cross-patient-share", type=float, default=0.5,
                        help="share of the view pairs drawn from the --cross-patient pairs")
    parser.add_argument("--cross-patient-tolerance-mm", type=float, default=8.0,
                        help="added to the exclusion radii of cross-patient pairs (their positives' error)")
    return parser


def prepare_volume(path: str, spacing: float) -> TrainingVolume | None:
    """A CT on its canonical grid with its body voxels, or None (with a warning) if it is not CT."""
    image = read_image(path, "training volume")
    if not looks_like_ct(image):
        warnings.warn(f"training volume {path}: does not look like CT in HU; skipped", stacklevel=2)
        return None
    working = to_working_grid(image, spacing, is_ct=True)
    mask = body_mask(working, is_ct=True).data.bool()
    return TrainingVolume(working, working.grid.world_points()[mask])


def prepare_partner(fixed_path: str, aligned_path: str, spacing: float) -> AlignedPartner | None:
    """A cross-patient pair: FIXED on its working grid and ALIGNED resampled onto that grid, or
    None (with a warning) if either is not CT."""
    volume = prepare_volume(fixed_path, spacing)
    aligned = read_image(aligned_path, "aligned cross-patient volume")
    if volume is None or not looks_like_ct(aligned):
        warnings.warn(f"cross-patient pair {fixed_path}, {aligned_path}: not both CT in HU; skipped", stacklevel=2)
        return None
    return AlignedPartner(volume, resample_image(aligned, volume.image.grid, fill=-1024.0))


def training_step(model: torch.nn.Module, config: SAMConfig, volumes: list[TrainingVolume],
                  augmentation: ViewAugmentation, settings: ContrastiveSettings, generator: torch.Generator,
                  batch: int, device: torch.device, partners: list[AlignedPartner] | None = None,
                  cross_patient_share: float = 0.0, cross_patient_settings: ContrastiveSettings | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss (not yet back-propagated) and its parts.

    Each of the ``batch`` view pairs is, with probability ``cross_patient_share`` (when
    ``partners`` are given), a cross-patient pair scored with ``cross_patient_settings``, else two
    views of one volume scored with ``settings``.
    """
    order = torch.randperm(len(volumes), generator=generator)
    pairs, cross_patient = [], []
    for i in range(batch):
        cross_patient.append(bool(partners) and float(torch.rand((), generator=generator)) < cross_patient_share)
        if cross_patient[-1]:
            chosen = partners[int(torch.randint(len(partners), (1,), generator=generator))]
            pairs.append(sample_view_pair(chosen.volume, config.spacing_mm, augmentation, generator, chosen.partner))
        else:
            pairs.append(sample_view_pair(volumes[int(order[i % len(volumes)])], config.spacing_mm, augmentation,
                                          generator))
    cross_settings = cross_patient_settings or settings
    pair_settings = [cross_settings if cross else settings for cross in cross_patient]
    crops = torch.stack([sam_intensity(hu, config) for pair in pairs for hu in (pair[0], pair[2])])[:, None]
    local, coarse = model(crops.to(device))
    local_losses, coarse_maps, coarse_grids, points_per_pair = [], [], [], []
    for n, ((hu_1, grid_1, hu_2, grid_2), chosen_settings, cross) in enumerate(zip(pairs, pair_settings,
                                                                                  cross_patient)):
        local_1, coarse_1 = feature_grids(grid_1)
        local_2, coarse_2 = feature_grids(grid_2)
        points = query_points(grid_1, local_1, hu_1, grid_2, chosen_settings.queries, chosen_settings.min_query_hu,
                              generator, hu_2 if cross else None).to(device)
        points_per_pair.append(points)
        coarse_maps.append(coarse[2 * n:2 * n + 2])
        coarse_grids.append((coarse_1, coarse_2))
        if len(points):
            local_losses.append(local_loss(local[2 * n], local_1, local[2 * n + 1], local_2, points, chosen_settings,
                                           generator))
    local_part = torch.stack(local_losses).mean() if local_losses else local.sum() * 0
    global_part = global_loss(coarse_maps, coarse_grids, points_per_pair, pair_settings)
    return local_part + global_part, {"local": local_part.item(), "global": global_part.item()}


def matching_probe(model: SAMNet, volume: TrainingVolume, device: torch.device, count: int = 200) -> float:
    """Median error (mm) of matching ``count`` body points into a fixed synthetic warp of ``volume``."""
    pair = make_synthetic_pair(volume.image, rotation_deg=(0, 0, 8), scale=(1.05, 0.95, 1.0),
                               translation_mm=(20.0, -10.0, 15.0), field_amplitude_mm=8.0, seed=1)
    generator = torch.Generator().manual_seed(123)
    points = volume.body_points[torch.randperm(len(volume.body_points), generator=generator)[:count]].float()
    fixed, moving = embed(pair.fixed, model, device), embed(pair.moving, model, device)
    matched = match_points(fixed, moving, points.to(device)).points.cpu()
    truth_error = (pair.psi.map_points(matched.double()).float() - points).norm(dim=-1)
    return float(truth_error.median())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = TrainingRun(args)
    if args.init_weights:
        model = load_sam(args.init_weights)
        config = model.config
    else:
        config = SAMConfig(widths=tuple(args.widths), local_dim=args.local_dim, global_dim=args.global_dim)
        model = SAMNet(config)
    volumes = [v for v in (prepare_volume(p, config.spacing_mm) for p in args.volumes) if v is not None]
    if not volumes:
        print("same-train-sam: error: no usable CT volume among the inputs", file=sys.stderr)
        return 2
    partners = [p for p in (prepare_partner(f, a, config.spacing_mm) for f, a in args.cross_patient) if p is not None]
    trained = run.start(model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4))
    augmentation = ViewAugmentation(patch=args.patch)
    settings = ContrastiveSettings(other_volume_negatives=not partners)
    cross_patient_settings = settings.with_tolerance(args.cross_patient_tolerance_mm)
    for step in run.steps():
        loss, parts = training_step(trained, config, volumes, augmentation, settings, run.generator, args.batch,
                                    run.device, partners, args.cross_patient_share, cross_patient_settings)
        probe = {}
        if run.is_main and ((step + 1) % args.probe_every == 0 or step + 1 == args.iterations):
            probe["probe_median_error_mm"] = round(matching_probe(model, volumes[0], run.device), 2)
        run.step(step, loss, parts, probe)
    if run.is_main:
        digest = save_checkpoint(run.output / "sam.pt", model, iterations=args.iterations, seconds=run.seconds)
        print(json.dumps({"weights": str(run.output / "sam.pt"), "sha256": digest}), flush=True)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
