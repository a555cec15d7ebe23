"""Outputs appear complete or not at all: build in a hidden sibling, fsync, then rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

from bridge.errors import OutputError


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(dst: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Path:
    """Refuses outputs that would clobber or nest in an input, or replace existing data without --force."""
    dst = Path(os.path.abspath(dst))
    for src in inputs:
        src = Path(os.path.abspath(src))
        real_dst, real_src = dst.resolve(), src.resolve()  # a symlinked parent may lead into the input
        if _inside(dst, src) or _inside(src, dst) or _inside(real_dst, real_src) or _inside(real_src, real_dst):
            raise OutputError(f"{dst}: output overlaps the input {src}; choose a separate directory")
    if dst.exists() and not force:
        raise OutputError(f"{dst}: already exists; pass --force to replace it")
    return dst


@contextmanager
def os_errors_surfaced() -> Iterator[None]:
    """torch's C++ zip writer reports a failed write (a full disk) as a RuntimeError whose context is
    the OSError: re-raise that, so ``atomic_output_dir`` turns it into one line."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


@contextmanager
def torch_saves_surfaced() -> Iterator[None]:
    """Around any ``torch.save`` we make (our rank files, DCP's per-tensor records): a full disk
    surfaces as its OSError (``os_errors_surfaced``), and the zip container's per-record CRC32 is
    skipped -- computing it took 2 s per GB, more than the write itself; ``torch.load`` does not
    check it (torch's own note on ``set_crc32_options``), only an external ``unzip -t`` would."""
    from torch.utils.serialization import config

    # install_config_module turns the module into a ConfigModule (with patch) at import; mypy sees the plain module
    with os_errors_surfaced(), config.patch({"save.compute_crc32": False}):  # type: ignore[attr-defined]
        yield


def torch_save(obj, path: Path) -> None:
    """``torch.save`` through a Python file: given a path, torch writes from C++ and a full disk
    shows up only as "iostream error"; through a file object the OSError (ENOSPC) is kept.
    Written around the page cache (``direct_io``)."""
    import torch

    from bridge.plumbing.direct_io import DirectFile

    with torch_saves_surfaced(), DirectFile(path) as f:
        torch.save(obj, cast(IO[bytes], f))  # duck-typed: torch.save only writes, tells and flushes


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale(dst: Path, kind: str) -> None:
    """Removes ``.NAME.{kind}-PID`` siblings left by a killed run (PID no longer alive). A live
    process's (a concurrent run) is left alone, so is anything whose suffix is not a PID."""
    prefix = f".{dst.name}.{kind}-"
    for p in dst.parent.iterdir():
        pid = p.name[len(prefix) :]
        if p.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(p)


def _fsync_dir(path: Path) -> None:
    """Makes the rename durable; best effort (some filesystems refuse fsync on a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output_dir(dst: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces ``dst``, on any failure it vanishes.

    A run killed outright (SIGKILL, power loss) leaves ``dst`` as it was (absent, or the previous
    complete output) plus a hidden ``.NAME.partial-PID`` sibling; the next run on ``dst`` removes
    those of dead processes before it starts, and a ``.NAME.old-PID`` (killed while swapping an
    existing ``dst`` under --force) once it has put its own output in place."""
    dst = check_output(dst, force=force, inputs=inputs)
    created = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(dst, "partial")
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{dst.parent}: cannot create output here ({e.strerror})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists() or dst.is_symlink():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            _remove(old)
        else:
            tmp.rename(dst)
        _fsync_dir(dst.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents made for this output, innermost first; only while still empty
            try:
                p.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise OutputError(f"{dst}: writing failed ({e.strerror or e}); nothing was left behind") from None
        raise
    _remove_stale(dst, "old")
