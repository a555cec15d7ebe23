"""Memory for shards being written: reused across rank files, filled from a rule's pieces."""

from __future__ import annotations

import math

import torch


class BufferPool:
    """Shard buffers reused from one rank file to the next: the ranks of a stage hold the same shapes,
    so after the first rank no new memory is touched (fresh pages cost more than the copy into
    them). Each buffer is exactly one tensor's bytes, so ``torch.save`` stores nothing extra.
    Buffers the last rank did not reuse are dropped, so at most two ranks' worth is ever held."""

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}
        self._taken: list[torch.Tensor] = []

    def tensor(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        free = self._free.get(nbytes)
        buf = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8)
        self._taken.append(buf)
        return buf.view(dtype).view(shape)

    def recycle(self) -> None:
        """Call once the rank file is written and its tensors are dropped."""
        self._free = {}
        for buf in self._taken:
            self._free.setdefault(buf.numel(), []).append(buf)
        self._taken = []


def fill(out: torch.Tensor, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Copies a rule's dim-0 pieces into consecutive rows of ``out`` (casting if the dtype differs)."""
    row = 0
    for piece in pieces:
        out[row : row + piece.shape[0]].copy_(piece)
        row += piece.shape[0]
    return out
