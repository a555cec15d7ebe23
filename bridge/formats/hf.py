"""Hugging Face safetensors checkpoints: a lazy, strict reader and a shard-by-shard writer.

Reading opens every shard with ``safe_open`` and loads one tensor at a time; the index is
checked against the shard headers before any tensor is read. Writing plans the shard split
with huggingface_hub on meta tensors, then materialises one shard at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from huggingface_hub import constants
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open

from bridge.engine.config import load_hf_config
from bridge.engine.layout import check_hf_sizes
from bridge.errors import InputError
from bridge.plumbing import distributed
from bridge.plumbing.direct_io import DirectFile
from bridge.plumbing.fake import holds_data, write_tensor
from bridge.plumbing.page_cache import ReadOnce
from bridge.plumbing.pipeline import read_ahead
from bridge.plumbing.safe_files import (
    MAX_JSON_BYTES,
    carried_file,
    copy_regular,
    folder_files,
    open_regular,
    read_text_capped,
    regular_file,
)

INDEX = "model.safetensors.index.json"
_UMASK = os.umask(0o022)  # read once: written files get the mode the user's umask asks for
os.umask(_UMASK)
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")
NOT_ASSETS = {"config.json", "README.md", ".gitattributes"}
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header
_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: the count costs at most 16 MiB of booleans
_log = logging.getLogger(__name__)


class HFCheckpoint:
    """A Falcon-H1 HF folder: its config, and lazy access to its tensors by key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: not a directory")
        if not any(self.folder.iterdir()):
            raise InputError(f"{self.folder}: empty directory; expected an HF Falcon-H1 folder")
        self.config = load_hf_config(self.folder)
        self._handles: dict[str, object] = {}
        self._ranges: dict[str, tuple[BinaryIO, dict[str, tuple[int, int]]]] = {}
        self._read_once = ReadOnce()  # each tensor is read once: out of the page cache after
        self.key_to_file = self._read_layout()
        # Sizes against the headers before any caller expands the config per layer: a 1 KB config.json
        # naming ten million layers is refused here, not after building ten million expected shapes.
        check_hf_sizes(str(self.folder / "config.json"), self.config, {k: self.shape(k) for k in self.key_to_file})

    def _open(self, filename: str):
        if filename not in self._handles:
            path = regular_file(self.folder / filename)
            try:
                self._handles[filename] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[filename]

    def _read_layout(self) -> dict[str, str]:
        index_path = self.folder / INDEX
        if os.path.lexists(index_path):  # a FIFO or dangling link is refused, not skipped
            return self._read_index(index_path)
        if os.path.lexists(self.folder / SINGLE):
            return {k: SINGLE for k in self._open(SINGLE).keys()}
        raise InputError(f"{self.folder}: no {SINGLE} or {INDEX}; expected safetensors weights")

    def _read_index(self, index_path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(read_text_capped(index_path, MAX_JSON_BYTES))["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise InputError(f"{index_path}: invalid index; expected JSON with a 'weight_map' object") from None
        for name in weight_map.values():  # plain file names only: no '../', no absolute or nested paths
            if not isinstance(name, str) or name in ("", "..") or Path(name).name != name:
                raise InputError(
                    f"{index_path}: shard path {name!r} is outside the checkpoint folder (expected a file name in it)"
                )
        files = sorted(set(weight_map.values()))
        for name in files:
            # A shard may be a symlink to anywhere: Hub cache snapshots link every file into ../../blobs.
            path = self.folder / name
            if not path.is_file():
                raise InputError(f"{index_path}: names shard {name!r}, which does not exist")
        seen: dict[str, str] = {}
        for name in files:
            for key in self._open(name).keys():
                if key in seen:
                    raise InputError(f"{self.folder / name}: tensor {key!r} is also stored in {seen[key]}")
                seen[key] = name
        for key, name in weight_map.items():
            if seen.get(key) != name:
                raise InputError(f"{index_path}: {key!r} is mapped to {name!r} but that shard does not hold it")
        extra = sorted(set(seen) - set(weight_map))
        if extra:
            raise InputError(f"{self.folder / seen[extra[0]]}: tensor {extra[0]!r} is not listed in {INDEX}")
        return dict(weight_map)

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._open(self.key_to_file[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self._open(self.key_to_file[key]).get_slice(key).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise InputError(
                f"{self.folder / self.key_to_file[key]}: {key} has safetensors dtype {code[:16]!r}, "
                f"which torch cannot hold here; expected one of {', '.join(_SAFETENSORS_DTYPES)}"
            )
        return _SAFETENSORS_DTYPES[code]

    def get(self, key: str) -> torch.Tensor:
        """Reads one tensor through a fresh handle: a long-lived handle's mapping keeps every page it
        touched resident, so RSS would grow to the size of the model."""
        filename = self.key_to_file.get(key)
        if filename is None:
            raise InputError(f"{self.folder}: tensor {key!r} missing")
        path = self.folder / filename
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"{path}: cannot read {key!r} ({e})") from None
        file, ranges = self._data_ranges(filename)
        if key in ranges:
            self._read_once.handed_out(file.fileno(), *ranges[key])
        return tensor

    def release(self) -> None:
        """Reading is over: every tensor read so far leaves the page cache (``page_cache.ReadOnce``)."""
        self._read_once.finish()

    def _data_ranges(self, filename: str) -> tuple[BinaryIO, dict[str, tuple[int, int]]]:
        """Where each tensor's bytes lie in a shard, ``(offset, length)``, for the page cache's sake
        (``page_cache``): safetensors reads them, but does not say where they are. Its own checks
        passed on this header already; a header that says nothing usable gives no ranges."""
        if filename not in self._ranges:
            file = open_regular(self.folder / filename)
            ranges: dict[str, tuple[int, int]] = {}
            try:
                (size,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(min(size, _MAX_HEADER)))
                for key, entry in header.items():
                    if isinstance(entry, dict) and "data_offsets" in entry:
                        begin, end = (int(x) for x in entry["data_offsets"])
                        ranges[key] = (8 + size + begin, end - begin)
            except (struct.error, ValueError, TypeError):
                ranges = {}
            self._ranges[filename] = (file, ranges)
        return self._ranges[filename]

    def asset_files(self) -> list[Path]:
        """Tokenizer, generation config and other non-weight files to carry along: regular files inside
        the folder (or its Hub cache ``blobs/``); a special file or a symlink out is refused."""
        return folder_files(self.folder, lambda p: p.name not in NOT_ASSETS and not p.name.endswith(WEIGHT_SUFFIXES))

    def card_files(self) -> list[Path]:
        """The model card, kept beside a Megatron conversion so the way back can carry its front matter."""
        card = self.folder / "README.md"
        return [carried_file(card, self.folder)] if os.path.lexists(card) else []


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "I16": torch.int16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def copy_assets(files: Iterable[Path], dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for f in files:
        copy_regular(f, dst / f.name)
        names.append(f.name)
    return names


_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def _write_safetensors(
    path: Path, keys: list[str], layout: Mapping, tensors: Mapping[str, torch.Tensor], counts: NonFiniteCount
) -> None:
    """Streams one safetensors file: the header is known from ``layout``, then each tensor is fetched,
    written and dropped (at most two are alive: one written, one being built). safetensors'
    ``save_file`` needs the whole file's tensors in memory at once."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        shape, dtype = layout[key]
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def produced():
        for key in keys:
            t = tensors[key]
            if tuple(t.shape) != tuple(layout[key][0]) or t.dtype != layout[key][1]:
                raise ValueError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {tuple(layout[key][0])}")
            yield counts.check(key, t.contiguous())
            del t

    with DirectFile(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in read_ahead(produced()):  # the next tensor is built while this one is written
            write_tensor(f, t)
            del t


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN and ±Inf elements of ``t`` (0 for integer tensors). NaN and Inf propagate through a sum, so
    one vectorised sum (~3 GB/s) clears the usual all-finite tensor; only a non-finite sum (or one that
    overflowed) pays for the exact count, in bounded chunks. A dry run's fake tensors have none."""
    if not (t.is_floating_point() and holds_data(t)) or bool(torch.isfinite(t.sum())):
        return 0
    return sum(int(torch.count_nonzero(~torch.isfinite(c))) for c in t.reshape(-1).split(_FINITE_CHUNK))


class NonFiniteCount:
    """NaN/Inf values per tensor, counted once per key while converting and reported as one warning.
    They are written as they are: a diverged run's checkpoint is still worth converting and inspecting."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def check(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if key not in self.counts:
            self.counts[key] = count_nonfinite(t)
        return t

    def warn(self) -> None:
        bad = [k for k, n in self.counts.items() if n]
        if bad:
            _log.warning(
                "warning: %d non-finite values (NaN/Inf) in %d tensor(s), first %r; converted as they are",
                sum(self.counts[k] for k in bad),
                len(bad),
                bad[0],
            )


class CheckedSource:
    """A converter source (``get(hf_key)``) whose tensors are counted by a ``NonFiniteCount``."""

    def __init__(self, source, counts: NonFiniteCount):
        self.source, self.counts = source, counts

    def get(self, key: str) -> torch.Tensor:
        return self.counts.check(key, self.source.get(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(key)


class LazyTensors(Mapping):
    """A shard's tensors computed on access, so the writer holds one at a time."""

    def __init__(self, keys: list[str], fetch: Callable[[str], torch.Tensor]):
        self._keys, self._fetch = keys, fetch

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._fetch(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def write_hf_weights(
    folder: Path,
    layout: Mapping[str, tuple[torch.Size, torch.dtype]],
    produce: Callable[[list[str]], Mapping[str, torch.Tensor]],
    max_shard_size: str | int = "5GB",
    progress: Callable[[int], object] | None = None,
) -> int:
    """Writes ``layout`` as safetensors shards (+ index). ``produce(keys)`` gives one shard's tensors;
    return a ``LazyTensors`` to keep only one tensor in memory. Under torchrun each process writes its
    share of the shards and process 0 the index (``distributed``). Returns how many tensors this
    process wrote."""
    # huggingface_hub's torch splitter, sized from the layout: its own size probe imports
    # torch.distributed.tensor (and sympy, ~0.5 s) to rule out DTensors, which a layout never holds.
    split = split_state_dict_into_shards_factory(
        dict(layout),
        get_storage_size=lambda spec: math.prod(spec[0]) * spec[1].itemsize,
        filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=max_shard_size,
    )
    counts = NonFiniteCount()
    group = distributed.current()
    mine = group.share(list(split.filename_to_tensors.items()))
    for filename, keys in mine:
        path = folder / filename
        _write_safetensors(path, keys, layout, produce(keys), counts)
        path.chmod(0o666 & ~_UMASK)
        if progress:
            progress(len(keys))
    if split.is_sharded and group.rank == 0:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    counts.warn()
    return sum(len(keys) for _, keys in mine)
