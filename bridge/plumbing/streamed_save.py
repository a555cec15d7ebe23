"""``torch.save`` of a state whose tensors are produced while the file is written, so a rank file is
never in memory whole.

The state holds placeholders (``Deferred.tensor``): plain CPU tensors of the right shape and dtype
over untouched read-only anonymous pages, which cost no memory. Under
``torch.serialization.skip_data`` (torch's own way to write a checkpoint's structure before its
bytes) torch.save pickles them as it would any tensor, then steps over each storage's bytes with
``seek(nbytes, SEEK_CUR)`` instead of reading and writing them. That first pass is recorded: the
file is its records' bytes (the pickle, headers, the zip directory: kilobytes) with one gap per
storage. The file is then written front to back, each gap filled from its placeholder's chunks, a
chunk at a time. The pickle, the records and their order, alignment, the trailing records and the
zip directory all stay torch.save's own, so the file is byte for byte what torch.save writes for the
same state with CRC32 off (``torch_saves_surfaced``, as for every torch.save here).

Several files are written side by side (``stream_save_all``): the first storage of each, then the
second of each, and so on. Tensor-parallel rank files of one stage hold the same entries in the same
order, so their sources' tensors are read once for all of them instead of once per file.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import pickle
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, cast

import torch
from torch.serialization import skip_data

from bridge.plumbing.atomic import torch_saves_surfaced
from bridge.plumbing.direct_io import DirectFile
from bridge.plumbing.fake import write_tensor

Chunks = Callable[[], Iterable[torch.Tensor]]
_BUFFERS = 32 * 2**20  # output buffer memory of one or more files written side by side
_MIN_BUFFER = 8 * 2**20  # but at least this per file, so that each write stays large


def _placeholder(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` whose storage is exactly its bytes, on pages nothing touches
    (read-only anonymous memory is neither resident nor committed until read, and it never is)."""
    nbytes = shape.numel() * dtype.itemsize
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, prot=mmap.PROT_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": never written, nor read
        flat = torch.frombuffer(pages, dtype=torch.uint8)
    return flat.view(dtype).view(shape)


class Deferred:
    """The placeholders of one file and, for each, what produces its data: ``chunks()`` yields tensors
    of its dtype whose elements, in row-major order, are the tensor's (each made contiguous as written).
    It is called once, when torch.save reaches the storage; never for an empty tensor."""

    def __init__(self) -> None:
        self._chunks: dict[int, tuple[torch.Tensor, Chunks]] = {}

    def tensor(self, shape: torch.Size, dtype: torch.dtype, chunks: Chunks) -> torch.Tensor:
        """A placeholder to put in the state; store it under several names to share one storage."""
        placeholder = _placeholder(torch.Size(shape), dtype)
        self._chunks[id(placeholder)] = (placeholder, chunks)
        return placeholder

    def _storage_order(self, obj: object) -> list[tuple[torch.Tensor, Chunks]]:
        """Non-empty placeholders in the order torch.save writes their storages (first use in the pickle,
        each once). Any other tensor or storage in ``obj`` is refused: skip_data would leave its bytes out."""
        order: dict[int, tuple[torch.Tensor, Chunks]] = {}
        known = self._chunks

        class Walk(pickle.Pickler):
            def persistent_id(self, o):
                if isinstance(o, torch.Tensor):
                    if id(o) not in known:
                        raise TypeError("stream_save: every tensor in the state must come from Deferred.tensor")
                    order.setdefault(id(o), known[id(o)])
                    return 0  # the tensor itself is not walked: its storage is not another storage
                if isinstance(o, torch.storage.TypedStorage | torch.UntypedStorage):
                    raise TypeError("stream_save: the state holds a storage; only Deferred tensors are written")
                return None

        Walk(io.BytesIO(), protocol=2).dump(obj)  # torch.save's default protocol: the same walk as its pickler
        return [entry for entry in order.values() if entry[0].numel()]


Segment = bytes | tuple[torch.Tensor, Chunks]  # a file's recorded bytes, or a storage still to produce


