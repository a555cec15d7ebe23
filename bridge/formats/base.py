"""The interface every Megatron checkpoint format implements, so the engine and the checks never ask
which format they hold: a reader presents the checkpoint as TP x PP ranks of named tensors, a writer
turns a source of HF tensors into the format under a ``ParallelPlan``."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


class MegatronReader(Protocol):
    """One iteration of a Megatron checkpoint, opened lazily."""

    format: str
    root: Path
    iter_dir: Path
    tp: int  # ranks as read (torch_dist: 1 x 1, its tensors are global)
    pp: int
    args: Namespace | None
    iteration: int | str
    run_config: dict | None

    def model(self, tp_rank: int, pp_rank: int) -> Mapping[str, torch.Tensor]: ...

    def tensor_meta(self, tp_rank: int, pp_rank: int) -> dict[str, tuple[torch.Size, torch.dtype]]: ...

    def rank_file(self, tp_rank: int, pp_rank: int) -> Path: ...

    def copied(self, shard: torch.Tensor) -> None:
        """A merge has copied ``shard`` out: memory that only maps the file may be given back now."""
        ...

    def release(self, done: Iterable[tuple[int, int, str]] = ()) -> None:
        """Gives back the memory of tensors read so far; ``done``: ``(tp_rank, pp_rank, name)`` of those
        read for the last time, whose bytes may leave the page cache too."""
        ...

    def saved_parallelism(self) -> tuple[int | None, int | None]:
        """The TP/PP the writer ran with (None where the checkpoint does not record it)."""
        ...


class Writer(Protocol):
    def __call__(
        self,
        iter_dir: Path,
        source: Any,
        plan: Any,
        *,
        dtype: torch.dtype | None,
        args: Namespace,
        iteration: int,
        objects: dict[str, object] | None,
        progress: bool,
    ) -> int:
        """Writes the iteration folder from ``source.get(hf_key)`` (``source.dtype(hf_key)``: its dtype,
        without reading it); returns the number of tensors."""
        ...


@dataclass(frozen=True)
class MegatronFormat:
    """A registry entry: the name users pass to ``--format``, how to recognise an iteration folder
    of it, and its reader and writer."""

    name: str
    recognizes: Callable[[Path], bool]
    open: Callable[[Path, Path], MegatronReader]  # (root as given, iteration folder)
    write: Writer
    takes_objects: bool = False  # can store ShardedObjects (Transformer Engine extra state)
