"""Saving and loading network weights with a SHA-256 beside them.

A weights file is a ``torch.save`` dictionary ``{"config": {...}, "state_dict": {...}, **extra}``
holding only tensors and plain values, so it loads with ``weights_only=True`` (no code runs on
load). ``<file>.sha256`` next to it holds its digest; loading refuses a file whose digest differs,
so a damaged download or a swapped file is reported instead of silently giving wrong results.

A process keeps every checkpoint it has read, by file and digest: a process that runs many
registrations (a ``same-register-batch`` worker) reads each weights file once, while the digest is
still checked on every load, so a file replaced in between is read again.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"
"""Folder of the weights shipped with the product (each with a ``.sha256`` and a model card)."""
_CHECKPOINTS: dict[tuple[str, str], dict] = {}
"""Checkpoints read by this process, by (resolved path, SHA-256); see :func:`load_checked`."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(path: Path, model: nn.Module, config: dict, **extra) -> str:
    """Writes ``{"config", "state_dict", **extra}`` and ``<path>.sha256``; returns the SHA-256."""
    path = Path(path)
    torch.save({"config": config, "state_dict": model.state_dict(), **extra}, path)
    digest = sha256_file(path)
    path.with_suffix(path.suffix + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def load_checked(path: Path | str, what: str, option: str) -> dict:
    """The checkpoint dictionary of ``path`` after its SHA-256 check.

    The file is read once per process and digest: later calls return the same dictionary (callers
    must not modify it; :func:`build_checked` copies the weights into a new network).

    Args:
        path: the weights file.
        what: what the weights are, for messages (e.g. "SAM weights").
        option: the CLI option that chooses another file (e.g. "--sam-weights").

    Raises:
        InputError: the file or its ``.sha256`` is missing, the checksum differs, or the file is not
            a weights dictionary.
    """
    path = Path(path)
    checksum_file = path.with_suffix(path.suffix + ".sha256")
    if not path.is_file():
        raise InputError(f"{what} {path}: not found: reinstall the extension or give {option} FILE")
    if not checksum_file.is_file():
        raise InputError(f"{what} {path}: no checksum file {checksum_file.name} beside it: "
                         "write its SHA-256 there (sha256sum) to confirm the file is the one you mean")
    try:
        expected = checksum_file.read_text().split()[0]
    except (UnicodeDecodeError, IndexError) as error:
        raise InputError(f"{what} {path}: its checksum file {checksum_file.name} is empty or not text: write the "
                         "file's SHA-256 there (sha256sum)") from error
    actual = sha256_file(path)
    if actual != expected:
        raise InputError(f"{what} {path}: SHA-256 {actual[:12]}... does not match {checksum_file.name} "
                         f"({expected[:12]}...): the file is damaged or was replaced; reinstall or re-download it")
    key = (str(path.resolve()), actual)
    if key in _CHECKPOINTS:
        return _CHECKPOINTS[key]
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        # torch's own message may run over many lines and suggest weights_only=False: not shown.
        raise InputError(f"{what} {path}: cannot be loaded as plain tensors ({type(error).__name__}; the file is "
                         f"damaged or holds code, which is never run): reinstall or re-download it, or give "
                         f"{option} FILE") from error
    if (not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict)
            or not isinstance(checkpoint.get("state_dict"), dict)):
        raise InputError(f"{what} {path}: not a weights file of this project (no config and state_dict "
                         f"dictionaries): give {option} a file written by this project's training")
    _CHECKPOINTS[key] = checkpoint
    return checkpoint


def build_checked(checkpoint: dict, build, what: str, path: Path | str) -> nn.Module:
    """``build(config)`` with the checkpoint's weights loaded, in eval mode.

    Raises:
        InputError: the config or the weights do not fit the network (e.g. another model's file).
    """
    try:
        model = build(checkpoint["config"])
        model.load_state_dict(checkpoint["state_dict"])
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as error:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise InputError(f"{what} {path}: the weights do not fit this network ({reason}): give the weights of "
                         "this network") from error
    return model.eval()
