"""Outputs appear complete or not at all: build in a hidden sibling, fsync, then rename."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

from bridge.errors import OutputError
from bridge.plumbing import distributed, signals


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _lexists(path: Path) -> bool:
    """Exists, or is a symlink (a dangling one too: replacing it is replacing something)."""
    return os.path.lexists(path)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the parent may be a file: refused later)
        return None
    return st.st_dev, st.st_ino


def _files_reachable(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every file under ``root`` (or ``root`` itself), symlinks followed, each directory once."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.stat(path)
        except OSError:  # dangling, unreadable: nothing reachable there
            continue
        if not stat.S_ISDIR(st.st_mode):
            yield path, st
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            stack.extend(Path(entry.path) for entry in os.scandir(path))
        except OSError:
            continue


def _shared_with_input(dst: Path, src: Path) -> tuple[Path, Path] | None:
    """A file under ``dst`` that is a file of ``src`` too (a hard link, a symlink to it, the same
    real path), with the input file it is; None when they share none."""
    inputs: dict[tuple[int, int], Path] = {}
    real: dict[str, Path] = {}
    for path, st in _files_reachable(src):
        inputs.setdefault((st.st_dev, st.st_ino), path)
        real.setdefault(os.path.realpath(path), path)
    for path, st in _files_reachable(dst):
        same = inputs.get((st.st_dev, st.st_ino)) or real.get(os.path.realpath(path))
        if same is not None:
            return path, same
    return None


def check_output(dst: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Path:
    """Refuses outputs that would clobber or nest in an input, or replace existing data without --force,
    or (with --force) replace a folder holding files of the input (hard links, symlinks into it)."""
    dst = Path(os.path.abspath(dst))
    for src in inputs:
        src = Path(os.path.abspath(src))
        real_dst, real_src = dst.resolve(), src.resolve()  # a symlinked parent may lead into the input
        if _inside(dst, src) or _inside(src, dst) or _inside(real_dst, real_src) or _inside(real_src, real_dst):
            raise OutputError(f"{dst}: output overlaps the input {src}; choose a separate directory")
    if _lexists(dst) and not force:
        what = "is a dangling symlink" if not dst.exists() else "already exists"
        raise OutputError(f"{dst}: {what}; pass --force to replace it")
    if _lexists(dst) and not dst.is_symlink():  # --force replaces the link itself, never what it points to
        for src in inputs:
            shared = _shared_with_input(dst, Path(os.path.abspath(src)))
            if shared is not None:
                raise OutputError(
                    f"{shared[0]}: is the same file as the input's {shared[1]}; --force will not replace an "
                    "output that shares files with the input, choose another destination"
                )
    return dst


# Hidden siblings of DST: ".NAME.partial-PID" (the output being built), ".NAME.old-PID" (the copy
# --force replaces, while swapping) and ".NAME.lock". Where that name would exceed NAME_MAX (a long but
# valid DST name), ".h1b-<sha1 of NAME>.partial-PID" etc. instead; stale-partial cleanup knows both.
NAME_MAX = 255


def _sibling_prefixes(dst: Path) -> tuple[str, str]:
    digest = hashlib.sha1(os.fsencode(dst.name)).hexdigest()[:16]
    return f".{dst.name}.", f".h1b-{digest}."


def _sibling(dst: Path, kind: str, pid: int | None = None) -> Path:
    suffix = kind if pid is None else f"{kind}-{pid}"
    plain, hashed = _sibling_prefixes(dst)
    name = plain + suffix
    return dst.parent / (name if len(os.fsencode(name)) <= NAME_MAX else hashed + suffix)


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
    """Removes ``.NAME.{kind}-PID`` siblings (or their hashed form) left by a killed run (PID no longer
    alive). A live process's (a concurrent run) is left alone, so is anything whose suffix is not a PID."""
    for p in dst.parent.iterdir():
        for prefix in (prefix + f"{kind}-" for prefix in _sibling_prefixes(dst)):
            pid = p.name[len(prefix) :]
            if p.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(p)


