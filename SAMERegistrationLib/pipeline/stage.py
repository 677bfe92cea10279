"""The stage interface every registration step implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..spatial.transform import SpatialTransform
from .problem import RegistrationProblem
from .progress import Progress


class Stage(ABC):
    """One step of a registration pipeline (initial alignment, affine, a deformable method...).

    A stage reads the problem's images, starts from the transform found so far (fixed -> moving)
    and returns a new, complete transform. It performs no file I/O, calls ``progress.update`` at
    least once per iteration (which raises ``RegistrationCancelled`` when the caller cancelled),
    and may record numbers for the summary with ``progress.record``.
    """

    name: str = "stage"

    @abstractmethod
    def run(self, problem: RegistrationProblem, transform: SpatialTransform, progress: Progress) -> SpatialTransform:
        """Returns the transform after this stage."""
