"""Reader/writer for megatron-core ``torch_dist`` iteration directories, on CPU in one process.

An iteration directory holds ``metadata.json`` (backend names), ``common.pt`` (plain
``torch.save`` of everything that is not sharded), and a ``torch.distributed.checkpoint`` (DCP)
checkpoint: ``.metadata`` plus ``__0_*.distcp`` data files. Every tensor is stored once as a
GLOBAL (unsharded) tensor under its final sharded key, so any TP/PP layout can read any slice.
Megatron ``ShardedObject`` s are DCP byte entries ``"{key}/shard_0_1"`` holding ``torch.save([obj])``.

This module knows nothing about model names; it moves flat ``{key: tensor}`` data. It needs no
process group and does not import megatron-core (except to borrow megatron's unpickling
allow-list when a ``common.pt`` names megatron types, see :func:`_safe_load`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
import torch.distributed.checkpoint.planner as dcp_planner
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
)
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystem, _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from bridge.errors import InputError, sanitize
from bridge.plumbing import distributed
from bridge.plumbing.atomic import torch_save, torch_saves_surfaced
from bridge.plumbing.direct_io import DirectFile
from bridge.plumbing.fake import holds_data, torch_save_size
from bridge.plumbing.pipeline import read_ahead
from bridge.plumbing.safe_files import MAX_JSON_BYTES, open_regular, read_text_capped, regular_file
from bridge.plumbing.safe_pickle import safe_torch_load

METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# Suffix megatron gives a ShardedObject with global offset (0,) and shape (1,), e.g. TE _extra_state.
OBJECT_SUFFIX = "/shard_0_1"
COMMON_STATE = "common_state"  # megatron-core >= 0.19: the common state as a ShardedObject, no common.pt


class TorchDistFormatError(InputError, ValueError):
    """The directory is not a readable torch_dist checkpoint; the message names the file at fault."""


def _batches(tensors: Iterable[tuple[str, torch.Tensor]], batch_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    batch: dict[str, torch.Tensor] = {}
    size, seen = 0, set()
    for key, tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{key!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if key in seen:
            raise ValueError(f"key written twice: {key!r}")
        seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if batch and size + nbytes > batch_bytes:
            yield batch
            batch, size = {}, 0
        batch[key] = tensor
        size += nbytes
        del tensor
    if batch:
        yield batch


def write_torch_dist(
    iter_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    common: dict,
    *,
    objects: dict[str, object] | None = None,
    batch_bytes: int = 128 * 2**20,
    order: Sequence[str] = (),
) -> None:
    """Writes ``iter_dir`` (absent or empty) as a torch_dist checkpoint megatron-core can load.

    ``tensors`` are global tensors under their final sharded keys. They are gathered into batches
    of about ``batch_bytes`` (a larger tensor is a batch of its own), each written as one
    ``__{rank}_{n}_0.distcp`` file while the next batch is produced on a second thread, so peak memory
    is about two batches plus one tensor, not the checkpoint. ``objects`` are ShardedObject
    payloads keyed without the ``/shard_0_1`` suffix. ``metadata.json`` is written last, so an
    interrupted write is not mistaken for a checkpoint.

    Streaming works by driving DCP's ``FileSystemWriter`` through its StorageWriter protocol one
    batch at a time and calling ``finish`` once with the merged metadata: ``dcp.save`` must plan
    every entry (shape and dtype) before it writes any, and it may be called only once per
    directory. Files are not fsynced one by one: the caller syncs the finished tree once.

    Under torchrun (``distributed``) every process calls this with its own share of ``tensors`` and
    writes its own files, as DCP's multi-writer save does (file prefix ``__{rank}_``); process 0 also
    writes ``objects``, then gathers every process's index entries and file locations into the one
    ``.metadata`` (DCP's coordinator step), listing the tensors in ``order`` (every key, in the order
    one process would write them) so that the index is the one a single process writes.
    """
    group = distributed.current()
    iter_dir = Path(iter_dir)
    if group.rank == 0 and iter_dir.exists() and any(iter_dir.iterdir()):
        raise FileExistsError(f"{iter_dir}: not empty; a torch_dist checkpoint needs a fresh directory")
    group.exchange()  # no process writes before process 0 has seen the directory empty
    iter_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(iter_dir, sync_files=False)
    writer.fs = _DirectFileSystem()
    writer.set_up_storage_writer(group.rank == 0)
    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    results: list[WriteResult] = []

    def write_part(part: int, state_dict: dict) -> None:
        # flatten_state_dict=False keeps keys verbatim and [obj] as one byte entry, as megatron does.
        planner = DefaultSavePlanner(flatten_state_dict=False)
        planner.set_up_planner(state_dict, is_coordinator=True)
        (plan,), metadata = planner.create_global_plan([writer.prepare_local_plan(planner.create_local_plan())])
        if duplicates := entries.keys() & metadata.state_dict_metadata.keys():
            raise ValueError(f"{iter_dir}: key written twice: {sorted(duplicates)[0]!r}")
        entries.update(metadata.state_dict_metadata)
        plan = dataclasses.replace(planner.finish_plan(plan), storage_data=_StoragePrefix(f"__{group.rank}_{part}_"))
        # A full disk: the OSError, not torch's RuntimeError about zip positions; DCP torch.saves each
        # tensor into the file.
        if all(holds_data(t) for t in state_dict.values() if isinstance(t, torch.Tensor)):
            with torch_saves_surfaced():
                results.extend(writer.write_data(plan, planner).value())
        else:
            results.extend(_sized_write(iter_dir, plan, planner))

    if objects and group.rank == 0:
        write_part(0, {key + OBJECT_SUFFIX: [obj] for key, obj in objects.items()})
    part = 0
    for batch in read_ahead(_batches(tensors, batch_bytes)):
        part += 1
        write_part(part, batch)
        del batch  # release it before the next one is taken
    shares = group.exchange((entries, results))
    if group.rank != 0:
        return
    merged: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for theirs, _ in shares:
        if duplicates := merged.keys() & theirs.keys():
            raise ValueError(f"{iter_dir}: key written twice: {sorted(duplicates)[0]!r}")
        merged.update(theirs)
    position = {key: i for i, key in enumerate(order)}  # objects (not in it) first, as written
    merged = dict(sorted(merged.items(), key=lambda item: position.get(item[0], -1)))
    writer.finish(Metadata(merged), [located for _, located in shares])
    torch_save(common, iter_dir / "common.pt")
    (iter_dir / "metadata.json").write_text(json.dumps(METADATA_JSON))


def _sized_write(iter_dir: Path, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
    """What ``FileSystemWriter.write_data`` records for a plan of fake tensors (a dry run): one file, byte
    entries first, then tensors, each as long as its ``torch.save`` payload; the file is a hole of that
    size. DCP's stream wrapper cannot seek, so its own writer cannot leave the bytes out."""
    name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
    items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)  # stable: plan order kept
    results, offset = [], 0
    for item in items:
        data = planner.resolve_data(item)
        length = len(data.getbuffer()) if isinstance(data, io.BytesIO) else torch_save_size(data)
        results.append(
            WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length))
        )
        offset += length
    with open(iter_dir / name, "wb") as f:
        f.truncate(offset)
    return results


