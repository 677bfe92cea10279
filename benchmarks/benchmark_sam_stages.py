"""Ablation of the first SAME stages on real CTs (issue 6, item 4; not a test: prints markdown tables for the README).

Methods (rows), each run on a fresh :class:`RegistrationProblem` so no method reuses another's work:
  * intensity affine: the foundation's InitialAlignment + IntensityAffine stages.
  * SAM-affine and SAM-affine + SAM-coarse: one run of the stages of ``build_pipeline("coarse")``
    (SAMAffine, SAMCoarse) with a zero-cost snapshot of the transform after SAM-affine, so the
    SAM-affine row is mode ``affine`` and the SAM-coarse row is mode ``coarse`` (its time includes
    SAM-affine; SAM-coarse reuses the fixed embeddings SAM-affine computed, as in the product).
  * SAM-coarse alone (identity start): SAMCoarse from the identity. It searches only a small
    window around each point in the *physically* overlaid images, so where the scans do not overlap
    (other patient, other scanner) it has nothing to match.
  * initial translation + SAM-coarse: the same stage started from the intensity InitialAlignment
    translation (no affine); the translation is the one the intensity row found, and its time is
    counted in this row too.
  * elastix affine (itk-elastix, if installed): the default 'affine' parameter map plus
    AutomaticTransformInitialization (geometrical centres; without it elastix cannot start on pairs
    with no physical overlap) and no result image.

Pairs:
  * tsA->tsC (Dice): inter-patient, fixed = TotalSegmentator case C abdomen slab (2 mm, 40 mm thick),
    moving = case A slab (3 mm). Mean Dice over the labels present in both label maps (a label the
    warp loses scores 0), and over the large organs (spleen, kidneys, liver, stomach).
  * synthetic: CTs held out from SAM training (radiomicsE chest, crlmG contrast abdomen, tsC slab) on
    their 2 mm working grid, against a known moving->fixed mapping ``psi`` (``make_synthetic_pair``:
    8 deg about the superior axis, scale (1.05, 0.95, 1), translation (40, -20, 30) mm, 8 mm smooth
    random field); the '+contrast' pairs use seed 1 and a contrast change of the moving image
    (1.1 I + 30 HU + N(0, 20 HU) noise). Error ``|psi(phi(x)) - x|`` at random fixed body points
    ``x = psi(y)`` (``y`` a moving voxel centre, so every point has a counterpart in the moving scan).

Jacobian: det(d phi / d x) as ``compute_result_images`` computes it, on the fixed image's 2 mm working
grid, summarised by ``jacobian_summary`` over the fixed body mask (the CLI's summary.json does the
same on the fixed file's grid). An affine-only result has a constant J = det(A), so its
std(J) is 0 by construction.

Usage:
    python benchmarks/benchmark_sam_stages.py [--weights Resources/Models/sam_small.pt | checkpoint.pt]
        [--data ../shared/data/ct] [--threads 2] [--points 20000] [--pairs ...] [--methods ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_sam import load_weights, machine  # noqa: E402  (sibling benchmark script)

from SAMERegistrationLib.image import Image  # noqa: E402
from SAMERegistrationLib.io import read_image, read_labels  # noqa: E402
from SAMERegistrationLib.metrics import dice_per_label, shared_labels  # noqa: E402
from SAMERegistrationLib.outputs import jacobian_summary  # noqa: E402
from SAMERegistrationLib.pipeline.problem import RegistrationOptions, RegistrationProblem, resolve_device  # noqa: E402
from SAMERegistrationLib.pipeline.progress import Progress  # noqa: E402
from SAMERegistrationLib.pipeline.runner import RegistrationPipeline  # noqa: E402
from SAMERegistrationLib.pipeline.stage import Stage  # noqa: E402
from SAMERegistrationLib.preprocess import body_mask, to_working_grid  # noqa: E402
from SAMERegistrationLib.sam.embedding import DEFAULT_WEIGHTS  # noqa: E402
from SAMERegistrationLib.sam.network import SAMNet  # noqa: E402
from SAMERegistrationLib.spatial.jacobian import jacobian_determinant  # noqa: E402
from SAMERegistrationLib.spatial.sampling import sample_at_points  # noqa: E402
from SAMERegistrationLib.spatial.transform import SpatialTransform  # noqa: E402
from SAMERegistrationLib.spatial.warp import resample_labels  # noqa: E402
from SAMERegistrationLib.stages.initial_alignment import InitialAlignment  # noqa: E402
from SAMERegistrationLib.stages.intensity_affine import IntensityAffine  # noqa: E402
from SAMERegistrationLib.stages.sam_affine import SAMAffine  # noqa: E402
from SAMERegistrationLib.stages.sam_coarse import SAMCoarse  # noqa: E402
from SAMERegistrationLib.learning.weights import sha256_file
from SAMERegistrationLib.synthetic import make_synthetic_pair  # noqa: E402, with_contrast_change

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "ct"
WORKING_SPACING_MM = 2.0
SYNTHETIC = dict(rotation_deg=(0.0, 0.0, 8.0), scale=(1.05, 0.95, 1.0), translation_mm=(40.0, -20.0, 30.0),
                 field_amplitude_mm=8.0)
CONTRAST = (1.1, 30.0, 20.0)
"""Moving-image contrast change: gain, offset (HU), Gaussian noise sigma (HU)."""
SYNTHETIC_PAIRS = {
    "radiomicsE": ("radiomicsE_ct_chest.nii.gz", 0, False),
    "crlmG": ("crlmG_ct_abdomen_contrast.nii.gz", 0, False),
    "tsC": ("tsC_ct_slab_2mm.nii.gz", 0, False),
    "radiomicsE+contrast": ("radiomicsE_ct_chest.nii.gz", 1, True),
    "tsC+contrast": ("tsC_ct_slab_2mm.nii.gz", 1, True),
}
"""name -> (held-out CT, seed of the random field, contrast change of the moving image)."""
DICE_PAIR = "tsA->tsC"
PAIR_NAMES = (DICE_PAIR, *SYNTHETIC_PAIRS)
LARGE_ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach"}

BEFORE = "before (identity)"
INTENSITY = "intensity affine"
SAM_AFFINE = "SAM-affine"
SAM_COARSE_ALONE = "SAM-coarse alone (identity start)"
TRANSLATION_COARSE = "initial translation + SAM-coarse"
SAM_BOTH = "SAM-affine + SAM-coarse"
ELASTIX = "elastix affine"
METHOD_NAMES = (BEFORE, INTENSITY, SAM_AFFINE, SAM_BOTH, SAM_COARSE_ALONE, TRANSLATION_COARSE, ELASTIX)
METHOD_KEYS = {"before": (BEFORE,), "intensity": (INTENSITY,), "sam": (SAM_AFFINE, SAM_BOTH),
               "coarse-alone": (SAM_COARSE_ALONE,), "translation-coarse": (TRANSLATION_COARSE,),
               "elastix": (ELASTIX,)}
AFFINE_ONLY = {INTENSITY, SAM_AFFINE, ELASTIX}
START = time.perf_counter()


@dataclass
class Outcome:
    """One method on one pair: the transform (None on failure), registration time and stage reports."""

    transform: SpatialTransform | None
    seconds: float
    stages: list[tuple[str, float, dict]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Pair:
    name: str
    fixed: Image
    moving: Image
    evaluate: Callable[[SpatialTransform], dict[str, float]]
    description: str


class Snapshot(Stage):
    """Keeps the transform it is given (to read SAM-affine's result out of the mode 'coarse' stages)."""

    name = "snapshot"

    def __init__(self) -> None:
        self.transform: SpatialTransform | None = None

    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        self.transform = transform
        return transform


# ------------------------------------------------------------------------------------------- pairs
def dice_pair(data: Path) -> Pair:
    fixed = read_image(data / "tsC_ct_slab_2mm.nii.gz")
    moving = read_image(data / "tsA_ct_slab_3mm.nii.gz", "moving image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # tsC's label file is stored y-flipped (reoriented exactly)
        fixed_labels = read_labels(data / "tsC_ct_slab_2mm_labels.nii.gz", fixed, "fixed labels")
        moving_labels = read_labels(data / "tsA_ct_slab_3mm_labels.nii.gz", moving, "moving labels")
    labels = shared_labels(fixed_labels.data, moving_labels.data)

    def evaluate(transform: SpatialTransform) -> dict[str, float]:
        warped = resample_labels(moving_labels, fixed.grid, transform).data
        scores = dice_per_label(fixed_labels.data, warped, labels)
        large = [scores[label] for label in LARGE_ORGANS if label in scores]
        return {"Dice": float(np.mean(list(scores.values()))), "large-organ Dice": float(np.mean(large))}

    description = (f"fixed tsC slab {fixed.grid.describe()}; moving tsA slab {moving.grid.describe()}; "
                   f"{len(labels)} labels in both maps ({sum(1 for v in LARGE_ORGANS if v in labels)} of them large organs)")
    return Pair(DICE_PAIR, fixed, moving, evaluate, description)


def synthetic_pair(data: Path, name: str, points: int) -> Pair:
    file, seed, contrast = SYNTHETIC_PAIRS[name]
    fixed = to_working_grid(read_image(data / file), WORKING_SPACING_MM, is_ct=True)
    pair = make_synthetic_pair(fixed, seed=seed, **SYNTHETIC)
    moving = pair.moving
    if contrast:
        moving = with_contrast_change(moving, *CONTRAST, seed=100 + seed)
    body = body_mask(fixed, is_ct=True)
    voxels = pair.moving.grid.world_points().reshape(-1, 3)
    with torch.no_grad():
        mapped = pair.psi.map_points(voxels)
    inside = sample_at_points(body.data.float(), fixed.grid, mapped, interpolation="nearest", padding="zeros") > 0.5
    candidates = mapped[inside]
    query = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:points]]

    def evaluate(transform: SpatialTransform) -> dict[str, float]:
        error = pair.error_mm(transform.to("cpu"), query).double()
        return {"median": float(error.median()), "p90": float(torch.quantile(error, 0.9)), "_errors": error}

    description = (f"{file.replace('.nii.gz', '')} at 2 mm ({fixed.grid.describe()}), seed {seed}"
                   + (f", contrast {CONTRAST[0]:g} I + {CONTRAST[1]:g} HU + N(0, {CONTRAST[2]:g} HU)" if contrast else "")
                   + f"; {len(query)} body points")
    return Pair(name, fixed, moving, evaluate, description)