class _Lock:
    """``.NAME.lock`` beside DST, held (flock) from before the partial directory exists until the
    output is in place: a second run on the same DST is refused at once. The kernel drops the lock
    when its holder dies, so a file left by a killed run is simply taken over; the holder removes the
    file while still holding it, and a taker checks that the file it locked is still the one on
    disk, so two runs can never both hold it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, dst: Path) -> _Lock | None:
        path = _sibling(dst, "lock")
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                break
            except OSError:  # no flock on this filesystem: go on unlocked (the rename is still no-replace)
                os.close(fd)
                path.unlink(missing_ok=True)
                return None
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                return cls(path, fd)
            os.close(fd)  # its holder removed it as we locked it: take the new one
        raise OutputError(f"{dst}: another run is writing this output (lock {path.name} held); wait for it to finish")

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


_RENAME_NOREPLACE, _AT_FDCWD = 1, -100


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Renames ``src`` to ``dst`` unless ``dst`` exists (a dangling symlink included): FileExistsError.
    Atomic through renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it; elsewhere
    a check just before the rename (other h1bridge runs are kept out by the lock)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this filesystem does not take the flag
            raise OSError(err, os.strerror(err), str(dst))
    if _lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _put_in_place(tmp: Path, dst: Path, expected: tuple[int, int] | None) -> None:
    """Renames the finished ``tmp`` to ``dst``. ``expected`` is what ``dst`` was when the run started
    (None: absent): only that is replaced (--force); anything else found there now was put there by
    someone else during the run and is left untouched (OutputError, exit 4)."""
    found = _identity(dst)
    try:
        if found is None:
            rename_noreplace(tmp, dst)
            return
        if found != expected:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        old = _sibling(dst, "old", os.getpid())
        dst.rename(old)
        try:
            rename_noreplace(tmp, dst)
        except BaseException:
            if not _lexists(dst):
                old.rename(dst)
            raise
        _remove(old)
    except FileExistsError:
        raise OutputError(
            f"{dst}: was created by something else during the run; left it untouched and removed this output"
        ) from None


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


class _Partial:
    """The hidden ``.NAME.partial-PID`` sibling of one run: created under the lock, put in place by
    ``commit``, or removed by ``abort``."""

    def __init__(self, dst: Path, *, force: bool, inputs: Sequence[Path]):
        self.dst = check_output(dst, force=force, inputs=inputs)
        self.expected = _identity(self.dst)
        self.created = [p for p in (self.dst.parent, *self.dst.parent.parents) if not p.exists()]
        self.lock: _Lock | None = None
        self.tmp: Path | None = None
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            self.lock = _Lock.acquire(self.dst)
            _remove_stale(self.dst, "partial")
            self.tmp = _sibling(self.dst, "partial", os.getpid())
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.dst.parent}: cannot create output here ({e.strerror})") from None
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        assert self.tmp is not None
        _fsync_tree(self.tmp)
        signals.check()  # a signal whose exception something swallowed still stops the run here
        _put_in_place(self.tmp, self.dst, self.expected)
        _fsync_dir(self.dst.parent)

    def abort(self) -> None:
        """Removes the partial output, the lock and the parents made for it (innermost first, while empty)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()
        for p in self.created:
            try:
                p.rmdir()
            except OSError:
                break

    def finish(self) -> None:
        try:
            _remove_stale(self.dst, "old")
        finally:
            if self.lock is not None:
                self.lock.release()


def remove_abandoned(dst: Path, tmp: Path) -> None:
    """Removes the partial ``tmp`` of ``dst`` when the process that made it (and holds ``dst``'s lock) is
    gone: another process of its torchrun group cleans up after a killed rank 0. Taking the lock
    proves it is gone (the kernel drops a dead holder's lock); a live holder cleans up itself."""
    dst = Path(os.path.abspath(dst))
    try:
        lock = _Lock.acquire(dst)
    except (OutputError, OSError):  # held: its owner is alive
        return
    if lock is None:  # no flock here: cannot tell, leave it to the next run's stale cleanup
        return
    try:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()


@contextmanager
def atomic_output_dir(dst: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces ``dst``, on any failure it vanishes.

    A run killed outright (SIGKILL, power loss) leaves ``dst`` as it was (absent, or the previous
    complete output) plus a hidden ``.NAME.partial-PID`` sibling; the next run on ``dst`` removes
    those of dead processes before it starts, and a ``.NAME.old-PID`` (killed while swapping an
    existing ``dst`` under --force) once it has put its own output in place. A second run on the same
    ``dst`` is refused while this one holds ``.NAME.lock``; what appears at ``dst`` during the run is
    never replaced.

    Under torchrun (``distributed.current()``) every process gets the same directory: process 0 holds
    the lock and makes it, the others write their shares into it; once every process has reported its
    share written, process 0 renames it, and the others learn whether that worked. A failure in any
    process fails them all and leaves nothing behind (a killed process 0's partial is removed by the
    others, see ``remove_abandoned``)."""
    dst = Path(os.path.abspath(dst))
    group = distributed.current()
    partial: _Partial | None = None
    tmp: Path | None = None
    try:
        if group.rank == 0:
            partial = _Partial(dst, force=force, inputs=inputs)
        tmp = group.exchange(partial and partial.tmp)[0]
        assert tmp is not None
        if not tmp.is_dir():
            raise OutputError(
                f"{tmp}: the output being built by process 0 is not visible here; "
                "every process needs DST on a filesystem they all share"
            )
        yield tmp
        group.exchange()  # every process has written its share
        if partial is not None:
            partial.commit()
        try:
            group.exchange()  # the others learn that the output is in place
        except distributed.PeerLost:
            if partial is None:
                raise  # process 0 died: whether it committed is unknown here
        group.close()
    except BaseException as e:
        with signals.held():  # torchrun's SIGTERM, sent when another process died, must not cut this short
            if partial is not None:
                partial.abort()
            group.fail(e)  # after the cleanup: the others may exit (and torchrun end this one) once told
            if partial is None and group.state == "broken":  # process 0 may be dead
                remove_abandoned(dst, tmp or _sibling(dst, "partial", group.leader_pid))
        if isinstance(e, OSError):
            raise OutputError(f"{dst}: writing failed ({e.strerror or e}); nothing was left behind") from None
        raise
    if partial is not None:
        partial.finish()
