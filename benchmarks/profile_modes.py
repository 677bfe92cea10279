"""Where the time goes: ``--mode same``, ``tvf`` and ``tvf-lddmm`` profiled per stage and per
operation, each stage beside a floor estimate (not a test; the output is committed and quoted in
the README).

One run per mode through the product's own path (:func:`register_files`: loading the weights,
reading the inputs, the stages, the output images and files) under the PyTorch profiler. Per part
it reports the wall time, the arithmetic done (matrix products counted by the profiler,
convolutions by forward hooks on the stages' networks and from the shapes of their backward
passes), the trilinear samples taken (voxels x channels of every ``grid_sample`` forward and
backward), and a **floor**: that arithmetic at this machine's measured SGEMM rate plus those
samples at its measured ``grid_sample`` rate. The floor is what the part's *current algorithm*
would cost with no overhead at all (no elementwise passes, no Python, no allocation): wall / floor
says how much is overhead, and the floor says how far the algorithm itself must change to reach a
target. Below the table, the operations that take most of each part's self CPU time.

To name the parts, the script wraps, for the duration of each run, the functions of
:mod:`SAMERegistrationLib.registration` listed in :data:`PHASES` (and each stage's ``run``, to
count its convolutions); everything runs exactly as in a user's run otherwise.

The profiler adds overhead of its own (more on many small operations than on large ones) and
keeps its events in memory, so wall times here find the expensive parts and say nothing about
memory; the README's benchmark tables are the timings and peaks.

Pair: the bundled demo pair by default (``Resources/SampleData``; runs anywhere), or any
``--fixed`` / ``--moving`` files.

Usage: python benchmarks/profile_modes.py [--modes same tvf tvf-lddmm] [--threads 2]
       [--fixed F --moving M] [--output benchmarks/results/profile/sample.md]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import platform
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SAMERegistrationLib import registration  # noqa: E402
from SAMERegistrationLib.pipeline.problem import RegistrationOptions  # noqa: E402
from SAMERegistrationLib.pipeline.progress import ProgressEvent  # noqa: E402
from SAMERegistrationLib.registration import RegistrationRequest, register_files  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
PHASE_PREFIX = "phase "
PHASES = {"build_pipeline": "loading the weights", "load_inputs": "reading the inputs",
          "compute_result_images": "output images (warp, field, Jacobian, labels)",
          "compute_inverse_images": "inverse output images",
          "write_output_folder": "writing the output files"}
"""Functions of :mod:`SAMERegistrationLib.registration` timed as regions of their own, by the name
the report gives them."""
OUTSIDE = "everything else (checks, summaries)"
STEP_SECONDS = 20.0
"""Longest profiler step (its events are held in memory until it ends)."""
FINISHED_MESSAGE = "done in "
"""How the pipeline runner's last report of a stage begins (``RegistrationPipeline.run``)."""
TOP_OPERATIONS = 12
OPERATIONS_FROM_S = 1.0
"""Parts shorter than this get no table of operations."""
PROFILER_STEP = "ProfilerStep"
"""The profiler's own step ranges (left out of the operation tables)."""
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
"""Operations whose FLOPs the profiler counts itself (``matmul`` dispatches to these)."""


@dataclass(frozen=True)
class MachineRates:
    """Measured primitive speeds of this machine at the chosen thread count.

    Attributes:
        gemm_flops_per_s: float32 matrix product (2048 x 2048), FLOP/s.
        sample_s_per_value: seconds per output voxel-channel of a trilinear ``grid_sample``
            (3 channels, 96^3 points of a mildly deformed identity grid), forward only.
    """

    gemm_flops_per_s: float
    sample_s_per_value: float


