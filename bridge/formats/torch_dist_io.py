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
import math
import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
import torch.distributed.checkpoint.planner as dcp_planner
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystem, _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from bridge.errors import InputError, UnsupportedError, sanitize
from bridge.formats.distcp_items import TensorRecord, load_tensor, locate_tensor, read_bytes, read_records
from bridge.plumbing import distributed, page_cache
from bridge.plumbing.atomic import torch_save, torch_saves_surfaced
from bridge.plumbing.direct_io import DirectFile
from bridge.plumbing.fake import holds_data, torch_save_size
from bridge.plumbing.pipeline import read_ahead
from bridge.plumbing.recycled import RecycledMemory
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
    """Random access to one torch_dist iteration directory: metadata up front, tensors on request.

    Tensors are read straight from the data files into their destination (``distcp_items``): no DCP
    planner, each requested item's bytes read once, neighbours in a file by one call."""

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
        metadata = _read_metadata(self.iter_dir)
        self._storage = _storage_index(self.iter_dir / ".metadata", metadata)
        self._tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._objects = {
            k.removesuffix(OBJECT_SUFFIX): k
            for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata)
        }
        self._records: dict[tuple[str, int], TensorRecord | None] = {}
        self._memory = RecycledMemory()  # the next layer is read into the pages of the ones dropped
        self._chunk_lists: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
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
        """Full global tensors for ``keys`` only, read from the data files into memory of their own (reused
        once every tensor and view of it is gone)."""
        self._check_known(keys)
        out = {k: self._memory.empty(self.shape(k), self.dtype(k)) for k in keys}
        self._fill(list(out.items()))
        return out

    def load_stacked(self, keys: Sequence[str]) -> torch.Tensor:
        """``keys`` (same dtype and trailing dims) concatenated on dim 0, each read into its rows of one
        tensor: what ``torch.cat(load(keys))`` gives without the second copy (Mamba's stored blocks)."""
        self._check_known(keys)
        first = self.shape(keys[0])
        if any(
            len(self.shape(k)) == 0 or self.shape(k)[1:] != first[1:] or self.dtype(k) != self.dtype(keys[0])
            for k in keys
        ):
            raise TorchDistFormatError(f"{self.iter_dir}: {list(keys)} do not stack on dim 0")
        rows = [self.shape(k)[0] for k in keys]
        out = self._memory.empty((sum(rows), *first[1:]), self.dtype(keys[0]))
        self._fill(list(zip(keys, out.split(rows), strict=True)))
        return out

    def _check_known(self, keys: Sequence[str]) -> None:
        """Every key exists and its chunks tile it, before any memory is taken for it."""
        missing = [k for k in keys if k not in self._tensors]
        if missing:
            raise KeyError(f"{self.iter_dir}: no tensor {missing[0]!r}")
        for key in keys:
            if key not in self._chunk_lists:
                where = f"{self.iter_dir / '.metadata'}: {key!r}"
                self._chunk_lists[key] = _chunks(where, self._tensors[key])

    def object_keys(self) -> list[str]:
        """ShardedObject keys; the usual ``/shard_0_1`` suffix is dropped, other shard names stay. The
        common state is ``common``, not one of these."""
        return [k for k in self._objects if k != COMMON_STATE]

    def load_object(self, key: str) -> object:
        """The object megatron stored for ``key`` (unwrapped from its ``[obj]`` payload)."""
        if key not in self._objects:
            raise KeyError(f"{self.iter_dir}: no object {key!r}")
        dcp_key = self._objects[key]
        info = self._item(dcp_key, None)
        with _DataFiles(self.iter_dir) as files:
            where = files.where(info)
            payload = _safe_load(io.BytesIO(read_bytes(files.fd(info), info.offset, info.length)), where)
        if not (isinstance(payload, list) and len(payload) == 1):
            raise TorchDistFormatError(f"{self.iter_dir}: object {dcp_key!r} is not a ShardedObject payload [obj]")
        return payload[0]

    def _item(self, key: str, offsets: tuple[int, ...] | None) -> _StorageInfo:
        info = self._storage.get((key, offsets))
        if info is None:
            raise TorchDistFormatError(
                f"{self.iter_dir / '.metadata'}: no data item for {key!r}" + (f" at {list(offsets)}" if offsets else "")
            )
        if info.transform_descriptors:
            raise UnsupportedError(
                f"{self.iter_dir / '.metadata'}: {key!r} is stored through DCP transforms "
                f"{sanitize(repr(list(info.transform_descriptors)), 80)}; only plain items can be read"
            )
        return info

    def _fill(self, targets: list[tuple[str, torch.Tensor]]) -> None:
        """Reads every chunk of each ``(key, destination)``, file by file in file order. The kernel is
        asked for all the items' bytes first (``WILLNEED``), so the small reads of each archive's
        directory at its end do not stall the disk one by one. A chunk whose place in the destination
        is not contiguous (a TP fragment split on dim >= 1) is read whole and copied in."""
        chunks = [
            (key, out, sizes, _narrow(out, offsets, sizes), self._item(key, offsets))
            for key, out in targets
            for offsets, sizes in self._chunk_lists[key]
        ]
        reads: dict[str, list[tuple[int, memoryview]]] = {}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        with _DataFiles(self.iter_dir) as files:
            for *_, info in chunks:
                files.prefetch(info)
            for key, out, sizes, dest, info in chunks:
                where = files.where(info)
                record = self._record(files, info, where)
                if record is None:  # not a plain tensor archive: torch.load it, as DCP does
                    loaded = load_tensor(files.fd(info), info.offset, info.length, where)
                    _check_chunk(where, key, loaded.dtype, tuple(loaded.shape), out.dtype, sizes)
                    dest.copy_(loaded)
                    continue
                _check_chunk(where, key, record.dtype, record.shape, out.dtype, sizes)
                target = dest if dest.is_contiguous() else torch.empty(sizes, dtype=out.dtype)
                if target is not dest:
                    copies.append((target, dest))
                reads.setdefault(info.relative_path, []).append((record.offset, _byte_view(target)))
            for rel, wanted in reads.items():
                read_records(files.fd_of(rel), wanted, str(self.iter_dir / rel))
            for *_, info in chunks:  # read once: their pages are better spent on the next items
                page_cache.forget(files.fd(info), info.offset, info.length)
        for loaded, dest in copies:
            dest.copy_(loaded)

    def _record(self, files: _DataFiles, info: _StorageInfo, where: str) -> TensorRecord | None:
        key = (info.relative_path, info.offset)
        if key not in self._records:
            self._records[key] = locate_tensor(files.fd(info), info.offset, info.length, where)
        return self._records[key]


