"""Reading DCP data items (``.distcp`` byte ranges) straight into tensor memory.

DCP's ``FileSystemWriter`` and megatron-core's async writer (which calls the same ``_write_item``)
store every tensor item as one complete ``torch.save`` archive at ``_StorageInfo(relative_path,
offset, length)``: a zip whose ``data.pkl`` describes the tensor and whose uncompressed
``data/<key>`` record holds its bytes. A byte item (a ShardedObject) is the raw ``torch.save([obj])``.

``dcp.load`` plans every request, re-reads ``.metadata`` each call, ``torch.load`` s each item into a
fresh storage and then copies it into the destination: on the 2-core VM that was 3 of every 4 seconds
of a torch_dist export (fresh memory costs ~1.3 s/GB there). Here each archive's central directory
and ``data.pkl`` (a few hundred bytes) are parsed with an unpickler that knows only the globals
``torch.save`` of a plain tensor names, and the record is read with ``preadv`` into the destination;
items next to each other in a file are read by one call. An archive holding anything else (a strided
or offset view, a storage type outside the list, another byte order) is loaded with
``torch.load(weights_only=True)``, as DCP does; one that is not a readable archive is one error line.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Sequence

import torch

from bridge.errors import InputError, sanitize

_PARSE_READ_LIMIT = 16 * 2**20  # one read while parsing an archive's directory; real ones are ~1 KiB
_PICKLE_LIMIT = 64 * 2**10  # a plain tensor's data.pkl is ~170 bytes
_IOV_MAX = 1024  # Linux's limit on buffers per preadv
_GAP = 2**20  # neighbouring records closer than this are read by one call, the bytes between discarded
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
# The storage classes torch.save names for plain dense dtypes; others go through torch.load.
_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16,
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ShortStorage": torch.int16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "BoolStorage": torch.bool,
}


class ItemError(InputError, ValueError):
    """A data item is not what its ``.metadata`` entry says; the message names the file and range."""


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """Where a tensor item's bytes lie in its data file (``offset`` is absolute) and what they hold."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Unusual(Exception):
    """The archive holds something other than one plain dense tensor: load it with torch.load."""


class _Window(io.RawIOBase):
    """Read-only, seekable bytes ``[start, start + length)`` of a descriptor, read with ``pread``."""

    def __init__(self, fd: int, start: int, length: int, read_limit: int | None = None):
        super().__init__()
        self.fd, self.start, self.length, self.read_limit, self.pos = fd, start, length, read_limit, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        if base + pos < 0:
            raise OSError(f"seek before the start of a {self.length}-byte item")
        self.pos = base + pos
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self.length - self.pos))
        if self.read_limit is not None and want > self.read_limit:
            raise zipfile.BadZipFile(f"a {want}-byte directory read (expected at most {self.read_limit})")
        done = _preadv_all(self.fd, [view[:want]], self.start + self.pos) if want else 0
        self.pos += done
        return done


@dataclasses.dataclass
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


@dataclasses.dataclass
class _Rebuilt:
    """The arguments of ``torch._utils._rebuild_tensor_v2``, kept instead of building a tensor."""

    storage: object
    storage_offset: object
    size: object
    stride: object
    requires_grad: object = False
    hooks: object = None
    metadata: object = None


class _TensorPickle(pickle.Unpickler):
    """``data.pkl`` of ``torch.save(tensor)``: admits only what a plain dense tensor names."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Rebuilt
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _Unusual(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            raise _Unusual("storage reference")
        return _Storage(pid[1], pid[2], pid[4])


def _record_data(fd: int, window: _Window, info: zipfile.ZipInfo) -> int:
    """Offset of a stored record's bytes within the window (from its local header)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Unusual("compressed record")
    header = bytearray(_LOCAL_HEADER.size)
    window.seek(info.header_offset)
    if window.readinto(header) != len(header):
        raise zipfile.BadZipFile(f"record {info.filename!r} starts past the end")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"record {info.filename!r} has no local header")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > window.length:
        raise zipfile.BadZipFile(f"record {info.filename!r} ends past the item")
    return start