# ------------------------------------------------------------------------------------------- methods
def run_pipeline(pair: Pair, stages: list[Stage], device: torch.device, initial: SpatialTransform | None = None
                 ) -> tuple[Outcome, list]:
    """``stages`` on a fresh problem (no cached working images or embeddings from another method)."""
    problem = RegistrationProblem(pair.fixed, pair.moving, options=RegistrationOptions(), device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = RegistrationPipeline(stages).run(problem, initial)
    reports = [(r.name, r.seconds, r.details) for r in result.stages if r.name != Snapshot.name]
    outcome = Outcome(result.transform, sum(r[1] for r in reports), reports,
                      [str(w.message) for w in caught if issubclass(w.category, UserWarning)])
    return outcome, result.stages


def run_intensity(pair: Pair, device: torch.device, shared: dict) -> dict[str, Outcome]:
    """The intensity affine; keeps the InitialAlignment translation for 'initial translation + SAM-coarse'."""
    snapshot = Snapshot()
    outcome, reports = run_pipeline(pair, [InitialAlignment(), snapshot, IntensityAffine()], device)
    shared["initial"] = (snapshot.transform, outcome.stages[0])
    return {INTENSITY: outcome}


def run_translation_coarse(pair: Pair, model: SAMNet, device: torch.device, shared: dict) -> dict[str, Outcome]:
    """SAMCoarse from the InitialAlignment translation (reused from the intensity row when it ran; its
    time is counted here too)."""
    if "initial" not in shared:
        translation = run_pipeline(pair, [InitialAlignment()], device)[0]
        shared["initial"] = (translation.transform, translation.stages[0])
    transform, report = shared["initial"]
    coarse = run_pipeline(pair, [SAMCoarse(model)], device, initial=transform)[0]
    return {TRANSLATION_COARSE: Outcome(coarse.transform, report[1] + coarse.seconds, [report, *coarse.stages],
                                        coarse.warnings)}


def run_sam(pair: Pair, model: SAMNet, device: torch.device) -> dict[str, Outcome]:
    snapshot = Snapshot()
    both, reports = run_pipeline(pair, [SAMAffine(model), snapshot, SAMCoarse(model)], device)
    first = reports[0]
    affine = Outcome(snapshot.transform, first.seconds, [(first.name, first.seconds, first.details)],
                     [w for w in both.warnings if w.startswith("SAM-affine")])
    return {SAM_AFFINE: affine, SAM_BOTH: both}


def run_elastix(pair: Pair, threads: int) -> Outcome:
    """Default elastix affine (+ geometrical-centre initialisation) in a temporary working folder."""
    try:
        import itk
    except ImportError as error:
        return Outcome(None, float("nan"), error=f"itk-elastix not installed ({error}): "
                       "pip install -r benchmarks/requirements-peers.txt")
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)   # number_of_threads= segfaults
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="elastix-") as folder:
        os.chdir(folder)                                                 # elastix writes into the cwd
        try:
            sitk.WriteImage(pair.fixed.to_sitk(sitk.sitkFloat32), "fixed.mha")
            sitk.WriteImage(pair.moving.to_sitk(sitk.sitkFloat32), "moving.mha")
            fixed, moving = itk.imread("fixed.mha", itk.F), itk.imread("moving.mha", itk.F)
            parameters = itk.ParameterObject.New()
            parameter_map = parameters.GetDefaultParameterMap("affine")
            parameter_map["AutomaticTransformInitialization"] = ["true"]
            parameter_map["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
            parameter_map["WriteResultImage"] = ["false"]
            parameters.AddParameterMap(parameter_map)
            start = time.perf_counter()
            _, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                        log_to_console=False, output_directory=folder)
            seconds = time.perf_counter() - start
        finally:
            os.chdir(cwd)
    transform_map = result.GetParameterMap(result.GetNumberOfParameterMaps() - 1)
    values = np.array([float(v) for v in transform_map["TransformParameters"]])
    centre = np.array([float(v) for v in transform_map["CenterOfRotationPoint"]])
    matrix = np.eye(4)                                   # ITK: T(x) = A (x - c) + t + c, fixed -> moving, LPS
    matrix[:3, :3] = values[:9].reshape(3, 3)
    matrix[:3, 3] = values[9:12] + centre - matrix[:3, :3] @ centre
    details = {"determinant": round(float(np.linalg.det(matrix[:3, :3])), 4),
               "translation_mm": [round(float(v), 1) for v in matrix[:3, 3]]}
    return Outcome(SpatialTransform.from_affine(matrix), seconds, [("elastix-affine", seconds, details)])