def _narrow(t: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    for dim, (start, size) in enumerate(zip(offsets, sizes, strict=True)):
        t = t.narrow(dim, start, size)
    return t


def _byte_view(t: torch.Tensor) -> memoryview:
    """The writable bytes of contiguous ``t``, for ``preadv``."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def _check_chunk(where: str, key: str, dtype: torch.dtype, shape: tuple, want_dtype: torch.dtype, sizes) -> None:
    if dtype != want_dtype or tuple(shape) != tuple(sizes):
        raise TorchDistFormatError(
            f"{where}: holds {dtype} {list(shape)} for {key!r}; .metadata says {want_dtype} {list(sizes)}"
        )


_MAX_CHUNKS = 1024  # megatron writes one chunk per TP (x EP) fragment; the overlap check is quadratic


def _chunks(where: str, meta: TensorStorageMetadata) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(offsets, sizes)`` of the stored chunks of one tensor, checked to tile its shape exactly: a gap
    would leave uninitialised memory in the result, an overlap reads bytes twice."""
    try:
        shape = tuple(meta.size)
        chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks]
    except (TypeError, AttributeError):
        raise TorchDistFormatError(f"{where}: malformed chunk list") from None
    if len(chunks) > _MAX_CHUNKS:
        raise TorchDistFormatError(f"{where}: {len(chunks)} chunks (expected at most {_MAX_CHUNKS})")
    for offsets, sizes in chunks:
        if not _inside(offsets, sizes, shape):
            raise TorchDistFormatError(f"{where}: chunk {list(offsets)} + {list(sizes)} is outside {list(shape)}")
    covered = sum(math.prod(s) for _, s in chunks)
    if covered != math.prod(shape):
        raise TorchDistFormatError(f"{where}: chunks cover {covered} of {math.prod(shape)} elements")
    boxes = [c for c in chunks if math.prod(c[1])]
    for i, (a_off, a_size) in enumerate(boxes):
        for b_off, b_size in boxes[i + 1 :]:
            if all(
                ao < bo + bs and bo < ao + asz for ao, asz, bo, bs in zip(a_off, a_size, b_off, b_size, strict=True)
            ):
                raise TorchDistFormatError(f"{where}: chunks at {list(a_off)} and {list(b_off)} overlap")
    return chunks