def measure_rates() -> MachineRates:
    """Best of five timings of each primitive (after one warm-up)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    image = torch.randn(1, 3, 96, 96, 96)
    identity = F.affine_grid(torch.eye(3, 4)[None], (1, 1, 96, 96, 96), align_corners=True)
    grid = identity + 0.02 * torch.randn(1, 96, 96, 96, 3)  # a deformation: neighbours stay neighbours

    def best(function) -> float:
        function()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times)

    gemm = best(lambda: a @ b)
    sample = best(lambda: F.grid_sample(image, grid, mode="bilinear", align_corners=True))
    return MachineRates(2 * 2048**3 / gemm, sample / (3 * 96**3))


@dataclass
class RegionProfile:
    """What one stage (or everything outside the stages) cost.

    Attributes:
        wall_s: wall time (for stages the pipeline's own report), less ``profiler_s``.
        flops: multiply-adds x 2 of matrix products and convolutions.
        samples_forward, samples_backward: voxel-channels produced by ``grid_sample`` forward and
            its backward.
        profiler_s: time the profiler spent summing its events inside this part's wall time.
        self_s: self CPU time per operation name, seconds.
    """

    wall_s: float = 0.0
    flops: int = 0
    samples_forward: int = 0
    samples_backward: int = 0
    profiler_s: float = 0.0
    self_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def floor_s(self, rates: MachineRates) -> float:
        """Arithmetic at the SGEMM rate + samples at the ``grid_sample`` rate (a backward pass
        counted as two forward passes: gradients for the image and for the points; a convolution's
        backward likewise, for its input and its weights, so the floor is generous where only one
        gradient is needed)."""
        samples = self.samples_forward + 2 * self.samples_backward
        return self.flops / rates.gemm_flops_per_s + samples * rates.sample_s_per_value


def _convolutions(stage: object) -> list[torch.nn.Conv3d]:
    """The 3-D convolutions of every network a stage holds."""
    networks = [value for value in vars(stage).values() if isinstance(value, torch.nn.Module)]
    return [module for network in networks for module in network.modules() if isinstance(module, torch.nn.Conv3d)]


def _counting_convolutions(stage, flops: dict[str, int]):
    """``stage.run`` wrapped so that the FLOPs of its networks' forward convolutions are counted
    by hooks (exact output sizes, strides included) into ``flops[stage.name]``."""
    run, name = stage.run, stage.name

    def count(module: torch.nn.Conv3d, inputs, output: torch.Tensor) -> None:
        kernel_volume = module.kernel_size[0] * module.kernel_size[1] * module.kernel_size[2]
        flops[name] += 2 * module.in_channels // module.groups * kernel_volume * output.numel()

    @functools.wraps(run)
    def wrapped(problem, transform, progress):
        hooks = [conv.register_forward_hook(count) for conv in _convolutions(stage)]
        try:
            return run(problem, transform, progress)
        finally:
            for hook in hooks:
                hook.remove()
    return wrapped


def _timed_phase(function, name: str, seconds: dict[str, float]):
    """``function`` wrapped: a profiler range named after the phase, its wall time added up."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            with record_function(PHASE_PREFIX + name):
                return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
    return wrapped


def _ancestors(event):
    """The profiler events enclosing ``event``, innermost first."""
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _phase_of(event) -> str | None:
    """The phase whose range encloses a profiler event, or None."""
    return next((parent.name[len(PHASE_PREFIX):] for parent in _ancestors(event)
                 if parent.name.startswith(PHASE_PREFIX)), None)


def _inside_convolution(event) -> bool:
    return any(parent.name in ("aten::convolution", "aten::convolution_backward") for parent in _ancestors(event))


def collect_regions(events, regions: dict[str, RegionProfile], region: str) -> None:
    """Adds profiler events to ``regions``: to the phase whose range encloses them, else to ``region``.

    Args:
        events: ``profiler.events()`` of one profiler step (see :func:`profile_mode`).
        regions: running totals per region name (a ``defaultdict(RegionProfile)``).
        region: the stage that ran during the step, or :data:`OUTSIDE`.
    """
    for event in events:
        if event.name.startswith(PHASE_PREFIX):
            continue
        totals = regions[_phase_of(event) or region]
        totals.self_s[event.name] += event.self_cpu_time_total / 1e6
        if event.name in MATRIX_PRODUCTS and not _inside_convolution(event):
            totals.flops += event.flops or 0
        elif event.name == "aten::grid_sampler_3d" and event.input_shapes:
            channels = event.input_shapes[0][1]
            totals.samples_forward += channels * math.prod(event.input_shapes[1][:-1])
        elif event.name == "aten::grid_sampler_3d_backward" and event.input_shapes:
            totals.samples_backward += math.prod(event.input_shapes[0])
        elif event.name == "aten::convolution_backward" and event.input_shapes:
            gradient, weight = event.input_shapes[0], event.input_shapes[2]
            # at most two forward passes' worth: the input gradient and the weight gradient
            totals.flops += 2 * 2 * math.prod(gradient) * math.prod(weight[1:])


def profile_mode(mode: str, fixed: Path, moving: Path, threads: int, spacing: float
                 ) -> tuple[dict, dict[str, RegionProfile]]:
    """Runs ``mode`` once under the profiler; returns the summary and a profile per region."""
    flops: dict[str, int] = defaultdict(int)
    phase_seconds: dict[str, float] = defaultdict(float)
    originals = {function: getattr(registration, function) for function in PHASES}

    def build_profiled(*args, **kwargs):
        pipeline = originals["build_pipeline"](*args, **kwargs)
        for stage in pipeline.stages:
            stage.run = _counting_convolutions(stage, flops)
        return pipeline

    for function, name in PHASES.items():
        inner = build_profiled if function == "build_pipeline" else originals[function]
        setattr(registration, function, _timed_phase(inner, name, phase_seconds))
    try:
        with tempfile.TemporaryDirectory() as outdir, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            request = RegistrationRequest(fixed, moving, outdir, mode=mode, overview=False, device="cpu",
                                          options=RegistrationOptions(spacing=spacing, threads=threads))
            # The run is profiled in steps that are summed and dropped as they end (a whole run's
            # events do not fit in memory: TVF needed over 20 GB): a step ends when the running
            # stage changes (seen in the progress reports; after the runner's "done" report of a
            # stage, none runs) or after STEP_SECONDS. The time spent summing a step is taken off the
            # wall time of the part it was spent in.
            regions: dict[str, RegionProfile] = defaultdict(RegionProfile)
            running = {"region": OUTSIDE, "since": time.perf_counter()}

            def collect(step) -> None:
                collect_regions(step.events(), regions, running["region"])

            every_step = schedule(wait=0, warmup=0, active=1, repeat=0)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True, schedule=every_step,
                         on_trace_ready=collect) as profiler:
                def next_step(event: ProgressEvent) -> None:
                    region = OUTSIDE if event.message.startswith(FINISHED_MESSAGE) else event.stage
                    changed = region != running["region"]
                    if changed or time.perf_counter() - running["since"] > STEP_SECONDS:
                        started = time.perf_counter()
                        profiler.step()
                        # a stage's first and last reports come outside its timed block (the runner's)
                        regions[OUTSIDE if changed else region].profiler_s += time.perf_counter() - started
                        running.update(region=region, since=time.perf_counter())

                start = time.perf_counter()
                summary = register_files(request, on_progress=next_step)
                total_s = time.perf_counter() - start  # before the profiler stops (which takes a while)
    finally:
        for function, original in originals.items():
            setattr(registration, function, original)
    for name, flops_of_stage in flops.items():
        regions[name].flops += flops_of_stage
    for stage in summary["stages"]:
        regions[stage["name"]].wall_s = stage["seconds"]
    for name, seconds in phase_seconds.items():
        regions[name].wall_s = seconds
    regions[OUTSIDE].wall_s = total_s - sum(region.wall_s for name, region in regions.items() if name != OUTSIDE)
    for region in regions.values():
        region.wall_s -= region.profiler_s
    summary["profiled_seconds"] = total_s - sum(region.profiler_s for region in regions.values())
    return summary, regions


