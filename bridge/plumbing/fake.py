"""Tensors with a shape and a dtype but no data, for dry runs.

A dry run executes the real conversion code on these (torch's ``FakeTensor``: every rule, split and
cast works on them) and the writers leave each tensor's bytes out as a hole. So a dry run's files and
byte counts come from the code that writes a real output, and cannot drift from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Protocol

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.serialization import skip_data


@cache
def _mode() -> FakeTensorMode:
    """Built on the first dry run only: constructing a ``FakeTensorMode`` imports ``torch._dynamo`` (and
    sympy, ~0.3 s) that a real conversion never needs. ``is_fake`` alone imports neither."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` that holds no memory."""
    with _mode():
        return torch.empty(shape, dtype=dtype)


def holds_data(t: torch.Tensor) -> bool:
    return not is_fake(t)


class Sink(Protocol):
    def write(self, data, /) -> int: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...


def write_tensor(f: Sink, t: torch.Tensor) -> None:
    """A contiguous tensor's bytes, or a hole of their size for a fake tensor."""
    if is_fake(t):
        f.seek(t.numel() * t.element_size(), os.SEEK_CUR)
    else:
        f.write(t.reshape(-1).view(torch.uint8).numpy())


@contextmanager
def storages_skipped() -> Iterator[None]:
    """``torch.save`` writes fake tensors' records as holes of their real size (``skip_data``)."""
    with skip_data(materialize_fake_tensors=True):
        yield


class _Counter:
    """A write-only sink that counts bytes, skips included."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.size = offset if whence == os.SEEK_SET else self.size + offset
        return self.size

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass


def torch_save_size(obj: object) -> int:
    """Bytes ``torch.save(obj)`` writes; ``obj`` may hold fake tensors (nothing is materialised)."""
    sink = _Counter()
    with storages_skipped():
        torch.save(obj, sink)  # type: ignore[arg-type]
    return sink.size
