"""Tensor memory taken back as soon as nothing uses it, for a reader handing out one tensor after another.

Touching fresh pages is the dearest part of reading a checkpoint into memory: on the 2-core VM, where
freed memory goes back to the host, it costs ~1.3 s/GB, several times the read into them. A model's
layers ask for the same few sizes over and over, so a reader that keeps the buffers of tensors its
consumer has dropped reads the next layer into pages that are already there.

No help from the consumer is needed: each tensor is built on a fresh ``memoryview`` of a pooled buffer,
``torch.frombuffer`` keeps that view alive for as long as any tensor or view of the memory lives, and a
finalizer on the view hands the buffer back when the last one is gone.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref

import torch


class RecycledMemory:
    """``empty(shape, dtype)`` like ``torch.empty``, on reused memory of exactly that many bytes.
    At most ``keep_bytes`` of unused buffers stay mapped; beyond that a returned buffer is unmapped."""

    def __init__(self, keep_bytes: int = 256 * 2**20):
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()  # buffers come back on whichever thread dropped the last tensor

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        nbytes = numel * dtype.itemsize
        with self._lock:
            free = self._free.get(nbytes)
            buffer = free.pop() if free else None
            if buffer is not None:
                self._free_bytes -= nbytes
        if buffer is None:
            buffer = mmap.mmap(-1, nbytes)  # anonymous: pages appear as they are first written
        view = memoryview(buffer)
        weakref.finalize(view, self._give_back, buffer)
        return torch.frombuffer(view, dtype=dtype, count=numel).view(shape)

    def unused_bytes(self) -> int:
        with self._lock:
            return self._free_bytes

    def _give_back(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if self._free_bytes + len(buffer) <= self.keep_bytes:
                self._free.setdefault(len(buffer), []).append(buffer)
                self._free_bytes += len(buffer)
                return
        buffer.close()