def _inside(offsets: tuple, sizes: tuple, shape: tuple) -> bool:
    return len(offsets) == len(sizes) == len(shape) and all(
        type(o) is int and type(s) is int and 0 <= o and 0 <= s and o + s <= d
        for o, s, d in zip(offsets, sizes, shape, strict=True)
    )


class _DataFiles:
    """The ``.distcp`` files one request reads, each opened once (regular files only) and closed after;
    every item's byte range is checked to lie inside its file."""

    def __init__(self, iter_dir: Path):
        self.iter_dir = iter_dir
        self._open: dict[str, tuple[int, int]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _DataFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def fd_of(self, rel: str) -> int:
        if rel not in self._open:
            f = self._stack.enter_context(open_regular(self.iter_dir / rel))
            self._open[rel] = (f.fileno(), os.fstat(f.fileno()).st_size)
        return self._open[rel][0]

    def fd(self, info: _StorageInfo) -> int:
        fd = self.fd_of(info.relative_path)
        size = self._open[info.relative_path][1]
        if info.offset + info.length > size:
            raise TorchDistFormatError(
                f"{self.where(info)}: past the end of the {size}-byte file (.metadata and data files disagree)"
            )
        return fd

    def prefetch(self, info: _StorageInfo) -> None:
        """Starts reading the item's bytes into the page cache without waiting for them."""
        page_cache.prefetch(self.fd(info), info.offset, info.length)

    def where(self, info: _StorageInfo) -> str:
        return f"{self.iter_dir / info.relative_path} (bytes {info.offset}..{info.offset + info.length})"


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


def _read_metadata(iter_dir: Path) -> Metadata:
    """The DCP index, unpickled through ``_METADATA_GLOBALS`` only: torch's own reader uses plain
    ``pickle.load``, so a crafted file would run code just by being opened."""
    path = iter_dir / ".metadata"
    if not os.path.lexists(path):
        raise TorchDistFormatError(f"{path}: missing; the DCP index is required")
    try:
        with open_regular(path) as f:  # a FIFO is refused, not waited on
            metadata = _MetadataUnpickler(f).load()
    except TorchDistFormatError:
        raise
    except _RefusedGlobal as e:
        raise TorchDistFormatError(
            f"{path}: refused to load: pickle contains disallowed global {e} (only DCP metadata types allowed)"
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as e:
        raise TorchDistFormatError(f"{path}: unreadable ({sanitize(str(e), 120)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise TorchDistFormatError(f"{path}: unreadable (expected DCP Metadata, found {type(metadata).__name__})")
    return metadata


def _storage_index(where: Path, metadata: Metadata) -> dict[tuple[str, tuple[int, ...] | None], _StorageInfo]:
    """``(key, chunk offsets or None)`` -> where the item lies, each data file a plain relative path
    (no ``..``, not absolute) to a regular file inside the checkpoint directory: a crafted
    ``.metadata`` must not make the reader open ``../../elsewhere.distcp`` or a FIFO."""
    storage = metadata.storage_data
    if storage is None:
        return {}
    if not isinstance(storage, dict):
        raise TorchDistFormatError(f"{where}: storage_data is a {type(storage).__name__}; expected a dict")
    root = where.parent
    real_root = root.resolve()
    checked: set[str] = set()
    index: dict[tuple[str, tuple[int, ...] | None], _StorageInfo] = {}
    for item, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if rel not in checked:
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
        if not (
            isinstance(item, MetadataIndex)
            and isinstance(item.fqn, str)
            and (item.offset is None or isinstance(item.offset, tuple))
            and isinstance(info, _StorageInfo)
            and type(info.offset) is int
            and type(info.length) is int
            and info.offset >= 0
            and info.length >= 0
        ):
            raise TorchDistFormatError(f"{where}: storage entry {sanitize(repr(item), 80)} is malformed")
        offsets = None if item.offset is None else tuple(item.offset)
        index[(item.fqn, offsets)] = info
    return index


def _plain_relative(rel: str) -> bool:
    pure = PurePosixPath(rel)
    return rel not in ("", ".") and not pure.is_absolute() and ".." not in pure.parts and "\\" not in rel


def _safe_load(src: Path | io.BytesIO, name: str) -> object:
    return safe_torch_load(src, name, error=TorchDistFormatError)