def run_methods(pair: Pair, methods: list[str], model: SAMNet | None, device: torch.device,
                threads: int) -> dict[str, Outcome]:
    shared: dict = {}
    runners: dict[str, Callable[[], dict[str, Outcome]]] = {
        "before": lambda: {BEFORE: Outcome(SpatialTransform.identity(), 0.0)},
        "intensity": lambda: run_intensity(pair, device, shared),
        "sam": lambda: run_sam(pair, model, device),
        "coarse-alone": lambda: {SAM_COARSE_ALONE: run_pipeline(pair, [SAMCoarse(model)], device)[0]},
        "translation-coarse": lambda: run_translation_coarse(pair, model, device, shared),
        "elastix": lambda: {ELASTIX: run_elastix(pair, threads)},
    }
    outcomes: dict[str, Outcome] = {}
    for key in methods:
        try:
            outcomes.update(runners[key]())
        except Exception as error:   # a failed method is a row of the table, not the end of the benchmark
            traceback.print_exc(file=sys.stderr)
            for name in METHOD_KEYS[key]:
                outcomes[name] = Outcome(None, float("nan"), error=f"{type(error).__name__}: {error}")
        print(f"  {pair.name}: {key} done after {time.perf_counter() - START:.0f} s", file=sys.stderr, flush=True)
    return outcomes


