"""Progress reporting and cancellation shared by every stage."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Callable

from ..errors import RegistrationCancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update.

    Attributes:
        stage: the running stage's name (e.g. "intensity-affine").
        stage_index: 0-based position of the stage in the pipeline.
        stage_count: number of stages in the pipeline.
        fraction: progress of this stage in [0, 1].
        message: short human text (level, iteration, loss).
    """

    stage: str
    stage_index: int
    stage_count: int
    fraction: float
    message: str

    @property
    def overall_fraction(self) -> float:
        """Progress of the whole pipeline in [0, 1], each stage counted equally."""
        return (self.stage_index + min(max(self.fraction, 0.0), 1.0)) / self.stage_count


ProgressCallback = Callable[[ProgressEvent], None]


class Progress:
    """What a stage uses to report progress and to notice a cancel request.

    Stages call :meth:`update` (which also checks for cancellation) at least once per iteration.
    """

    def __init__(self, stage: str, stage_index: int, stage_count: int,
                 callback: ProgressCallback | None, cancel: threading.Event | None) -> None:
        self._stage, self._index, self._count = stage, stage_index, stage_count
        self._callback = callback
        self._cancel = cancel
        self.details: dict[str, object] = {}

    def record(self, key: str, value: object) -> None:
        """Keeps a number or short text about the stage for the run summary (e.g. final loss)."""
        self.details[key] = value

    def warn(self, key: str, message: str) -> None:
        """Records ``message`` under ``key`` (e.g. "fallback", "note") and warns ``"<stage>: <message>"``,
        so the command line prints it and the Slicer log shows it: for a stage that falls back or adds
        nothing, which the user must not learn only from summary.json."""
        self.record(key, message)
        warnings.warn(f"{self._stage}: {message}", UserWarning, stacklevel=3)

    def update(self, fraction: float, message: str = "") -> None:
        """Reports progress in [0, 1] of the current stage; raises RegistrationCancelled if asked to stop."""
        self.check_cancelled()
        if self._callback is not None:
            self._callback(ProgressEvent(self._stage, self._index, self._count, fraction, message))

    def child(self) -> Progress:
        """A Progress for work run inside this stage (same callback and cancel) whose recorded
        details stay separate, e.g. a fallback's stages."""
        return Progress(self._stage, self._index, self._count, self._callback, self._cancel)

    def check_cancelled(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise RegistrationCancelled(f"registration cancelled during stage '{self._stage}'")
