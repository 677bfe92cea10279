"""Measured quality of SAM point matching against a MIND-SSC baseline (issue 3, item 5).

Not a test: prints markdown tables for the README and the model card. Both descriptors are matched
with the same :func:`~SAMERegistrationLib.sam.matching.match_points` (coarse-to-fine, same window
and candidate count), so the tables compare the embeddings only.

(a) Synthetic deformations of real CTs held out from SAM training (radiomicsE chest, crlmG abdomen,
    tsC abdomen slab): the image on its 2 mm working grid is the fixed image; the moving image is
    it under a known moving->fixed mapping ``psi`` (8 deg about the superior axis, scale
    (1.05, 0.95, 1), translation (20, -10, 15) mm, 8 mm random smooth field; seeds 0 and 1, and seed
    0 again with a contrast change 1.1 I + 30 HU + N(0, 20 HU) noise). Query points are random fixed
    body-mask points that have a correspondence inside the moving field of view (``x = psi(y)`` for
    a random moving voxel ``y``). Error = ``|psi(match(x)) - x|``, also restricted to the matches
    that pass the forward-backward check (8 mm).
(b) Across patients: organ centroids of TotalSegmentator case tsA (3 mm slab) matched into case tsC
    (2 mm, 40 mm slab); error = distance to the tsC centroid of the same organ.
(c) Time to embed a 2 mm chest CT and to match 1000 points, and the size of the embeddings.
(d) Across patients, every inter-patient pair of a pair list (``--pairs``, default
    benchmarks/pairs/cross_patient.json): label centroids of the fixed image (TotalSegmentator organs;
    right lung, left lung and bone of the HU-threshold labels) matched into the moving image, beside
    a body-centre shift, the product's intensity affine, and SAM re-matching after that affine.

Usage:
    python benchmarks/benchmark_sam.py [--weights Resources/Models/sam_small.pt | checkpoint.pt]
        [--data ../shared/data/ct] [--threads 2] [--points 500] [--repeats 3]
        [--sections synthetic organs timing cross-patient] [--pairs benchmarks/pairs/cross_patient.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from SAMERegistrationLib.descriptors.mind import MINDConfig, mind_embed
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.io import read_image, read_labels
from SAMERegistrationLib.pipeline.memory import PeakMemory
from SAMERegistrationLib.preprocess import body_mask, to_working_grid
from SAMERegistrationLib.sam.embedding import DEFAULT_WEIGHTS, Embeddings, embed, load_sam
from SAMERegistrationLib.sam.matching import MatchTarget, match_points
from SAMERegistrationLib.sam.network import SAMConfig, SAMNet
from SAMERegistrationLib.spatial.sampling import sample_at_points
from SAMERegistrationLib.learning.weights import sha256_file
from SAMERegistrationLib.synthetic import SyntheticPair, make_synthetic_pair, with_contrast_change

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "ct"
HELD_OUT = ("radiomicsE_ct_chest.nii.gz", "crlmG_ct_abdomen_contrast.nii.gz", "tsC_ct_slab_2mm.nii.gz")
"""CTs not used to train the shipped SAM weights (training: tsA torso, tsB heart/aorta, radiomicsD, crlmF)."""

SYNTHETIC = dict(rotation_deg=(0.0, 0.0, 8.0), scale=(1.05, 0.95, 1.0), translation_mm=(20.0, -10.0, 15.0),
                 field_amplitude_mm=8.0)
PAIRS = (("seed 0", 0, False), ("seed 1", 1, False), ("seed 0 + contrast", 0, True))
CONTRAST = (1.1, 30.0, 20.0)
"""Moving-image contrast change: gain, offset (HU), Gaussian noise sigma (HU)."""
CYCLE_TOLERANCE_MM = 8.0
WORKING_SPACING_MM = 2.0
MIN_ORGAN_VOXELS = 50

Embed = Callable[[Image], Embeddings]
START = time.perf_counter()


# ------------------------------------------------------------------------------------------- setup
def load_weights(path: Path) -> tuple[SAMNet, str]:
    """Shipped weights (``.sha256`` beside them, via :func:`load_sam`) or a training checkpoint."""
    if path.with_suffix(path.suffix + ".sha256").is_file() or not path.is_file():
        return load_sam(path), "checksum verified by load_sam"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    model = SAMNet(SAMConfig.from_dict(checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    step = checkpoint.get("step", "?")
    return model.eval(), f"training checkpoint (step {step}), no .sha256 beside it"


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores ({platform.system()} {platform.release()})"


def statistics(errors: torch.Tensor) -> tuple[str, str, str]:
    if errors.numel() == 0:
        return "-", "-", "-"
    e = errors.double()
    return (f"{float(e.median()):.1f}", f"{float(torch.quantile(e, 0.9)):.1f}",
            f"{100.0 * float((e <= 10.0).double().mean()):.0f}")


# ------------------------------------------------------------------------------------- (a) synthetic
def synthetic_pairs(path: Path) -> tuple[Image, list[tuple[str, SyntheticPair, Image]]]:
    """The working-grid fixed image and its (name, pair, moving image) list."""
    fixed = to_working_grid(read_image(path), WORKING_SPACING_MM, is_ct=True)
    pairs = []
    for name, seed, contrast in PAIRS:
        pair = make_synthetic_pair(fixed, seed=seed, **SYNTHETIC)
        moving = pair.moving
        if contrast:
            moving = with_contrast_change(moving, *CONTRAST, seed=100 + seed)
        pairs.append((name, pair, moving))
    return fixed, pairs


def query_points(fixed: Image, body: Image, pair: SyntheticPair, count: int, seed: int) -> torch.Tensor:
    """``count`` random fixed body points ``x = psi(y)`` with ``y`` a moving voxel centre."""
    moving_voxels = pair.moving.grid.world_points().reshape(-1, 3)
    with torch.no_grad():
        mapped = pair.psi.map_points(moving_voxels)
    inside = sample_at_points(body.data.float(), fixed.grid, mapped, interpolation="nearest", padding="zeros") > 0.5
    candidates = mapped[inside]
    chosen = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:count]
    return candidates[chosen]


def run_synthetic(methods: dict[str, Embed], data: Path, count: int) -> list[str]:
    rows: dict[str, list[tuple[str, str, list[str]]]] = {name: [] for name in methods}
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in methods}
    pooled_kept: dict[str, list[torch.Tensor]] = {name: [] for name in methods}
    for volume_index, file in enumerate(HELD_OUT):
        fixed, pairs = synthetic_pairs(data / file)
        fixed_embeddings = {name: method(fixed) for name, method in methods.items()}
        body = body_mask(fixed, is_ct=True)
        for pair_index, (pair_name, pair, moving) in enumerate(pairs):
            points = query_points(fixed, body, pair, count, seed=10 * volume_index + pair_index)
            moving = to_working_grid(moving, WORKING_SPACING_MM, is_ct=True)     # once for both methods
            for name, method in methods.items():
                target = MatchTarget(method(moving))
                matches = match_points(fixed_embeddings[name], target, points, cycle_tolerance_mm=CYCLE_TOLERANCE_MM)
                with torch.no_grad():
                    error = (pair.psi.map_points(matches.points.double()).float() - points).norm(dim=-1)
                kept = error[matches.consistent]
                pooled[name].append(error)
                pooled_kept[name].append(kept)
                cells = [*statistics(error), *statistics(kept), f"{100.0 * len(kept) / len(error):.0f}"]
                rows[name].append((file.replace(".nii.gz", ""), pair_name, cells))
        print(f"(a) {file}: done after {time.perf_counter() - START:.0f} s", file=sys.stderr, flush=True)
    lines = ["### (a) Synthetic deformations of held-out CTs", "",
             f"{count} random body points per pair; error `|psi(match(x)) - x|` in mm; "
             f"'cycle-consistent' = matches that return within {CYCLE_TOLERANCE_MM:g} mm of the query "
             "when matched back; 'kept' = their share.", ""]
    header = ("| method | volume | pair | median | p90 | % <= 10 mm | cycle-consistent median | p90 | % <= 10 mm | kept % |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines += header
    for name in methods:
        for volume, pair_name, cells in rows[name]:
            lines.append(f"| {name} | {volume} | {pair_name} | " + " | ".join(cells) + " |")
    lines += ["", "All pairs pooled:", "", *header]
    for name in methods:
        all_errors, all_kept = torch.cat(pooled[name]), torch.cat(pooled_kept[name])
        cells = [*statistics(all_errors), *statistics(all_kept), f"{100.0 * len(all_kept) / len(all_errors):.0f}"]
        lines.append(f"| {name} | all {len(HELD_OUT)} | all {len(PAIRS)} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------- (b) organs
def organ_centroids(labels: Image, image: Image) -> dict[int, tuple[np.ndarray, int, bool, np.ndarray]]:
    """``{label: (LPS centroid, voxel count, touches the first/last slice along S, LPS voxel centres)}``."""
    array = labels.numpy()
    superior_axis = 2 - int(np.argmax(np.abs(image.grid.direction_matrix[2])))
    matrix = image.grid.index_to_world()
    result = {}
    for value in np.unique(array):
        if value == 0:
            continue
        kji = np.argwhere(array == value)
        world = kji[:, ::-1] @ matrix[:3, :3].T + matrix[:3, 3]
        extent = kji[:, superior_axis]
        cut = bool(extent.min() == 0 or extent.max() == array.shape[superior_axis] - 1)
        result[int(value)] = (world.mean(axis=0), len(kji), cut, world)
    return result


def run_organs(methods: dict[str, Embed], data: Path) -> list[str]:
    names = json.loads((data / "totalsegmentator_classes.json").read_text())
    source = read_image(data / "tsA_ct_slab_3mm.nii.gz")
    target = read_image(data / "tsC_ct_slab_2mm.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # tsC's label file is stored y-flipped (reoriented exactly)
        source_labels = read_labels(data / "tsA_ct_slab_3mm_labels.nii.gz", source, "tsA labels")
        target_labels = read_labels(data / "tsC_ct_slab_2mm_labels.nii.gz", target, "tsC labels")
    a, c = organ_centroids(source_labels, source), organ_centroids(target_labels, target)
    shared = sorted(v for v in set(a) & set(c) if a[v][1] >= MIN_ORGAN_VOXELS and c[v][1] >= MIN_ORGAN_VOXELS)
    queries = torch.tensor(np.stack([a[v][0] for v in shared]), dtype=torch.float32)
    truth = torch.tensor(np.stack([c[v][0] for v in shared]), dtype=torch.float32)
    errors, in_plane, to_organ, inside = {}, {}, {}, {}
    values = torch.tensor(shared, dtype=torch.float32)
    body_centres = [body_mask(image, is_ct=True) for image in (source, target)]
    body_centres = [mask.grid.world_points()[mask.data > 0].double().mean(dim=0) for mask in body_centres]
    shift = (body_centres[1] - body_centres[0]).float()
    reference = "body-centre shift (no descriptor)"
    predictions = {name: (lambda method=method: match_points(method(source), method(target), queries).points)
                   for name, method in methods.items()}
    predictions[reference] = lambda: queries + shift
    for name, predict in predictions.items():
        matched = predict()
        found = sample_at_points(target_labels.data.float(), target.grid, matched, interpolation="nearest")
        inside[name] = found == values
        errors[name] = (matched - truth).norm(dim=-1)
        in_plane[name] = (matched - truth)[:, :2].norm(dim=-1)
        to_organ[name] = torch.tensor([float(np.linalg.norm(c[v][3] - matched[i].numpy(), axis=1).min())
                                       for i, v in enumerate(shared)])
    cut_c = torch.tensor([c[v][2] for v in shared])
    cut_a = torch.tensor([a[v][2] for v in shared])
    uncut = ~(cut_a | cut_c)
    thickness = target.grid.shape[0] * target.grid.spacing[2]
    lines = ["### (b) Across patients: TotalSegmentator organ centroids, tsA -> tsC", "",
             f"{len(shared)} organs present in both with >= {MIN_ORGAN_VOXELS} voxels. tsA: 3 mm slab "
             f"({source.grid.describe()}); tsC: 2 mm slab, {thickness:g} mm thick ({target.grid.describe()}). "
             "The tsA organ centroid (LPS) is matched into tsC; 'error' = distance to the tsC centroid of the "
             "same organ, 'in-plane' = its L-P (axial) part, 'to organ' = distance from the match to the "
             "nearest tsC voxel centre of that organ; 'inside' = the tsC label at the match is that organ. "
             f"Reference without any descriptor: '{reference}' moves every tsA centroid by the difference of the "
             "two body masks' centres.", "",
             f"**Caveat:** {int(cut_c.sum())} of the {len(shared)} organs touch the first or last slice of the "
             f"{thickness:g} mm tsC slab and {int(cut_a.sum())} those of tsA; {int(uncut.sum())} are whole in both. "
             "The centroid of a cut organ is the centroid of whatever part the slab holds, so two cut organs' "
             "centroids are not corresponding anatomy: the 3-D error mixes matching error with the field-of-view "
             "cut (mostly along S, which the in-plane error leaves out), and 'to organ' is the fairer number.", "",
             "| method | organs | median error (mm) | mean error (mm) | median in-plane (mm) | match inside the organ (%) | median to organ (mm) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in predictions:
        for subset, mask in (("all", torch.ones_like(uncut)), ("whole in both", uncut), ("cut by a slab", ~uncut)):
            count = int(mask.sum())
            if count == 0:
                lines.append(f"| {name} | {subset} (0) | - | - | - | - | - |")
                continue
            e, p, o = errors[name][mask], in_plane[name][mask], to_organ[name][mask]
            lines.append(f"| {name} | {subset} ({count}) | {float(e.median()):.1f} | {float(e.mean()):.1f} | "
                         f"{float(p.median()):.1f} | {100.0 * float(inside[name][mask].float().mean()):.0f} | {float(o.median()):.1f} |")
    lines += ["", "| label | organ | voxels tsA | voxels tsC | cut (tsA / tsC) | "
              + " | ".join(f"{name} error / in-plane / to organ (mm)" for name in predictions) + " |",
              "|---:|---|---:|---:|---|" + "---:|" * len(predictions)]
    for index, value in enumerate(shared):
        cut = f"{'yes' if a[value][2] else 'no'} / {'yes' if c[value][2] else 'no'}"
        cells = " | ".join(f"{float(errors[name][index]):.1f} / {float(in_plane[name][index]):.1f} / "
                           f"{float(to_organ[name][index]):.1f}" for name in predictions)
        lines.append(f"| {value} | {names.get(str(value), '?')} | {a[value][1]} | {c[value][1]} | {cut} | {cells} |")
    return lines


# ------------------------------------------------------------------------------------- (d) cross-patient
def landmark_centroids(labels: Image, names: dict[int, str], threshold_labels: bool) -> dict[str, torch.Tensor]:
    """Named LPS centroids ``(3,)`` (float64) of the parts of a label map with >= ``MIN_ORGAN_VOXELS``
    voxels: every label, or for the harness's HU-threshold maps the right lung, the left lung (label 1
    split at the body's mean L-R coordinate; LPS x grows to the patient's left) and the bone (label 2)."""
    world = labels.grid.world_points().double()
    data = labels.data
    if threshold_labels:
        middle = world[data > 0][:, 0].mean()
        lung = data == 1
        parts = {"right lung": lung & (world[..., 0] < middle), "left lung": lung & (world[..., 0] >= middle),
                 "bone": data == 2}
    else:
        parts = {names.get(int(v), f"label {int(v)}"): data == v for v in torch.unique(data) if v != 0}
    return {name: world[mask].mean(dim=0) for name, mask in parts.items() if int(mask.sum()) >= MIN_ORGAN_VOXELS}


def run_cross_patient(methods: dict[str, Embed], model: SAMNet, pair_list: Path) -> list[str]:
    """(d): label centroids of the fixed image of every inter-patient pair matched into the moving image."""
    from evaluation.pairs import CT_THRESHOLD, body_of, load_pair_list, prepare_pair
    from SAMERegistrationLib.pipeline.problem import RegistrationProblem
    from SAMERegistrationLib.pipeline.progress import Progress
    from SAMERegistrationLib.spatial.transform import SpatialTransform
    from SAMERegistrationLib.spatial.warp import resample_image
    from SAMERegistrationLib.stages.initial_alignment import InitialAlignment
    from SAMERegistrationLib.stages.intensity_affine import IntensityAffine

    _, specs = load_pair_list(pair_list)
    affine_name, local_name, reference = ("intensity affine (no descriptor)", "SAM local re-match after the affine",
                                          "body-centre shift (no descriptor)")
    names = [*methods, reference, affine_name, local_name]
    errors: dict[str, list[float]] = {name: [] for name in names}
    rows = []
    for spec in specs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pair = prepare_pair(spec, WORKING_SPACING_MM)
        threshold = spec.fixed_labels == CT_THRESHOLD
        fixed_points = landmark_centroids(pair.fixed_labels, pair.label_names, threshold)
        moving_points = landmark_centroids(pair.moving_labels, pair.label_names, threshold)
        shared = [name for name in fixed_points if name in moving_points]
        if not shared:
            continue
        queries = torch.stack([fixed_points[n] for n in shared]).float()
        truth = torch.stack([moving_points[n] for n in shared]).float()
        centres = [pair.fixed_body, body_of(pair.moving)]
        centres = [m.grid.world_points()[m.data > 0].double().mean(dim=0).float() for m in centres]
        problem = RegistrationProblem(pair.fixed, pair.moving)
        progress = Progress("affine", 0, 1, None, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            affine = IntensityAffine().run(problem, InitialAlignment().run(problem, SpatialTransform.identity(), progress),
                                           progress)
        fixed_sam = embed(pair.fixed, model)
        aligned = resample_image(pair.moving, pair.fixed.grid, affine, fill=-1024.0)
        local = match_points(fixed_sam, embed(aligned, model), queries, search_centres=queries).points
        predictions = {name: match_points(method(pair.fixed), method(pair.moving), queries).points
                       for name, method in methods.items()}
        predictions[reference] = queries + (centres[1] - centres[0])
        predictions[affine_name] = affine.map_points(queries)
        predictions[local_name] = affine.map_points(local)
        cells = []
        for name in names:
            error = (predictions[name] - truth).norm(dim=-1)
            errors[name] += error.tolist()
            cells.append(f"{float(error.median()):.1f}")
        rows.append(f"| {spec.name} | {', '.join(shared) if threshold else f'{len(shared)} organs'} | " + " | ".join(cells) + " |")
    lines = [f"### (d) Across patients: label centroids of `{pair_list.relative_to(REPOSITORY)}`", "",
             "Every inter-patient pair of the list, prepared by the evaluation harness at 2 mm: the centroid of each "
             "label of the fixed image is matched into the moving image; error = distance to the centroid of the same "
             "label in the moving image. TotalSegmentator pairs: every organ in both with >= "
             f"{MIN_ORGAN_VOXELS} voxels; HU-threshold pairs: right lung, left lung, bone. Descriptors match over the "
             f"whole moving scan (`match_points`). References: '{reference}'; '{affine_name}' = the product's initial "
             f"alignment + intensity affine; '{local_name}' = SAM matching inside 12 mm windows around each point "
             "after that affine (what SAM-coarse does).", "",
             "| pair | labels | " + " | ".join(f"{n}: median error (mm)" for n in names) + " |",
             "|---|---|" + "---:|" * len(names)] + rows
    pooled = " | ".join(statistics(torch.tensor(errors[n]))[0] for n in names)
    within = " | ".join(f"{100.0 * float((torch.tensor(errors[n]) <= 12.0).double().mean()):.0f} %" for n in names)
    lines += [f"| **all pairs, median** | {len(errors[names[0]])} centroids | {pooled} |",
              f"| **all pairs, within 12 mm** | | {within} |"]
    return lines


# ------------------------------------------------------------------------------------- (c) timing
def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_timing(methods: dict[str, Embed], data: Path, repeats: int = 3) -> list[str]:
    chest = to_working_grid(read_image(data / HELD_OUT[0]), WORKING_SPACING_MM, is_ct=True)
    points = chest.grid.world_points().reshape(-1, 3)
    inside = body_mask(chest, is_ct=True).data.reshape(-1) > 0
    points = points[inside][torch.randperm(int(inside.sum()), generator=torch.Generator().manual_seed(7))[:1000]]
    load_before = os.getloadavg()[0]
    lines = ["### (c) Cost on a 2 mm chest CT", "",
             f"radiomicsE chest CT resampled to 2 mm: working grid {'x'.join(map(str, chest.grid.size_ijk))} voxels "
             f"(x, y, z). {torch.get_num_threads()} torch threads, CPU, fp32, best of {repeats} runs after a warm-up. "
             "'match' = preparing the target (`MatchTarget`) + matching 1000 body points into the same image's "
             "embeddings; 'cycle' adds the backward match. Memory: bytes of the embedding tensors, of the voxel-major "
             "copy (local embedding + global map resampled onto the local grid) that `MatchTarget` adds, and the rise of the process's resident memory "
             "during the first embedding (sampled every 20 ms; memory the allocator reuses is not counted).", "",
             "| method | embed (s) | prepare target (s) | match 1000 (s) | match 1000 + cycle (s) | local map | coarse map | embeddings (MiB) | + MatchTarget (MiB) | process RSS rise while embedding (MiB) |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for name, method in methods.items():
        with PeakMemory(torch.device("cpu")) as memory:  # warm-up, also measures the RSS peak
            before = memory.host_peak_mib
            embeddings = method(chest)
        rss_mib = memory.host_peak_mib - before
        embed_s = min(_timed(lambda: method(chest)) for _ in range(repeats))
        prepare_s = min(_timed(lambda: MatchTarget(embeddings)) for _ in range(repeats))
        target = MatchTarget(embeddings)
        match_s = min(_timed(lambda: match_points(embeddings, target, points)) for _ in range(repeats))
        cycle_s = min(_timed(lambda: match_points(embeddings, target, points, cycle_tolerance_mm=CYCLE_TOLERANCE_MM))
                      for _ in range(repeats))
        size = tensor_bytes(embeddings.local.features, embeddings.coarse.features)
        extra = tensor_bytes(target.voxel_rows)
        local_shape = "x".join(map(str, embeddings.local.features.shape))
        coarse_shape = "x".join(map(str, embeddings.coarse.features.shape))
        lines.append(f"| {name} | {embed_s:.2f} | {prepare_s:.2f} | {match_s:.2f} | {cycle_s:.2f} | {local_shape} | "
                     f"{coarse_shape} | {size / 2**20:.1f} | {extra / 2**20:.1f} | {rss_mib:.0f} |")
    lines += ["", f"1-minute load average before / after these timings: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores (a load well above the {torch.get_num_threads()} threads used here means other "
              "processes shared the CPU and the times are inflated)."]
    return lines


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="shipped SAM weights (checked with their .sha256) or a training checkpoint.pt")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the real CTs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", type=int, default=500, help="query points per synthetic pair")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement in (c); the best is reported")
    parser.add_argument("--sections", nargs="+", default=["synthetic", "organs", "timing"],
                        choices=["synthetic", "organs", "timing", "cross-patient"])
    parser.add_argument("--pairs", type=Path, default=REPOSITORY / "benchmarks" / "pairs" / "cross_patient.json",
                        help="pair list of section cross-patient (evaluation harness format)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, provenance = load_weights(args.weights)
    mind_config = MINDConfig()
    methods: dict[str, Embed] = {"SAM": lambda image: embed(image, model),
                                 "MIND-SSC": lambda image: mind_embed(image, mind_config)}
    parameters = sum(p.numel() for p in model.parameters())
    header = ["## SAM matching quality (benchmarks/benchmark_sam.py)", "",
              f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
              f"- machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}",
              f"- torch {torch.__version__}, {args.threads} threads, CPU",
              f"- SAM weights: `{args.weights.name}` SHA-256 {sha256_file(args.weights)[:12]} ({provenance}); "
              f"{parameters / 1e6:.2f} M parameters; config {model.config.as_dict()}",
              f"- MIND-SSC baseline: {asdict(mind_config)} (SAMERegistrationLib/descriptors/mind.py)",
              "- matching: `match_points` defaults for both (top 3 coarse candidates, "
              f"{match_points.__defaults__[0]:g} mm local windows, sub-voxel refinement)", ""]
    print("\n".join(header), flush=True)
    sections = {"synthetic": lambda: run_synthetic(methods, args.data, args.points),
                "organs": lambda: run_organs(methods, args.data),
                "timing": lambda: run_timing(methods, args.data, args.repeats),
                "cross-patient": lambda: run_cross_patient(methods, model, args.pairs.resolve())}
    for section in args.sections:
        print("\n".join(sections[section]()) + "\n", flush=True)
    print(f"_Benchmark wall time: {time.perf_counter() - START:.0f} s; 1-minute load average at the end "
          f"{os.getloadavg()[0]:.1f}._")


if __name__ == "__main__":
    main()
