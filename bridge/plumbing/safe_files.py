"""Opening files a user handed us: regular files only, size-capped reads, carried files kept inside.

A checkpoint folder is input we do not control. A FIFO named ``.metadata`` would block a reader
forever, a ``/proc`` or device file has no end or leaks the environment, a symlink can point a
"tokenizer" at ``/proc/self/environ`` or ``~/.cache/huggingface/token``. Every user file is checked
here before it is opened:

* :func:`regular_file`: the path, symlinks followed, is a regular file (``S_ISREG``) and not in
  ``/proc``, ``/sys`` or ``/dev``; anything else is one ``InputError`` line naming the file.
* :func:`read_bytes_capped` / :func:`read_text_capped`: open without blocking (``O_NONBLOCK``, then
  ``fstat`` on the open descriptor, so a swap after the check is caught too) and refuse a file
  larger than the cap before reading it all.
* :func:`carried_file`: a non-weight file copied into an output or pushed must resolve inside its
  folder or, for a Hugging Face cache snapshot (``…/snapshots/<rev>/``), inside that repo's
  ``blobs/``.
* :func:`copy_regular`: copies such a file through a checked descriptor.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

from bridge.errors import InputError, sanitize

MAX_JSON_BYTES = 16 * 2**20  # config.json, index, metadata.json, generation_config: real ones are kB
MAX_TRACKER_BYTES = 64  # latest_checkpointed_iteration.txt holds a number or "release"
_SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _name(path: Path) -> str:
    return sanitize(str(path), limit=400)


def _special_root(resolved: Path) -> Path | None:
    return next((root for root in _SPECIAL_ROOTS if resolved == root or root in resolved.parents), None)


def regular_file(path: Path | str) -> Path:
    """``path`` if it is (through symlinks) a regular file outside /proc, /sys and /dev; else one
    ``InputError`` line naming it and what it is."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        what = "a broken symlink" if path.is_symlink() else "missing"
        raise InputError(f"{_name(path)}: {what}; expected a regular file") from None
    except OSError as e:
        raise InputError(f"{_name(path)}: cannot be read ({sanitize(e.strerror or str(e))})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{_name(path)}: {_kind(st.st_mode)}; expected a regular file")
    root = _special_root(path.resolve())
    if root is not None:
        raise InputError(f"{_name(path)}: a special file in {root}; expected a regular file")
    return path


def open_regular(path: Path | str) -> BinaryIO:
    """``path`` opened for binary reading once checked regular (never blocks on a FIFO)."""
    return os.fdopen(_open_regular(Path(path)), "rb")


def _open_regular(path: Path) -> int:
    """A read-only descriptor on ``path``, checked regular after opening (never blocks on a FIFO)."""
    regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"{_name(path)}: cannot be read ({sanitize(e.strerror or str(e))})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the check and the open
        os.close(fd)
        raise InputError(f"{_name(path)}: not a regular file; expected a regular file")
    os.set_blocking(fd, True)
    return fd


def read_bytes_capped(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of regular file ``path``; a file over ``max_bytes`` is refused before it is read."""
    path = Path(path)
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size > max_bytes:
            raise InputError(f"{_name(path)}: larger than {max_bytes} bytes; not a file of this kind")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # a file that grew, or reports no size
        raise InputError(f"{_name(path)}: larger than {max_bytes} bytes; not a file of this kind")
    return data


def read_text_capped(path: Path | str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """UTF-8 text of regular file ``path`` (see :func:`read_bytes_capped`)."""
    data = read_bytes_capped(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{_name(Path(path))}: not UTF-8 text (byte {e.start}); expected a text file") from None


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a file listed in ``folder`` may live: the folder, and for a Hub cache snapshot
    (``…/models--org--name/snapshots/<rev>``) the repo's ``blobs/`` (taken lexically: a ``blobs``
    symlink does not widen it)."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def carried_file(path: Path, folder: Path) -> Path:
    """``path`` (listed in ``folder``) if it may be copied into an output or pushed: a regular file
    whose resolved path is inside ``folder`` (or a cache snapshot's ``blobs/``); else one line."""
    path = Path(path)
    regular_file(path)
    real = path.resolve()
    if not any(root == real or root in real.parents for root in _allowed_roots(Path(folder))):
        raise InputError(
            f"{_name(path)}: a symlink to {_name(real)}, outside {_name(Path(folder))}; only files inside "
            "the checkpoint folder are carried (copy the file in)"
        )
    return path


def folder_files(folder: Path, keep=lambda p: True) -> list[Path]:
    """The files directly in ``folder`` that ``keep`` selects, each checked by :func:`carried_file`
    (a FIFO, device, socket or outside symlink among them is refused); sub-folders are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() or not keep(p):
            continue
        found.append(carried_file(p, folder))
    return found


def copy_regular(src: Path, dst: Path) -> None:
    """Copies regular file ``src`` to ``dst`` (mode and times kept, as ``shutil.copy2``) through a
    descriptor checked after opening."""
    fd = _open_regular(Path(src))
    with os.fdopen(fd, "rb") as f_in, open(dst, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out, 1 << 20)
        st = os.fstat(f_in.fileno())
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
