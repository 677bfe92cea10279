"""What a method adapter is: one function from two images to a fixed -> moving transform.

Every adapter, ours or a peer's, has the signature ``run(fixed, moving, context) -> SpatialTransform``:
``fixed`` and ``moving`` are the prepared images (HU for CT, LPS mm geometry), also on disk at
``context.fixed_path`` / ``context.moving_path`` (NIfTI) for tools that read files, and the result
maps fixed LPS points to moving LPS points. The worker turns any such result into the common
displacement field on the fixed grid (:meth:`SpatialTransform.displacement_on`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.spatial.transform import SpatialTransform

OK = "ok"
NOT_AVAILABLE = "not available in this version"
NOT_INSTALLED = "not installed"
FAILED = "failed"


@dataclass(frozen=True)
class RunContext:
    """How a method runs.

    Attributes:
        threads: CPU threads every tool is pinned to.
        spacing: the prepared images' voxel size in mm (the working resolution of the benchmark).
        workdir: an empty scratch folder, also the worker's current directory.
        fixed_path, moving_path: the prepared images as NIfTI files.
    """

    threads: int
    spacing: float
    workdir: Path
    fixed_path: Path
    moving_path: Path


Adapter = Callable[[Image, Image, RunContext], SpatialTransform]


@dataclass(frozen=True)
class Method:
    """A registration method of the benchmark.

    Attributes:
        name: the id on the command line and in the tables.
        label: the longer name in the tables.
        configuration: the documented standard configuration (one line).
        run: the adapter, or None when the method cannot run in this version.
        modules: Python modules the adapter needs; imported by the worker before the clock starts.
        distributions: pip distributions of the tool (versions are reported; install hint).
        kind: "baseline", "ours", "peer" or "plug-in".
    """

    name: str
    label: str
    configuration: str
    run: Adapter | None
    modules: tuple[str, ...] = ()
    distributions: tuple[str, ...] = ()
    kind: str = "peer"
