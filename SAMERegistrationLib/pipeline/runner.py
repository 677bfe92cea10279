"""Runs stages in order with timing, peak memory, progress and cancellation."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from ..spatial.transform import SpatialTransform
from .memory import PeakMemory
from .problem import RegistrationProblem
from .progress import Progress, ProgressCallback
from .stage import Stage


@dataclass(frozen=True)
class StageReport:
    """How one stage went: wall time (s), peak host / CUDA memory (MiB) and stage-specific details."""

    name: str
    seconds: float
    host_peak_mib: float
    cuda_peak_mib: float | None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrationResult:
    """The final transform (fixed -> moving, LPS) and one report per stage."""

    transform: SpatialTransform
    stages: list[StageReport]

    @property
    def seconds(self) -> float:
        return sum(report.seconds for report in self.stages)


class RegistrationPipeline:
    """An ordered list of stages; each starts from the previous stage's transform."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("RegistrationPipeline: 'stages' must not be empty")
        self.stages = list(stages)

    def run(self, problem: RegistrationProblem, initial: SpatialTransform | None = None,
            on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None
            ) -> RegistrationResult:
        """Runs every stage; raises ``RegistrationCancelled`` (no result) when ``cancel`` is set."""
        transform = (initial or SpatialTransform.identity()).to(problem.device)
        reports = []
        for index, stage in enumerate(self.stages):
            progress = Progress(stage.name, index, len(self.stages), on_progress, cancel)
            progress.update(0.0, "starting")
            start = time.perf_counter()
            with PeakMemory(problem.device) as memory:
                transform = stage.run(problem, transform, progress)
            seconds = time.perf_counter() - start
            progress.update(1.0, f"done in {seconds:.1f} s")
            reports.append(StageReport(stage.name, seconds, memory.host_peak_mib, memory.cuda_peak_mib,
                                       dict(progress.details)))
        return RegistrationResult(transform, reports)
