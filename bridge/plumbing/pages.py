"""Give back the resident pages of memory-mapped, read-only input tensors without unmapping them.

Pages of a file mapping that this process has touched count in its RSS until they are unmapped.
Unmapping a legacy rank file means loading (unpickling) it again on the next access, which cost
~0.05 s per file each time; ``madvise(MADV_DONTNEED)`` drops the pages instead and keeps the
mapping: a later access re-reads them from the page cache. Only for tensors never written to --
on a private file mapping, DONTNEED also discards the process's own modified copies.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable

import torch

_MADV_DONTNEED = 4  # Linux
_PAGE = mmap.PAGESIZE


def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise()


def drop_resident(tensors: Iterable[torch.Tensor]) -> bool:
    """Drops the resident pages behind these tensors' storages; False where the platform cannot
    (the caller then unmaps instead)."""
    if _MADVISE is None:
        return False
    ranges = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    for ptr, nbytes in ranges:
        if not nbytes:
            continue
        start = ptr // _PAGE * _PAGE  # a neighbour's partial page only refaults from the same file
        end = -(-(ptr + nbytes) // _PAGE) * _PAGE
        if _MADVISE(start, end - start, _MADV_DONTNEED) != 0:
            return False
    return True


def drop_copied(t: torch.Tensor) -> None:
    """Drops the whole pages inside contiguous ``t``'s own bytes (a mapped shard once copied), where the
    platform can; the pages it shares with neighbours stay."""
    if _MADVISE is None or not t.is_contiguous() or not t.numel():
        return
    ptr = t.data_ptr()
    start = -(-ptr // _PAGE) * _PAGE
    end = (ptr + t.numel() * t.element_size()) // _PAGE * _PAGE
    if end > start:
        _MADVISE(start, end - start, _MADV_DONTNEED)