class _Writer(FileSystemWriter):
    """Records the iteration folder's name as the checkpoint id, not the absolute path it was written
    to: that path is the hidden partial (gone after the rename), it leaks a local path into a
    published checkpoint, and a dry run sizing ``.metadata`` in a scratch folder must record the same."""

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=Path(self.path).name, save_id=self.save_id)


class _DirectFileSystem(FileSystem):
    """DCP's file system with data files written around the page cache (see ``direct_io``)."""

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with DirectFile(path) as stream:
            yield stream


class TorchDistReader:
    """Random access to one torch_dist iteration directory: metadata up front, tensors on request."""

    def __init__(self, iter_dir: Path):
        self.iter_dir = Path(iter_dir)
        config = self.iter_dir / "metadata.json"
        if not os.path.lexists(config):
            raise TorchDistFormatError(f"{config}: missing; not a torch_dist checkpoint directory")
        try:
            backend = json.loads(read_text_capped(config, MAX_JSON_BYTES)).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as e:
            raise TorchDistFormatError(f"{config}: unreadable ({sanitize(str(e), 120)})") from None
        if backend != "torch_dist":
            raise TorchDistFormatError(f"{config}: sharded_backend is {backend!r}; only 'torch_dist' is supported")
        try:
            metadata = _SafeFileSystemReader(self.iter_dir).read_metadata()
        except FileNotFoundError:
            raise TorchDistFormatError(f"{self.iter_dir / '.metadata'}: missing; the DCP index is required") from None
        except TorchDistFormatError:
            raise
        except _RefusedGlobal as e:
            raise TorchDistFormatError(
                f"{self.iter_dir / '.metadata'}: refused to load: pickle contains disallowed "
                f"global {e} (only DCP metadata types allowed)"
            ) from None
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
            raise TorchDistFormatError(f"{self.iter_dir / '.metadata'}: unreadable ({sanitize(str(e), 120)})") from None
        self._tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._objects = {
            k.removesuffix(OBJECT_SUFFIX): k
            for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata)
        }
        self.common: dict = self._common_state()

    def _common_state(self) -> dict:
        """``common.pt`` (megatron-core < 0.19, and read first by 0.19 too when present), else the
        ``common_state`` object megatron-core >= 0.19 keeps inside the shards."""
        path = self.iter_dir / "common.pt"
        if os.path.lexists(path) or COMMON_STATE not in self._objects:
            if os.path.lexists(path):
                regular_file(path)  # a FIFO would block torch.load
            common, where = _safe_load(path, str(path)), str(path)
        else:
            common, where = self.load_object(COMMON_STATE), f"{self.iter_dir}: object {COMMON_STATE!r}"
        if not isinstance(common, dict):
            raise TorchDistFormatError(f"{where}: expected a dict, found {type(common).__name__}")
        return common

    def keys(self) -> list[str]:
        """Tensor keys, in the order they were written."""
        return list(self._tensors)

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].properties.dtype

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Full global tensors for ``keys`` only: DCP reads just their byte ranges, so memory is
        those tensors plus one transient copy of the one being decoded."""
        missing = [k for k in keys if k not in self._tensors]
        if missing:
            raise KeyError(f"{self.iter_dir}: no tensor {missing[0]!r}")
        return self._read({k: torch.empty(self.shape(k), dtype=self.dtype(k)) for k in keys})

    def object_keys(self) -> list[str]:
        """ShardedObject keys; the usual ``/shard_0_1`` suffix is dropped, other shard names stay. The
        common state is ``common``, not one of these."""
        return [k for k in self._objects if k != COMMON_STATE]

    def load_object(self, key: str) -> object:
        """The object megatron stored for ``key`` (unwrapped from its ``[obj]`` payload)."""
        if key not in self._objects:
            raise KeyError(f"{self.iter_dir}: no object {key!r}")
        dcp_key = self._objects[key]
        payload = self._read({dcp_key: None})[dcp_key]
        if not (isinstance(payload, list) and len(payload) == 1):
            raise TorchDistFormatError(f"{self.iter_dir}: object {dcp_key!r} is not a ShardedObject payload [obj]")
        return payload[0]

    def _read(self, state_dict: dict) -> dict:
        try:
            with warnings.catch_warnings():  # no_dist=True always warns "assuming ... a single process"
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(
                    state_dict,
                    storage_reader=_SafeFileSystemReader(self.iter_dir),
                    planner=_SafeLoadPlanner(str(self.iter_dir)),
                    no_dist=True,
                )
        except CheckpointException as e:  # a BaseException: would slip past `except Exception`
            raise TorchDistFormatError(
                f"{self.iter_dir}: reading {sorted(state_dict)[:3]} failed: {_first_failure(e)}"
            ) from None
        return state_dict


class _RefusedGlobal(pickle.UnpicklingError):
    """A ``.metadata`` pickle names a global outside ``_METADATA_GLOBALS``; the message is its name."""


def _plain_types(module) -> set[tuple[str, str]]:
    """The dataclasses and enums a module defines: unpickling them sets fields, it runs no code."""
    return {
        (module.__name__, n)
        for n, v in vars(module).items()
        if isinstance(v, type)
        and v.__module__ == module.__name__
        and (dataclasses.is_dataclass(v) or issubclass(v, enum.Enum))
    }


# What a DCP ``.metadata`` pickle may name: torch's metadata and save-plan dataclasses (megatron-core
# stores its SavePlan there), torch.Size / dtypes / layouts, and StorageMeta.checkpoint_id's PosixPath.
_METADATA_GLOBALS = {
    *_plain_types(dcp_metadata),
    *_plain_types(dcp_planner),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


class _SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader unpickles ``.metadata`` with plain ``pickle.load``: a crafted file would
    run code just by being opened. This one admits only the metadata types (``_METADATA_GLOBALS``)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        if not os.path.lexists(path):
            raise FileNotFoundError(str(path))
        with open_regular(path) as f:  # a FIFO is refused, not waited on
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"expected DCP Metadata, found {type(metadata).__name__}")
        self._check_storage_paths(path, metadata)
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata

    def _check_storage_paths(self, where: Path, metadata: Metadata) -> None:
        """Every data file the index names is a plain relative path (no ``..``, not absolute) to a
        regular file inside the checkpoint directory: a crafted ``.metadata`` must not make the reader
        open ``../../elsewhere.distcp`` or a FIFO."""
        storage = metadata.storage_data
        if storage is None:
            return
        if not isinstance(storage, dict):
            raise TorchDistFormatError(f"{where}: storage_data is a {type(storage).__name__}; expected a dict")
        root = Path(self.path)
        real_root = root.resolve()
        checked: set[str] = set()
        for info in storage.values():
            rel = getattr(info, "relative_path", None)
            if rel in checked:
                continue
            if not isinstance(rel, str) or not _plain_relative(rel):
                raise TorchDistFormatError(
                    f"{where}: data file path {sanitize(repr(rel), 80)} is outside the checkpoint directory "
                    "(expected a relative path inside it)"
                )
            target = root / rel
            real = target.resolve()
            if real_root not in real.parents:
                raise TorchDistFormatError(
                    f"{where}: data file {sanitize(rel, 80)} resolves to {sanitize(str(real), 120)}, outside the "
                    "checkpoint directory"
                )
            if not os.path.lexists(target):
                raise TorchDistFormatError(f"{target}: missing; {where.name} names it as a data file")
            regular_file(target)
            checked.add(rel)


def _first_failure(e: CheckpointException) -> str:
    """The first rank's error, one short line: the exception's own text carries every traceback."""
    failures = list(getattr(e, "failures", {}).values())
    if not failures:
        return sanitize(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 160)
    first = failures[0]  # DCP keeps (exception, stack summary) per rank
    exc = first[0] if isinstance(first, tuple) and first else getattr(first, "exception", first)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {sanitize(lines[0], 160)}" if lines else type(exc).__name__


def _plain_relative(rel: str) -> bool:
    pure = PurePosixPath(rel)
    return rel not in ("", ".") and not pure.is_absolute() and ".." not in pure.parts and "\\" not in rel


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP unpickles byte entries with ``weights_only=False``; these go through the allow-list instead."""

    def __init__(self, where: str):
        super().__init__(flatten_state_dict=False)
        self.where = where

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn  # flat keys: the caller's dict, not the planner's copy
        self.original_state_dict[fqn] = _safe_load(value, f"{self.where}: object {fqn!r}")


def _safe_load(src: Path | io.BytesIO, name: str) -> object:
    return safe_torch_load(src, name, error=TorchDistFormatError)