def _read_record(fd: int, window: _Window, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise _Unusual(f"{info.filename} of {info.file_size} bytes")
    start = _record_data(fd, window, info)
    data = bytearray(info.file_size)
    _preadv_all(fd, [memoryview(data)], window.start + start)
    return bytes(data)


def locate_tensor(fd: int, offset: int, length: int, where: str) -> TensorRecord | None:
    """The record of the tensor archived at ``[offset, offset + length)``; None when the archive is
    readable but not one plain dense little-endian tensor (then ``load_tensor`` reads it)."""
    window = _Window(fd, offset, length, read_limit=_PARSE_READ_LIMIT)
    try:
        archive = zipfile.ZipFile(window)
        names = {i.filename: i for i in archive.infolist()}
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise zipfile.BadZipFile("no data.pkl record")
        prefix = pickles[0].removesuffix("data.pkl")
        order = names.get(prefix + "byteorder")
        if sys.byteorder != "little" or (order and _read_record(fd, window, order, 16) != b"little"):
            raise _Unusual("byte order")
        rebuilt = _TensorPickle(io.BytesIO(_read_record(fd, window, names[pickles[0]], _PICKLE_LIMIT))).load()
        if not isinstance(rebuilt, _Rebuilt) or not isinstance(rebuilt.storage, _Storage):
            raise _Unusual("not a tensor")
        shape, stride, storage = rebuilt.size, rebuilt.stride, rebuilt.storage
        if not (
            isinstance(shape, tuple)
            and all(type(d) is int and d >= 0 for d in shape)
            and stride == _contiguous_stride(shape)
            and rebuilt.storage_offset == 0
            and storage.numel == math.prod(shape)
            and not rebuilt.metadata
        ):
            raise _Unusual("a view")
        record = names.get(f"{prefix}data/{storage.key}")
        if record is None or record.file_size != storage.numel * storage.dtype.itemsize:
            raise zipfile.BadZipFile(f"record data/{sanitize(storage.key, 40)} is missing or of the wrong size")
        return TensorRecord(offset + _record_data(fd, window, record), storage.dtype, shape)
    except _Unusual:
        return None
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ItemError(f"{where}: not a torch.save archive of a tensor ({sanitize(str(e), 120)})") from None
    except (KeyError, IndexError, AttributeError, RecursionError, MemoryError) as e:
        raise ItemError(f"{where}: not a torch.save archive of a tensor ({type(e).__name__})") from None


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for d in reversed(shape):
        stride.append(step)
        step *= max(d, 1)
    return tuple(reversed(stride))


def load_tensor(fd: int, offset: int, length: int, where: str) -> torch.Tensor:
    """The tensor archived at ``[offset, offset + length)``, through ``torch.load(weights_only=True)``."""
    try:
        tensor = torch.load(io.BufferedReader(_Window(fd, offset, length)), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ItemError(f"{where}: not a torch.save archive of a tensor ({sanitize(str(e), 120)})") from None
    if not isinstance(tensor, torch.Tensor):
        raise ItemError(f"{where}: holds a {type(tensor).__name__}, expected a tensor")
    return tensor


def read_bytes(fd: int, offset: int, length: int) -> bytes:
    data = bytearray(length)
    _preadv_all(fd, [memoryview(data)], offset)
    return bytes(data)


def read_records(fd: int, reads: Sequence[tuple[int, memoryview]], where: str) -> None:
    """Fills each ``(offset, view)`` from the file, in file order; records less than ``_GAP`` apart are
    read by one ``preadv`` (the bytes between them land in a scratch buffer and are dropped)."""
    pending = sorted((r for r in reads if len(r[1])), key=lambda r: r[0])
    scratch = memoryview(bytearray(_GAP)) if len(pending) > 1 else None
    i = 0
    while i < len(pending):
        start, view = pending[i]
        buffers, end = [view], start + len(view)
        i += 1
        while i < len(pending) and 0 <= pending[i][0] - end < _GAP and len(buffers) < _IOV_MAX - 1:
            gap = pending[i][0] - end
            if gap:
                assert scratch is not None
                buffers.append(scratch[:gap])
            buffers.append(pending[i][1])
            end = pending[i][0] + len(pending[i][1])
            i += 1
        if _preadv_all(fd, buffers, start) != end - start:
            raise ItemError(f"{where}: ends before byte {end}; the file is truncated")


def _preadv_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """``preadv`` until every buffer is full or the file ends; the bytes read."""
    total = 0
    while buffers:
        n = os.preadv(fd, buffers, offset + total)
        if n == 0:
            break
        total += n
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers = buffers[1:]
        if buffers and n:
            buffers[0] = buffers[0][n:]
    return total