def evaluate(pair: Pair, outcomes: dict[str, Outcome]) -> None:
    """Accuracy and Jacobian statistics of every successful outcome (into ``outcome.metrics``).

    The Jacobian, det(d phi / d x) as ``compute_result_images`` computes it, is taken on the fixed
    image's 2 mm working grid (where the SAM-coarse field lives, and where the body mask is made)
    rather than on the fixed file's grid (4x more voxels for the 1 x 1 x 2 mm tsC slab), and
    summarised by ``jacobian_summary`` over the body mask. An affine-only result has J = det(A).
    """
    problem = RegistrationProblem(pair.fixed, pair.moving)
    body = problem.fixed_body_mask()
    for outcome in outcomes.values():
        if outcome.transform is None:
            continue
        outcome.metrics = pair.evaluate(outcome.transform)
        if outcome.transform.has_field:
            displacement = outcome.transform.to("cpu").displacement_on(body.grid)
            jacobian = jacobian_summary(jacobian_determinant(displacement, body.grid), body)
        else:
            determinant = float(np.linalg.det(outcome.transform.affine[:3, :3]))
            jacobian = {"std_jacobian": 0.0, "percent_nonpositive": 100.0 if determinant <= 0 else 0.0}
        outcome.metrics["std J"] = jacobian["std_jacobian"]
        outcome.metrics["% J<=0"] = jacobian["percent_nonpositive"]


