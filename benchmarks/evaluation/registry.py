"""Every method the harness knows, by name, and plug-in methods given as ``module:function``."""

from __future__ import annotations

import importlib

import numpy as np

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.spatial.transform import SpatialTransform

from .method import Adapter, Method, RunContext
from .ours import our_methods
from .peers import PEER_METHODS


def run_identity(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    """No registration: the images overlaid by their physical coordinates."""
    return SpatialTransform(np.eye(4))


IDENTITY = Method("identity", "no registration", "identity transform (physical overlay)", run_identity,
                  kind="baseline")


def known_methods() -> dict[str, Method]:
    """Name -> method: the identity baseline, our modes (``MODE_NAMES`` order), then the peers."""
    return {method.name: method for method in (IDENTITY, *our_methods(), *PEER_METHODS)}


def resolve_method(name: str) -> Method:
    """A known method, or a plug-in ``package.module:function`` with the adapter signature
    ``function(fixed, moving, context) -> SpatialTransform`` (importable from the repository root)."""
    methods = known_methods()
    if name in methods:
        return methods[name]
    if ":" not in name:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(methods)} or give module:function")
    module, function = name.split(":", 1)
    return Method(name, name, f"plug-in {name}", _plug_in(module, function), modules=(module,), kind="plug-in")


def _plug_in(module: str, function: str) -> Adapter:
    """An adapter that imports ``module`` only when it runs (in the worker, not in the harness)."""

    def run(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
        return getattr(importlib.import_module(module), function)(fixed, moving, context)

    return run
