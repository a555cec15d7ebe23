"""Legacy Megatron checkpoints: ``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`` per rank.

Files are loaded with ``mmap=True, weights_only=True`` and a narrow allow-list (the argparse
Namespace Megatron stores as ``args``): nothing in a checkpoint can run code, and tensors stay on
disk until a rule touches them.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from bridge.engine.feed import EntryFeed
from bridge.engine.layout import expected_hf_shapes
from bridge.engine.plan import ParallelPlan, hf_name
from bridge.errors import InputError, UnsupportedError
from bridge.formats.base import MegatronFormat
from bridge.formats.iterations import TRACKER, resolve_iteration_dir
from bridge.plumbing import distributed, page_cache
from bridge.plumbing.pages import drop_copied, drop_resident
from bridge.plumbing.progress import Progress
from bridge.plumbing.safe_files import open_regular, regular_file
from bridge.plumbing.safe_pickle import safe_torch_load
from bridge.plumbing.streamed_save import Deferred, stream_save_all

RANK_FILE = "model_optim_rng.pt"
HF_ASSETS = "hf_assets"
CHECKPOINT_VERSION = 3.0
CHUNK_BYTES = 16 * 2**20  # a shard is cast and written this much at a time
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?$")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def safe_load(path: Path) -> object:
    """Loads a rank file memory-mapped, never unpickling code (see ``safe_pickle``)."""
    return safe_torch_load(regular_file(path), str(path), mmap=True)


class LegacyCheckpoint:
    """Rank files of one iteration, opened lazily; ``args`` and layout read from rank 0."""

    format = "legacy"
    run_config: dict | None = None  # Megatron-Bridge's run_config.yaml, set by engine.source.open_megatron

    def __init__(self, path: Path, iteration: int | str | None = None, iter_dir: Path | None = None):
        self.root = Path(path)
        self.iter_dir = Path(iter_dir) if iter_dir is not None else resolve_iteration_dir(self.root, iteration)
        self.tp, self.pp, self._rank_dirs = self._scan_ranks()
        self._cache: dict[tuple[int, int], dict] = {}
        self._files: dict[tuple[int, int], _MappedFile] = {}
        first = self._load(0, 0)
        self.args: argparse.Namespace | None = first.get("args")
        self.iteration = first.get("iteration", 0)
        if self.args is not None:
            for name, found in (("tensor_model_parallel_size", self.tp), ("pipeline_model_parallel_size", self.pp)):
                stored = getattr(self.args, name, found)
                if stored != found:
                    raise InputError(f"{self.iter_dir}: args say {name}={stored} but {found} rank dirs exist")

    def _scan_ranks(self) -> tuple[int, int, dict[tuple[int, int], Path]]:
        dirs: dict[tuple[int, int], Path] = {}
        for p in self.iter_dir.iterdir():
            m = _RANK_DIR.match(p.name)
            if not (p.is_dir() and m):
                continue
            if m.group(3):
                raise UnsupportedError(f"{p}: expert-parallel rank directories are not supported")
            dirs[(int(m.group(1)), int(m.group(2) or 0))] = p
        if not dirs:
            if (self.iter_dir / ".metadata").is_file() or (self.iter_dir / "common.pt").is_file():
                raise InputError(
                    f"{self.iter_dir / 'metadata.json'}: missing; the directory holds torch_dist files "
                    "(.metadata, common.pt) but a torch_dist checkpoint needs all three"
                )
            raise InputError(f"{self.iter_dir}: no mp_rank_* directories")
        tp = max(t for t, _ in dirs) + 1
        pp = max(p for _, p in dirs) + 1
        for tp_rank in range(tp):
            for pp_rank in range(pp):
                if (tp_rank, pp_rank) not in dirs:
                    missing = self.iter_dir / rank_dir_name(tp_rank, pp_rank, pp)
                    raise InputError(f"{missing}: missing rank directory (found TP={tp}, PP={pp})")
        return tp, pp, dirs

    def rank_file(self, tp_rank: int, pp_rank: int) -> Path:
        return self._rank_dirs[(tp_rank, pp_rank)] / RANK_FILE

    def saved_parallelism(self) -> tuple[int | None, int | None]:
        return self.tp, self.pp

    def _load(self, tp_rank: int, pp_rank: int) -> dict:
        if (tp_rank, pp_rank) not in self._cache:
            path = self.rank_file(tp_rank, pp_rank)
            if not os.path.lexists(path):
                raise InputError(f"{path}: missing rank file")
            state = safe_load(path)
            if not isinstance(state, dict) or "model" not in state:
                extra = (
                    " (virtual pipeline 'model0' is not supported)"
                    if isinstance(state, dict) and "model0" in state
                    else ""
                )
                raise InputError(f"{path}: no 'model' state dict{extra}")
            _check_state(path, state)
            self._cache[(tp_rank, pp_rank)] = state
            self._files[(tp_rank, pp_rank)] = _MappedFile(path, state["model"])
        return self._cache[(tp_rank, pp_rank)]

    def model(self, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        """The rank's weights (``_extra_state`` entries of Transformer Engine dropped)."""
        model = self._load(tp_rank, pp_rank)["model"]
        return {k: v for k, v in model.items() if not k.endswith("_extra_state")}

    def tensor_meta(self, tp_rank: int, pp_rank: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {k: (v.shape, v.dtype) for k, v in self.model(tp_rank, pp_rank).items()}

    def copied(self, shard: torch.Tensor) -> None:
        """A merge has copied ``shard``: its pages go now (read-only file mappings refault from the file)."""
        drop_copied(shard)

    def release(self, done: Iterable[tuple[int, int, str]] = ()) -> None:
        """Gives back the pages read so far (they count as resident while mapped): dropped in place,
        or, where the platform cannot, by unmapping the rank files (reloaded on the next access).
        ``done``: tensors ``(tp_rank, pp_rank, name)`` read for the last time; their bytes also leave
        the page cache (``page_cache``)."""
        if not all(
            drop_resident(v for v in s["model"].values() if isinstance(v, torch.Tensor)) for s in self._cache.values()
        ):
            self._cache.clear()
        for tp_rank, pp_rank, name in done:
            mapped = self._files.get((tp_rank, pp_rank))
            tensor = self._cache.get((tp_rank, pp_rank), {}).get("model", {}).get(name)
            if mapped is not None and isinstance(tensor, torch.Tensor):
                mapped.forget(tensor)


class _MappedFile:
    """Where a memory-mapped rank file's tensors lie in it: torch.load maps the whole file once and
    each storage is a slice at its record's offset, so the first storage's address less the first
    record's offset is the file's start."""

    def __init__(self, path: Path, model: dict):
        self.file = open_regular(path)
        reader = torch._C.PyTorchFileReader(self.file)
        records = [r for r in reader.get_all_records() if r.startswith("data/")]
        offsets = [reader.get_record_offset(r) for r in records]  # type: ignore[attr-defined]  # not in the stub
        pointers = [v.untyped_storage().data_ptr() for v in model.values() if isinstance(v, torch.Tensor) and v.nbytes]
        self.start = min(pointers) - min(offsets) if offsets and pointers else None

    def forget(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if self.start is not None and storage.nbytes():
            page_cache.forget(self.file.fileno(), storage.data_ptr() - self.start, storage.nbytes())


def rank_state(model: dict[str, torch.Tensor], args: argparse.Namespace, iteration: int) -> dict:
    """What Megatron-LM saves in a rank file (``model`` maps names to ``Deferred`` placeholders)."""
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": model}


def write_stage(files: list[tuple[dict, Path, Deferred]]) -> None:
    """Writes one stage's rank files ``(state, path, deferred)`` side by side."""
    stream_save_all(files)


def write_tracker(root: Path, iteration: int | str) -> None:
    (root / TRACKER).write_text(str(iteration))


def _check_state(path: Path, state: dict) -> None:
    """What Megatron's loader would trip over later, named now: ``model`` a dict of dense tensors
    (``_extra_state`` entries are TE's own objects), ``args`` a Namespace."""
    model, args = state["model"], state.get("args")
    if not isinstance(model, dict):
        raise InputError(f"{path}: 'model' is a {type(model).__name__}; expected a dict of tensors")
    if args is not None and not isinstance(args, argparse.Namespace):
        raise InputError(f"{path}: 'args' is a {type(args).__name__}; expected an argparse Namespace")
    for key, value in model.items():
        if not isinstance(key, str):
            raise InputError(f"{path}: model key {key!r:.40} is not a string")
        if key.endswith("_extra_state"):
            continue
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            what = f"a {value.layout} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
            raise InputError(f"{path}: {key} is {what}; expected a dense tensor")


def is_legacy(iter_dir: Path) -> bool:
    """Megatron-LM's ``_get_checkpoint_format``: an entry starting with ``mp_rank_0``."""
    return any(p.name.startswith("mp_rank_0") for p in Path(iter_dir).iterdir())


def write(
    iter_dir: Path,
    source,
    plan: ParallelPlan,
    *,
    dtype: torch.dtype | None,
    args: argparse.Namespace,
    iteration: int,
    objects: dict[str, object] | None = None,
    progress: bool = False,
) -> int:
    """A stage's rank files side by side, streamed: their tensors' shapes come from the plan, so each
    file's pickle is known first; then entry by entry, the entry's HF tensors are fetched once
    (``EntryFeed``) and each rank's shard is cut, cast and written into its file. Memory is the source
    tensors of two entries. ``source.dtype(key)`` gives a shard's dtype when ``dtype`` is None (kept).
    ``objects`` are not stored: legacy files keep none."""
    hf_shapes = expected_hf_shapes(plan.hf_config)
    count = 0
    mine = distributed.current().share(plan.ranks())  # under torchrun: this process's rank files
    stages = {pp_rank: [t for t, p in mine if p == pp_rank] for _, pp_rank in mine}
    bar = Progress(total=len(mine), unit="rank", desc="→megatron", disable=not progress)
    for pp_rank, tp_ranks in stages.items():
        entries = []  # (param, stage-local layer, HF keys, shard shape, shard dtype): the same for every TP rank
        for param, layer, local in plan.stage_entries(pp_rank):
            keys = tuple(hf_name(k, layer) for k in param.hf)
            shape = plan.shard_shape(param, [hf_shapes[k] for k in keys])
            entries.append((param, local, keys, shape, dtype or source.dtype(keys[0])))
        with EntryFeed(source, [keys for _, _, keys, _, _ in entries]) as feed:
            files = []
            for tp_rank in tp_ranks:
                deferred = Deferred()
                model: dict[str, torch.Tensor] = {}
                for param, local, keys, shape, out_dtype in entries:
                    shard = functools.partial(_shard_chunks, feed, keys, param, plan, tp_rank, out_dtype)
                    tensor = deferred.tensor(shape, out_dtype, shard)
                    model.update((name, tensor) for name in plan.megatron_names(param, local))
                path = iter_dir / rank_dir_name(tp_rank, pp_rank, plan.pp) / RANK_FILE
                path.parent.mkdir(parents=True)
                files.append((rank_state(model, args, iteration), path, deferred))
                count += len(model)
            write_stage(files)
        bar.update(len(tp_ranks))
    bar.close()
    return count


def _shard_chunks(
    feed: EntryFeed, keys: tuple[str, ...], param, plan: ParallelPlan, tp_rank: int, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """Rank ``tp_rank``'s shard of one entry: the rule's dim-0 pieces, cast, ``CHUNK_BYTES`` at a time."""
    for piece in param.rule.pieces(feed.get(keys), plan.dims, plan.tp, tp_rank):
        rows = max(1, CHUNK_BYTES // max(1, math.prod(piece.shape[1:]) * dtype.itemsize))
        for part in piece.split(rows):
            yield part.to(dtype)


FORMAT = MegatronFormat("legacy", is_legacy, lambda root, iter_dir: LegacyCheckpoint(root, iter_dir=iter_dir), write)