def report(mode: str, summary: dict, regions: dict[str, RegionProfile], rates: MachineRates) -> str:
    """Markdown: the stage table and the top operations of each region."""
    phases = [name for name in PHASES.values() if name in regions]  # weights, inputs, then the outputs
    order = phases[:2] + [stage["name"] for stage in summary["stages"]] + phases[2:] + [OUTSIDE]
    lines = [f"## `--mode {mode}`", "",
             f"End to end {summary['profiled_seconds']:.1f} s under the profiler, less the time it took to sum "
             "its events.", "",
             "| part | wall (s) | GFLOP (mm, conv) | trilinear samples (M, fwd / bwd) | floor (s) | wall / floor |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in order:
        region = regions.get(name, RegionProfile())
        floor = region.floor_s(rates)
        ratio = f"{region.wall_s / floor:.0f}x" if floor > 0.01 else "-"
        lines.append(f"| {name} | {region.wall_s:.1f} | {region.flops / 1e9:.1f} | "
                     f"{region.samples_forward / 1e6:.0f} / {region.samples_backward / 1e6:.0f} | {floor:.2f} | {ratio} |")
    for name in order:
        region = regions.get(name)
        if region is None or region.wall_s < OPERATIONS_FROM_S:
            continue
        operations = {op: seconds for op, seconds in region.self_s.items() if not op.startswith(PROFILER_STEP)}
        total = sum(operations.values())
        top = sorted(operations.items(), key=lambda item: -item[1])[:TOP_OPERATIONS]
        lines += ["", f"**{name}**: self CPU time {total:.1f} s; the operations that take most of it:", "",
                  "| operation | self CPU (s) | share |", "|---|---:|---:|"]
        lines += [f"| `{op}` | {seconds:.2f} | {100 * seconds / max(total, 1e-9):.0f} % |" for op, seconds in top]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["same", "tvf", "tvf-lddmm"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=2.0, help="working spacing in mm (default 2)")
    parser.add_argument("--fixed", type=Path, default=SAMPLES / "patientC_abdomen_ct.nii.gz")
    parser.add_argument("--moving", type=Path, default=SAMPLES / "patientA_abdomen_ct.nii.gz")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = measure_rates()
    header = [f"# Profile of the learned modes: {args.fixed.name} <- {args.moving.name}", "",
              f"- date: {datetime.date.today()}; machine: {platform.machine()}, {psutil.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB; torch {torch.__version__}; {args.threads} threads; "
              f"working spacing {args.spacing:g} mm; load average {psutil.getloadavg()[0]:.1f} at start",
              f"- measured rates: SGEMM {rates.gemm_flops_per_s / 1e9:.0f} GFLOP/s; trilinear grid_sample "
              f"{rates.sample_s_per_value * 1e9:.1f} ns per voxel-channel",
              f"- command: `python benchmarks/profile_modes.py {' '.join(sys.argv[1:])}`",
              ""]
    text = "\n".join(header)
    print(text, flush=True)
    for mode in args.modes:
        print(f"profiling --mode {mode} ...", file=sys.stderr, flush=True)
        summary, regions = profile_mode(mode, args.fixed, args.moving, args.threads, args.spacing)
        section = report(mode, summary, regions, rates)
        print(section + "\n", flush=True)
        text += "\n" + section + "\n"
        if args.output is not None:  # written after every mode, so a long run keeps what it finished
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)


if __name__ == "__main__":
    main()
