"""Which checkpoint format a path holds, decided from file names only (nothing is loaded)."""

from __future__ import annotations

import os
from pathlib import Path

from bridge.errors import InputError
from bridge.formats.hf import INDEX, SINGLE
from bridge.formats.iterations import LATEST_TRAIN_STATE, TRACKER, is_iteration_dir

HF = "hf"
LEGACY = "megatron-legacy"


def is_torch_dist(iter_dir: Path) -> bool:
    """Same test as megatron-core's ``check_is_distributed_checkpoint``: ``metadata.json`` exists (as
    any kind of file: a FIFO of that name is then refused by the reader, not mistaken for legacy)."""
    return os.path.lexists(Path(iter_dir) / "metadata.json")


def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: does not exist")
    if not path.is_dir():
        raise InputError(f"{path}: not a directory; expected an HF folder or a Megatron checkpoint")
    names = {p.name for p in path.iterdir()}
    if not names:
        raise InputError(f"{path}: empty directory")
    if "config.json" in names and (SINGLE in names or INDEX in names):
        return HF
    if (
        TRACKER in names
        or LATEST_TRAIN_STATE in names
        or is_iteration_dir(path)
        or any(n.startswith("iter_") or n == "release" for n in names)
    ):
        return LEGACY
    raise InputError(f"{path}: neither an HF folder (config.json + safetensors) nor a Megatron checkpoint")
