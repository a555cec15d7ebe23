"""Which iteration directory of a Megatron checkpoint root to read.

Training leaves several iterations behind, and the three stacks record the newest differently:
Megatron-LM's tracker ``latest_checkpointed_iteration.txt`` (an integer or ``release``),
Megatron-Bridge's ``latest_train_state.pt`` (a ``TrainState`` dict whose ``step`` is the
iteration) beside the same tracker, or nothing but ``iter_*`` folders. The path given may also be
an iteration directory itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from bridge.errors import InputError, sanitize
from bridge.plumbing.safe_files import MAX_TRACKER_BYTES, read_bytes_capped, regular_file
from bridge.plumbing.safe_pickle import safe_torch_load

TRACKER = "latest_checkpointed_iteration.txt"
LATEST_TRAIN_STATE = "latest_train_state.pt"
TRAIN_STATE = "train_state.pt"
RELEASE = "release"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_RANK_DIR = re.compile(r"^mp_rank_\d{2}")
# What marks a folder as one iteration (Megatron-Bridge's ``is_checkpoint_iteration_directory`` plus
# the files of a damaged torch_dist one, which the reader then reports), or legacy rank folders.
_ITERATION_FILES = ("metadata.json", ".metadata", "common.pt", "run_config.yaml", TRAIN_STATE)


def iteration_dir_name(iteration: int | str) -> str:
    """Megatron's ``get_checkpoint_name``: ``iter_{:07d}`` or ``release``."""
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def is_iteration_dir(path: Path) -> bool:
    if any(os.path.lexists(path / name) for name in _ITERATION_FILES):  # a FIFO too: its reader refuses it
        return True
    return any(_RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir())


def iterations_present(root: Path) -> list[int | str]:
    """Iteration numbers of the ``iter_*`` folders, ascending, then ``release`` if present."""
    found: list[int | str] = sorted(
        int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name))
    )
    return found + ([RELEASE] if (root / RELEASE).is_dir() else [])


def parse_iteration(text: str) -> int | str:
    """``--iteration`` and tracker text: a non-negative integer or ``release``."""
    text = text.strip()
    if text == RELEASE:
        return RELEASE
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise ValueError(f"expected an iteration number or 'release', found {sanitize(repr(text[:40]), 60)}")
    return int(text)


def _tracked(root: Path) -> int | str | None:
    tracker = root / TRACKER
    if os.path.lexists(tracker):  # a FIFO or a dangling link is refused, not skipped
        try:
            return parse_iteration(read_bytes_capped(tracker, MAX_TRACKER_BYTES).decode(errors="replace"))
        except ValueError as e:
            raise InputError(f"{tracker}: {e}") from None
    state_file = root / LATEST_TRAIN_STATE
    if os.path.lexists(state_file):
        state = safe_torch_load(regular_file(state_file), str(state_file))
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step.item())
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            found = sanitize(repr(step), 40)
            raise InputError(f"{state_file}: expected a train state with an integer 'step', found {found}")
        return step
    return None


def resolve_iteration_dir(root: Path, iteration: int | str | None = None) -> Path:
    """The iteration folder to read: ``iteration`` if given (it must exist), else the one the tracker
    or ``latest_train_state.pt`` names, else the newest ``iter_*``; ``root`` itself if it is one."""
    root = Path(root)
    if is_iteration_dir(root):
        if iteration is not None and root.name != iteration_dir_name(iteration):
            raise InputError(
                f"{root}: is the iteration folder {root.name}; --iteration {iteration} names another "
                "(pass the checkpoint root to choose among iterations)"
            )
        return root
    present = iterations_present(root)
    if iteration is not None:
        chosen = root / iteration_dir_name(iteration)
        if not chosen.is_dir():
            listed = ", ".join(map(str, present)) or "none"
            raise InputError(f"{root}: no iteration {iteration}; iterations present: {listed}")
        return chosen
    tracked = _tracked(root)
    if tracked is not None:
        chosen = root / iteration_dir_name(tracked)
        if not chosen.is_dir():
            raise InputError(f"{root / TRACKER}: points to {chosen.name}, which does not exist")
        return chosen
    if not present:
        raise InputError(f"{root}: no {TRACKER}, iter_* or mp_rank_* directories; not a Megatron checkpoint")
    return root / iteration_dir_name(max((i for i in present if i != RELEASE), default=RELEASE))