# ------------------------------------------------------------------------------------------- tables
def number(value: float | None, digits: int) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def note(name: str, outcome: Outcome) -> str:
    notes = []
    if outcome.error:
        notes.append(f"failed: {outcome.error}")
    for _, _, details in outcome.stages:
        if "fallback" in details:
            notes.append(f"SAM-affine fell back to intensity: {details['fallback']}")
        if "note" in details:
            notes.append(str(details["note"]))
    if name in AFFINE_ONLY and outcome.transform is not None and not outcome.transform.has_field:
        notes.append("affine only: J constant")
    return "; ".join(dict.fromkeys(notes))


def troubles(results: dict[str, dict[str, Outcome]], method: str) -> str:
    """Pairs on which ``method`` failed, fell back to intensity, or found too few matches."""
    pairs = [pair for pair, outcomes in results.items() if method in outcomes
             and (outcomes[method].error or any("fallback" in d or "note" in d for _, _, d in outcomes[method].stages))]
    return ", ".join(pairs) or "-"


def pair_table(pair: Pair, outcomes: dict[str, Outcome]) -> list[str]:
    dice = pair.name == DICE_PAIR
    accuracy = ("mean Dice", "large-organ Dice") if dice else ("median error (mm)", "p90 error (mm)")
    keys = ("Dice", "large-organ Dice") if dice else ("median", "p90")
    lines = [f"### {pair.name}", "", pair.description, "",
             f"| method | {accuracy[0]} | {accuracy[1]} | time (s) | std(J) | % J<=0 | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, outcome in outcomes.items():
        m = outcome.metrics
        lines.append(f"| {name} | {number(m.get(keys[0]), 3 if dice else 1)} | {number(m.get(keys[1]), 3 if dice else 1)} | "
                     f"{number(outcome.seconds, 1)} | {number(m.get('std J'), 3)} | {number(m.get('% J<=0'), 3)} | "
                     f"{note(name, outcome)} |")
    return lines


def summary_table(results: dict[str, dict[str, Outcome]]) -> list[str]:
    synthetic = [name for name in results if name != DICE_PAIR]
    lines = ["### Summary", "",
             f"Dice on {DICE_PAIR} (inter-patient); error pooled over the body points of the synthetic pairs "
             f"({', '.join(synthetic) or 'none run'}); time, std(J) and % J<=0 as mean / mean / max over all pairs run.",
             "", "| method | mean Dice | large-organ Dice | median error (mm) | p90 error (mm) | time (s) | std(J) | % J<=0 | "
             "fallback / failure on |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    methods = [m for m in METHOD_NAMES if any(m in outcomes for outcomes in results.values())]
    for method in methods:
        outcomes = [results[p][method] for p in results if method in results[p]]
        dice = results.get(DICE_PAIR, {}).get(method)
        errors = [results[p][method].metrics.get("_errors") for p in synthetic if method in results[p]]
        if errors and all(e is not None for e in errors):
            pooled = torch.cat(errors)
            median, p90 = float(pooled.median()), float(torch.quantile(pooled, 0.9))
        else:
            median = p90 = None
        times = [o.seconds for o in outcomes]
        stds = [o.metrics.get("std J") for o in outcomes]
        folds = [o.metrics.get("% J<=0") for o in outcomes]
        lines.append(
            f"| {method} | {number(dice.metrics.get('Dice') if dice else None, 3)} | "
            f"{number(dice.metrics.get('large-organ Dice') if dice else None, 3)} | {number(median, 1)} | {number(p90, 1)} | "
            f"{number(float(np.mean(times)) if times else None, 1)} | "
            f"{number(float(np.mean(stds)) if None not in stds and stds else None, 3)} | "
            f"{number(float(np.max(folds)) if None not in folds and folds else None, 3)} | {troubles(results, method)} |")
    return lines


def format_details(details: dict) -> str:
    def value(v: object) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, (list, tuple)):
            return "(" + ", ".join(value(x) for x in v) + ")"
        return str(v)
    return ", ".join(f"{k} {value(v)}" for k, v in details.items()) or "-"


def stage_table(results: dict[str, dict[str, Outcome]]) -> list[str]:
    lines = ["### Stage reports", "",
             "Details recorded by each stage (SAM stages: grid points, confident matches = score >= 0.7 and "
             "forward-backward consistent, RANSAC inliers, fallback reason; a SAM-affine fallback also lists the "
             "intensity stages' numbers). Warnings raised during the run are listed after the stages.", "",
             "| pair | method | stage | time (s) | details |", "|---|---|---|---:|---|"]
    for pair, outcomes in results.items():
        for method, outcome in outcomes.items():
            if method == SAM_AFFINE:
                continue                     # its stage is the first row of SAM-affine + SAM-coarse
            for stage, seconds, details in outcome.stages:
                lines.append(f"| {pair} | {method} | {stage} | {seconds:.1f} | {format_details(details)} |")
            for message in outcome.warnings:
                lines.append(f"| {pair} | {method} | warning | | {message} |")
            if outcome.error:
                lines.append(f"| {pair} | {method} | error | | {outcome.error} |")
    return lines


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="shipped SAM weights (checked with their .sha256) or a training checkpoint.pt")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the real CTs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=20000, help="evaluation body points per synthetic pair")
    parser.add_argument("--pairs", nargs="+", default=list(PAIR_NAMES), choices=list(PAIR_NAMES))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_KEYS), choices=list(METHOD_KEYS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    needs_sam = bool({"sam", "coarse-alone", "translation-coarse"} & set(args.methods))
    model, provenance = load_weights(args.weights) if needs_sam else (None, "not needed")
    try:
        from importlib.metadata import PackageNotFoundError, version
        elastix = f"itk-elastix {version('itk-elastix')} (itk {version('itk')})"
    except PackageNotFoundError:
        elastix = "itk-elastix not installed"
    header = ["## SAM-affine / SAM-coarse ablation (benchmarks/benchmark_sam_stages.py)", "",
              f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
              f"- machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}",
              f"- torch {torch.__version__}, {args.threads} threads, device {device}; {elastix}"]
    if model is not None:
        header.append(f"- SAM weights: `{args.weights}` SHA-256 {sha256_file(args.weights)[:12]} ({provenance})")
    print("\n".join(header) + "\n", flush=True)

    results: dict[str, dict[str, Outcome]] = {}
    pairs: list[Pair] = []
    for name in args.pairs:
        pair = dice_pair(args.data) if name == DICE_PAIR else synthetic_pair(args.data, name, args.points)
        outcomes = run_methods(pair, args.methods, model, device, args.threads)
        evaluate(pair, outcomes)
        results[name] = {m: outcomes[m] for m in METHOD_NAMES if m in outcomes}
        pair.description += f" (1-minute load average after this pair: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
        pairs.append(pair)
        print(f"{name}: evaluated after {time.perf_counter() - START:.0f} s", file=sys.stderr, flush=True)
    for pair in pairs:
        print("\n".join(pair_table(pair, results[pair.name])) + "\n")
    print("\n".join(summary_table(results)) + "\n")
    print("\n".join(stage_table(results)) + "\n")
    print(f"_Benchmark wall time: {time.perf_counter() - START:.0f} s; load average at end "
          f"{os.getloadavg()[0]:.1f}._")


if __name__ == "__main__":
    main()