class _Recorder:
    """The file object torch.save writes to under skip_data: records' bytes are kept, each skipped
    storage (``seek``) becomes its placeholder's segment. The first exception raised in here is kept,
    since torch re-raises what a write callback raised as a RuntimeError."""

    def __init__(self, pending: list[tuple[torch.Tensor, Chunks]]):
        self.pending = pending[::-1]
        self.segments: list[Segment] = []
        self.position = 0
        self.failure: BaseException | None = None

    def write(self, data) -> int:
        chunk = bytes(data)
        self.segments.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            if whence != io.SEEK_CUR:
                raise io.UnsupportedOperation("stream_save writes sequentially")
            if offset:
                self.segments.append(self._storage(offset))
                self.position += offset
            return self.position
        except BaseException as e:
            self.failure = self.failure or e
            raise

    def _storage(self, nbytes: int) -> tuple[torch.Tensor, Chunks]:
        if not self.pending:
            raise RuntimeError(f"torch.save skipped {nbytes} bytes after the last placeholder's storage")
        placeholder, chunks = self.pending.pop()
        expected = placeholder.numel() * placeholder.element_size()
        if nbytes != expected:
            raise RuntimeError(
                f"torch.save skipped {nbytes} bytes where the next placeholder "
                f"{tuple(placeholder.shape)} {placeholder.dtype} holds {expected}"
            )
        return placeholder, chunks


def _record(obj: object, deferred: Deferred) -> list[Segment]:
    """What torch.save writes for ``obj``: its bytes, with a segment per placeholder's storage."""
    recorder = _Recorder(deferred._storage_order(obj))
    with torch_saves_surfaced(), skip_data():
        try:
            torch.save(obj, cast(IO[bytes], recorder))
        except BaseException:
            if recorder.failure is not None:
                raise recorder.failure from None
            raise
    if recorder.pending:
        raise RuntimeError(f"torch.save wrote {len(recorder.pending)} placeholder storage(s) fewer than expected")
    return recorder.segments


def _fill(out: DirectFile, placeholder: torch.Tensor, chunks: Chunks) -> None:
    """Writes one storage from its chunks, checked to make exactly the placeholder's bytes."""
    expected = placeholder.numel() * placeholder.element_size()
    written = 0
    for chunk in chunks():
        if chunk.dtype != placeholder.dtype:
            raise TypeError(f"a chunk of {chunk.dtype} for a {placeholder.dtype} tensor")
        data = chunk.contiguous().reshape(-1).view(torch.uint8)
        if written + data.numel() > expected:
            raise ValueError(f"chunks exceed the {tuple(placeholder.shape)} tensor's {expected} bytes")
        write_tensor(out, data)  # a dry run's fake chunk leaves a hole
        written += data.numel()
    if written != expected:
        raise ValueError(f"chunks gave {written} of the {tuple(placeholder.shape)} tensor's {expected} bytes")


def _steps(segments: list[Segment]) -> list[list[Segment]]:
    """The segments cut after each storage: step ``i`` ends with the file's ``i``-th storage."""
    steps: list[list[Segment]] = [[]]
    for segment in segments:
        steps[-1].append(segment)
        if not isinstance(segment, bytes):
            steps.append([])
    return steps


def stream_save_all(files: Sequence[tuple[object, Path, Deferred]]) -> None:
    """``torch.save(obj, path)`` for each ``(obj, path, deferred)``, where ``obj``'s tensors are
    ``deferred``'s placeholders, written side by side storage by storage; written around the page
    cache (``direct_io``), as ``torch_save``."""
    plans = [_steps(_record(obj, deferred)) for obj, _, deferred in files]
    with contextlib.ExitStack() as stack:
        buffer = max(_MIN_BUFFER, _BUFFERS // len(files))  # side by side, the files share one buffer's memory
        outs = [stack.enter_context(DirectFile(path, buffer_bytes=buffer)) for _, path, _ in files]
        for step in range(max(len(steps) for steps in plans)):
            for out, steps in zip(outs, plans, strict=True):
                for segment in steps[step] if step < len(steps) else ():
                    if isinstance(segment, bytes):
                        out.write(segment)
                    else:
                        _fill(out, *segment)
