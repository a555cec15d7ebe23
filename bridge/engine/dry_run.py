"""``--dry-run``: the conversion itself, on tensors without data, into a scratch directory.

Sources hand out fake tensors (shape and dtype only, ``plumbing.fake``); every rule, writer and
metadata step runs as in a real conversion, with each tensor's bytes left out as a hole. The
scratch tree then lists exactly the files and byte counts the real output would have, read from
nothing but headers and indexes. Before a real run, ``check_free_space`` refuses an output the
disk cannot hold.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bridge.errors import OutputError
from bridge.formats.hf import LazyTensors
from bridge.plumbing.atomic import atomic_output_dir, check_output
from bridge.plumbing.fake import fake, storages_skipped
from bridge.plumbing.pipeline import same_thread

# What a conversion holds besides the interpreter and its libraries, as (times the largest tensor, plus
# MiB), by output format and by what is read ("hf", "legacy", "torch_dist"): fitted to the peaks
# `make bench` measured at the 0.5B, 1.5B and 3B shapes (bench/results/ed27609.json), legacy sources
# refitted on 7B once merges gave each shard back as it was copied (515a572.json). HF sources: the
# mapped tensors of the entries in flight (one written, one fetched ahead); torch_dist outputs add
# their ~128 MB write batches; legacy sources add the shards being merged (mapped pages, given back
# every 64 MiB) and the merged tensors with their pool of reused buffers (256 MiB at most).
# Re-sharding torch_dist to torch_dist has no bench row: taken as hf -> torch_dist plus that pool.
_WORKING_SET: dict[tuple[str, str], tuple[float, int]] = {
    ("legacy", "hf"): (1.15, 10),
    ("legacy", "legacy"): (1.75, 35),
    ("legacy", "torch_dist"): (1.2, 120),
    ("torch_dist", "hf"): (1.8, 80),
    ("torch_dist", "legacy"): (2.1, 230),
    ("torch_dist", "torch_dist"): (1.8, 330),
    ("safetensors", "hf"): (1.6, 60),
    ("safetensors", "legacy"): (1.7, 45),
    ("safetensors", "torch_dist"): (1.55, 10),
}


@dataclass
class OutputPlan:
    """What a run would write and need, for ``--dry-run`` and its ``--json``."""

    files: dict[str, int]
    bytes: int
    disk_free: int
    fits: bool
    peak_rss_estimate: int

    def to_dict(self) -> dict:
        return asdict(self)


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> bytes), sorted."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def disk_free(dst: Path) -> int:
    """Free bytes where ``dst`` will be created (its nearest existing ancestor)."""
    where = Path(os.path.abspath(dst))
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_free_space(dst: Path, needed: int) -> None:
    """Refuses before any tensor is written when the disk cannot hold ``needed`` bytes (exit 4)."""
    free = disk_free(dst)
    if needed > free:
        raise OutputError(
            f"{dst}: the output needs {_size(needed)} but only {_size(free)} are free there; "
            "free space or choose another destination (--dry-run lists the files)"
        )


def payload_bytes(shapes: Mapping[str, tuple[torch.Size, torch.dtype]], dtype: torch.dtype | None) -> int:
    """Tensor bytes of a model in ``dtype`` (None: as stored): what any output format holds, give or
    take headers, vocabulary padding and the norms TP copies."""
    return sum(math.prod(shape) * (dtype or stored).itemsize for shape, stored in shapes.values())


def largest_tensor(shapes: Mapping[str, tuple[torch.Size, torch.dtype]], dtype: torch.dtype | None) -> int:
    return max(math.prod(shape) * (dtype or stored).itemsize for shape, stored in shapes.values())


def peak_rss_estimate(largest_tensor: int, fmt: str, source: str) -> int:
    """This process's peak RSS so far (the interpreter, torch, the plan) plus the working set of
    writing ``fmt`` (``_WORKING_SET``)."""
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, mib = _WORKING_SET[(fmt, source)]
    return now + int(times * largest_tensor) + mib * 2**20


@contextmanager
def output_dir(dst: Path, *, force: bool, inputs: Sequence[Path], dry_run: bool, needed: int) -> Iterator[Path]:
    """The real output's hidden partial (``atomic_output_dir``), refused when the disk cannot hold
    ``needed`` bytes; or for a dry run a scratch directory that is removed afterwards, with
    ``torch.save`` leaving fake tensors' bytes out. A dry run refuses what the real run would refuse
    (an existing output without --force, an output inside the input)."""
    if not dry_run:
        with atomic_output_dir(dst, force=force, inputs=inputs) as tmp:
            check_free_space(dst, needed)  # after the output's own checks, whose errors say more
            yield tmp
        return
    check_output(dst, force=force, inputs=inputs)
    with tempfile.TemporaryDirectory(prefix="h1bridge-dry-run-") as scratch, storages_skipped(), same_thread():
        yield Path(scratch)


def output_plan(files: dict[str, int], dst: Path, largest_tensor: int, fmt: str, *, source: str = "hf") -> OutputPlan:
    """``files``: the scratch tree's ``file_sizes``; ``fmt``: the output's; ``source``: the input's format
    ("hf", "legacy", "torch_dist")."""
    total, free = sum(files.values()), disk_free(dst)
    estimate = peak_rss_estimate(largest_tensor, fmt, source)
    return OutputPlan(files, total, free, total <= free, estimate)


class FakeSource:
    """An HF-keyed source (``get``, ``shape``, ``dtype``) whose tensors are fake: shapes from headers."""

    def __init__(self, source):
        self.source = source

    def get(self, key: str) -> torch.Tensor:
        return fake(self.source.shape(key), self.source.dtype(key))

    def __getattr__(self, name: str):
        return getattr(self.source, name)


class FakeRanks:
    """A Megatron checkpoint whose rank tensors are fake (shapes and dtypes from its metadata). Tensors of
    one shape and dtype are one object, so checks that replicas and shared copies agree (which would
    need data) pass by identity."""

    def __init__(self, meg):
        self.meg = meg
        self._fakes: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}

    def model(self, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        meta = self.meg.tensor_meta(tp_rank, pp_rank)
        return {k: self._fake(shape, dtype) for k, (shape, dtype) in meta.items()}

    def _fake(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if (shape, dtype) not in self._fakes:
            self._fakes[(shape, dtype)] = fake(shape, dtype)
        return self._fakes[(shape, dtype)]

    def release(self, done: Iterable[tuple[int, int, str]] = ()) -> None:
        """Fake tensors hold no pages."""

    def copied(self, shard: torch.Tensor) -> None:
        """Fake tensors hold no pages."""

    def __getattr__(self, name: str):
        return getattr(self.meg, name)


def fake_producer(layout: Mapping[str, tuple[torch.Size, torch.dtype]]):
    """A producer for ``write_hf_weights`` giving each planned tensor as a fake one."""
    return lambda keys: LazyTensors(keys, lambda key: fake(*layout[key]))
