"""Outputs appear complete or not at all: build in a hidden sibling, fsync, then rename."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .errors import OutputError


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(dst: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Path:
    """Refuses outputs that would clobber or nest in an input, or replace existing data without --force."""
    dst = Path(os.path.abspath(dst))
    for src in inputs:
        src = Path(os.path.abspath(src))
        if _inside(dst, src) or _inside(src, dst):
            raise OutputError(f"{dst}: output overlaps the input {src}; choose a separate directory")
    if dst.exists() and not force:
        raise OutputError(f"{dst}: already exists; pass --force to replace it")
    return dst


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextmanager
def atomic_output_dir(dst: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces ``dst``, on any failure it vanishes."""
    dst = check_output(dst, force=force, inputs=inputs)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{dst.parent}: cannot create output here ({e.strerror})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{dst}: writing failed ({e.strerror or e}); nothing was left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
